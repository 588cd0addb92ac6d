"""Beta schedules, timestep respacing and the `Schedule` pytree.

Everything here is computed in float64 NumPy, exactly as OpenAI's
improved-diffusion / guided-diffusion do, and only then stored as float32
device tables.  OpenAI gathers float64 tables per batch and casts the gathered
values to float32 before they touch a tensor, so a float32 table indexed by `t`
gives bit-identical coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULE_NAMES = ("linear", "cosine")
# GLIDE spells the cosine schedule like diffusers does.
_SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into T betas (float64).

    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta);
    Eq. 17 of Nichol & Dhariwal (2021), capped to avoid a singularity at t = T.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """The float64 betas `[T]` of a named schedule.

    "linear": Ho et al. (2020), rescaled by 1000 / T so any T gives the same
    process shape.  "cosine": Eq. 17 of Nichol & Dhariwal (2021) with s = 0.008.
    Schedules may be added here but never changed: checkpoints depend on them.
    """
    name = _SCHEDULE_ALIASES.get(name, name)
    if not isinstance(num_diffusion_timesteps, (int, np.integer)) or num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be a positive integer, got {num_diffusion_timesteps!r}")
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        beta_start = scale * 0.0001
        beta_end = scale * 0.02
        return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"unknown beta schedule {name!r}; accepted: {', '.join(SCHEDULE_NAMES)} (or 'squaredcos_cap_v2' for cosine)"
    )


SOLVER_SPACINGS = ("logsnr", "quad")  # `timestep_respacing` prefixes of `solver_timesteps`


def solver_timesteps(betas: np.ndarray, count: int, spacing: str) -> set[int]:
    """N original timesteps spaced for an ODE solver, always including T-1 and 0.

    Lu et al. (2022a, Sec. 3.4 / App. D) step DPM-Solver uniformly in lambda =
    log(alpha / sigma) ("logSNR") or quadratically in t ("time_quadratic")
    rather than uniformly in t.  Here the targets are snapped to the original
    integer grid, so the model is still evaluated only at trained timesteps:

      "logsnr": lambda_i = lambda(T-1) + i / (N-1) (lambda(0) - lambda(T-1)),
                t_i = the grid timestep whose lambda is nearest;
      "quad":   t_i = round((T-1) (1 - i / (N-1))^2), i = 0..N-1.

    Where rounding maps two targets to one timestep (dense ends), the later
    one moves to the next unused smaller timestep, so exactly N distinct steps
    are kept.  All in float64.

    Args:
      betas: the original float64 betas `[T]`.
      count: N, 2 <= N <= T.
      spacing: "logsnr" or "quad".

    Returns:
      The set of kept original indices (a subset of range(T) with N elements).
    """
    betas = np.asarray(betas, np.float64)
    num_timesteps = betas.shape[0]
    if not 2 <= count <= num_timesteps:
        raise ValueError(f"respacing {spacing}{count}: need 2 <= N <= {num_timesteps} steps")
    u = np.linspace(0.0, 1.0, count)
    if spacing == "logsnr":
        abar = np.cumprod(1.0 - betas)
        lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # increasing as t decreases
        targets = lam[-1] + u * (lam[0] - lam[-1])
        wanted = [int(np.argmin(np.abs(lam - x))) for x in targets]
    elif spacing == "quad":
        wanted = [int(round((num_timesteps - 1) * (1.0 - x) ** 2)) for x in u]
    else:
        raise ValueError(f"unknown solver spacing {spacing!r}; accepted: {', '.join(SOLVER_SPACINGS)}")
    kept = []  # descending, distinct; the first is T-1, the last is 0
    for i, t in enumerate(wanted):
        floor = count - 1 - i  # leave room for the remaining steps down to 0
        t = max(min(t, kept[-1] - 1 if kept else num_timesteps - 1), floor)
        kept.append(t)
    kept[-1] = 0
    return set(kept)


DISTILL_SPACING = "distill"  # `timestep_respacing` prefix of `distill_timesteps`


def distill_timesteps(num_timesteps: int, count: int) -> set[int]:
    """The N-step grid of progressive distillation: t_i = round(T i / N) - 1, i = 1..N (half up).

    Salimans & Ho (2022, Alg. 2) sample on t = i / N; snapped to the integer
    grid this way, "distillN" is exactly the odd-indexed half of "distill2N"
    (both round the same fraction T (2i) / (2N) = T i / N), so a student on N
    steps takes one step where its teacher on 2N takes two.  Always ends at T-1.

    Raises:
      ValueError: N outside 1..T.
    """
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"respacing {DISTILL_SPACING}{count}: need 1 <= N <= {num_timesteps} steps")
    return {(2 * num_timesteps * i + count) // (2 * count) - 1 for i in range(1, count + 1)}


def space_timesteps(num_timesteps: int, section_counts: str | Iterable[int],
                    betas: np.ndarray | None = None) -> set[int]:
    """Which original timesteps a respaced process keeps (OpenAI's semantics).

    Args:
      num_timesteps: T of the original process.
      section_counts: "N" / "a,b,c" (split T into equal sections, the first
        T % n sections one step longer, and take evenly spaced points in each
        with Python's round-half-to-even), "ddimN" (the smallest integer stride s
        with len(range(0, T, s)) == N), "fast27" (GLIDE's upsampler preset:
        "10,10,3,2,2" with T-1 swapped for T-3), "logsnrN" / "quadN" (N steps
        spaced for an ODE solver, `solver_timesteps`; need `betas`), "distillN"
        (progressive distillation's nested grid, `distill_timesteps`), or a list
        of per-section counts.
      betas: the original betas `[T]` (only the solver spacings read them).

    Returns:
      The set of kept original indices.

    Raises:
      ValueError: the request cannot be met.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        for spacing in SOLVER_SPACINGS:
            if text.startswith(spacing) and text[len(spacing):].isdigit():
                if betas is None:
                    raise ValueError(f"respacing {text!r} spaces steps by the noise schedule; pass betas")
                return solver_timesteps(betas, int(text[len(spacing):]), spacing)
        if text.startswith(DISTILL_SPACING) and text[len(DISTILL_SPACING):].isdigit():
            return distill_timesteps(num_timesteps, int(text[len(DISTILL_SPACING):]))
        if text == "fast27":
            # glide-text2im: avoid DDIM artifacts of starting at T-1.
            steps = space_timesteps(num_timesteps, "10,10,3,2,2")
            steps.remove(num_timesteps - 1)
            steps.add(num_timesteps - 3)
            return steps
        if text.startswith("ddim"):
            try:
                desired_count = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            # The first clause is OpenAI's message verbatim (it names T, not N).
            raise ValueError(
                f"cannot create exactly {num_timesteps} steps with an integer stride: respacing "
                f"{section_counts!r} asks for {desired_count} of {num_timesteps} timesteps; "
                f"use a plain count like '{desired_count}' instead"
            )
        try:
            counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}: expected '', 'N', 'a,b,c', 'ddimN', 'logsnrN' or 'quadN'"
            ) from None
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"bad respacing {section_counts!r}: every section needs at least one step")
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"cannot divide section of {size} steps into {section_count} "
                f"(respacing {section_counts!r} of {num_timesteps} timesteps)"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate the float stride exactly like OpenAI (not k * stride): the
        # rounding of .5 cases depends on it.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


def respace_betas(betas: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the process that visits only `use_timesteps` (float64).

    beta'_i = 1 - abar[k_i] / abar[k_{i-1}] with abar before the first kept
    step equal to 1, so the respaced abar is exactly a subset of the original.

    Returns:
      (new_betas [K] float64, timestep_map [K] int64 of original indices).
    """
    keep = set(int(t) for t in use_timesteps)
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, np.float64))
    last = 1.0
    new_betas, timestep_map = [], []
    for i, abar in enumerate(alphas_cumprod):
        if i in keep:
            new_betas.append(1 - abar / last)
            last = abar
            timestep_map.append(i)
    return np.array(new_betas, np.float64), np.array(timestep_map, np.int64)


def schedule_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every float64 `[T]` table OpenAI's GaussianDiffusion derives from betas.

    Includes the ones `p_mean_variance` builds on the fly (log betas, the
    FIXED_LARGE variance with entry 0 replaced by the posterior variance at
    t = 1) so that every coefficient is formed in float64 before the cast.
    """
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError(
            "betas must be a 1-D array with values in (0, 1] (a 'linear' schedule needs at least 20 steps: "
            "its last beta is 0.02 * 1000 / T)")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # posterior_variance[0] == 0: reuse entry 1 so the log stays finite at t = 0
    # (a one-step process has no entry 1; its only entry is then used as is).
    pv1 = posterior_variance[1] if len(betas) > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(pv1, posterior_variance[1:]))
    posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
    # FIXED_LARGE: beta_t, except beta_0 -> posterior variance at t = 1 for a
    # better decoder likelihood (Nichol & Dhariwal 2021, Sec. 3.1).
    fixed_large_variance = np.append(pv1, betas[1:])
    return dict(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        alphas_cumprod_next=alphas_cumprod_next,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=posterior_mean_coef1,
        posterior_mean_coef2=posterior_mean_coef2,
        # Derived tables OpenAI forms in float64 inside individual methods.
        one_minus_alphas_cumprod=1.0 - alphas_cumprod,
        log_betas=np.log(betas),
        fixed_large_variance=fixed_large_variance,
        fixed_large_log_variance=np.log(fixed_large_variance),
        recip_posterior_mean_coef1=1.0 / posterior_mean_coef1,
        posterior_mean_coef2_over_coef1=posterior_mean_coef2 / posterior_mean_coef1,
        sqrt_alphas_cumprod_prev=np.sqrt(alphas_cumprod_prev),
        sqrt_one_minus_alphas_cumprod_prev=np.sqrt(1.0 - alphas_cumprod_prev),
    )


@struct.dataclass
class Schedule:
    """Discrete Gaussian diffusion tables indexed by t in [0, K); float32 `[K]`.

    `timestep_map[t]` is the original timestep respaced index t stands for;
    `original_num_steps` and `rescale_timesteps` decide what the network sees
    (`model_timesteps`).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    alphas_cumprod_next: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    one_minus_alphas_cumprod: jax.Array
    log_betas: jax.Array
    fixed_large_variance: jax.Array
    fixed_large_log_variance: jax.Array
    recip_posterior_mean_coef1: jax.Array
    posterior_mean_coef2_over_coef1: jax.Array
    sqrt_alphas_cumprod_prev: jax.Array
    sqrt_one_minus_alphas_cumprod_prev: jax.Array
    timestep_map: jax.Array  # int32 [K]
    original_num_steps: int = struct.field(pytree_node=False, default=0)
    rescale_timesteps: bool = struct.field(pytree_node=False, default=False)

    @property
    def num_timesteps(self) -> int:
        """K, the number of (respaced) steps; static under jit."""
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas, timestep_map=None, rescale_timesteps: bool = False,
                   original_num_steps: int | None = None) -> "Schedule":
        """Build the float32 tables from float64 betas `[K]`.

        Args:
          betas: the (possibly respaced) betas.
          timestep_map: original index of each step; defaults to arange(K).
          rescale_timesteps: feed the network t * 1000 / original_num_steps.
          original_num_steps: T of the unrespaced process; defaults to
            max(timestep_map) + 1.
        """
        tables = schedule_tables(betas)
        k = tables["betas"].shape[0]
        tmap = np.arange(k) if timestep_map is None else np.asarray(timestep_map, np.int64)
        if tmap.shape != (k,):
            raise ValueError(f"timestep_map has shape {tmap.shape}, expected ({k},)")
        if original_num_steps is None:
            original_num_steps = int(tmap.max()) + 1
        f32 = {name: jnp.asarray(value.astype(np.float32)) for name, value in tables.items()}
        return cls(**f32, timestep_map=jnp.asarray(tmap, jnp.int32),
                   original_num_steps=int(original_num_steps),
                   rescale_timesteps=bool(rescale_timesteps))

    def model_timesteps(self, t: jax.Array) -> jax.Array:
        """What the network (and a guidance classifier) receives for index t.

        `timestep_map[t]` (int32), or with `rescale_timesteps` that value as
        float32 times 1000 / original_num_steps (improved-diffusion's default).
        """
        mapped = self.timestep_map[t]
        if self.rescale_timesteps:
            return mapped.astype(jnp.float32) * jnp.float32(1000.0 / self.original_num_steps)
        return mapped


def make_schedule(noise_schedule: str, diffusion_steps: int, timestep_respacing: str = "",
                  rescale_timesteps: bool = False) -> Schedule:
    """The (respaced) schedule OpenAI's `create_gaussian_diffusion` builds.

    An empty `timestep_respacing` keeps all `diffusion_steps` steps.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    respacing = timestep_respacing if timestep_respacing not in (None, "") else [diffusion_steps]
    new_betas, timestep_map = respace_betas(betas, space_timesteps(diffusion_steps, respacing, betas))
    return Schedule.from_betas(new_betas, timestep_map, rescale_timesteps=rescale_timesteps,
                               original_num_steps=diffusion_steps)
