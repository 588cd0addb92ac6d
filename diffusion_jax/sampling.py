"""Ancestral (DDPM) and DDIM sampling: single steps and compiled loops.

DPM-Solver(++) lives in `diffusion_jax.dpm_solver`, the stochastic solvers
(DPM-Solver++(2M) SDE, EDM) in `diffusion_jax.sde_solver`; their loops are
re-exported here, and `named_sampler` maps the programs' sampler names to loops.

Semantics follow OpenAI's guided-diffusion `GaussianDiffusion` exactly
(`p_sample`, `ddim_sample`, `ddim_reverse_sample`, `condition_mean`,
`condition_score`), including the float32 order of operations, so a step fed
the same model output and noise reproduces PyTorch's numbers.

`model_fn(x, timesteps, y)` and `cond_fn(x, timesteps, y)` receive
`schedule.model_timesteps(t)` (the original, possibly rescaled, timestep), never
the respaced index.  Single steps take their noise explicitly; loops draw it from
`rng` as a pure function of (rng, sample index, step), so a sample does not
depend on the batch size or on how the batch is sharded over devices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax import gaussian, sde_solver
from diffusion_jax.chain import (  # noqa: F401  (public here since the first release)
    CondFn,
    ModelFn,
    Trajectory,
    check_loop_shapes,
    condition_mean,
    condition_score,
    initial_noise,
    model_mean_variance,
    progress_reporter,
    sample_keys,
    step_noise,
)
from diffusion_jax.dpm_solver import dpm_solver_sample_loop
from diffusion_jax.sde_solver import dpmpp_2m_sde_sample_loop, edm_sample_loop
from diffusion_jax.gaussian import extract
from diffusion_jax.schedules import Schedule

SAMPLER_NAMES = ("ancestral", "ddim", "dpm++2m", "dpm++3m", "dpm2s", "dpm++2m-sde", "edm")
# The options a program may set per sampler (`named_sampler(name, **options)`), with their defaults.
SAMPLER_OPTIONS = {
    "dpm++2m-sde": {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"},
    "edm": dict(sde_solver.EDM_DEFAULTS),
}


# ----------------------------------------------------------------------------- single steps


def _nonzero_mask(t: jax.Array, x: jax.Array) -> jax.Array:
    # No noise is added on the last step (t == 0): the output is the mean.
    return (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))


def p_sample(schedule: Schedule, model_fn: ModelFn, x_t: jax.Array, t: jax.Array, noise: jax.Array, *,
             mean_type: str, var_type: str, clip_denoised: bool = True, cond_fn: CondFn | None = None, y=None,
             denoised_fn=None) -> tuple[jax.Array, jax.Array]:
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (Ho et al. 2020, Alg. 2).

    Args:
      schedule: the (respaced) schedule.
      model_fn: `(x [B,H,W,C], timesteps [B], y) -> [B,H,W,C or 2C]`.
      x_t: `[B, H, W, C]`.
      t: int32 `[B]` respaced indices.
      noise: standard normal `[B, H, W, C]`; ignored where t == 0.
      mean_type, var_type, clip_denoised, denoised_fn: see `gaussian.p_mean_variance`.
      cond_fn: optional `(x, timesteps, y) -> grad log p(y | x)`, applied to the
        mean with the model variance before the noise is added (`condition_mean`).
      y: labels (or any pytree) passed to `model_fn` and `cond_fn`.

    Returns:
      (sample [B, H, W, C], pred_xstart [B, H, W, C]).
    """
    out = model_mean_variance(schedule, model_fn, x_t, t, mean_type=mean_type, var_type=var_type,
                              clip_denoised=clip_denoised, y=y, denoised_fn=denoised_fn)
    mean = out.mean
    if cond_fn is not None:
        mean = condition_mean(schedule, cond_fn, out, x_t, t, y=y)
    sample = mean + _nonzero_mask(t, x_t) * jnp.exp(0.5 * out.log_variance) * noise
    return sample, out.pred_xstart


def ddim_sample(schedule: Schedule, model_fn: ModelFn, x_t: jax.Array, t: jax.Array, noise: jax.Array, *,
                eta: float = 0.0, mean_type: str, var_type: str, clip_denoised: bool = True,
                cond_fn: CondFn | None = None, y=None, denoised_fn=None) -> tuple[jax.Array, jax.Array]:
    """One DDIM step (Song et al. 2020, Eq. 12), with OpenAI's eta-parameterised sigma.

    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev);
    eps is re-derived from the (clipped) pred_xstart, so clipping also shapes
    the deterministic direction.  With `cond_fn` the score is shifted
    (`condition_score`) before eps is re-derived.  `noise` is multiplied by
    zero where t == 0 (and by sigma = 0 everywhere when eta = 0).

    Returns:
      (sample [B, H, W, C], pred_xstart [B, H, W, C]).
    """
    out = model_mean_variance(schedule, model_fn, x_t, t, mean_type=mean_type, var_type=var_type,
                              clip_denoised=clip_denoised, y=y, denoised_fn=denoised_fn)
    if cond_fn is not None:
        out = condition_score(schedule, cond_fn, out, x_t, t, y=y)
    eps = gaussian.predict_eps_from_xstart(schedule, x_t, t, out.pred_xstart)
    alpha_bar = extract(schedule.alphas_cumprod, t, x_t.shape)
    alpha_bar_prev = extract(schedule.alphas_cumprod_prev, t, x_t.shape)
    sigma = eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
    mean_pred = out.pred_xstart * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    sample = mean_pred + _nonzero_mask(t, x_t) * sigma * noise
    return sample, out.pred_xstart


def ddim_reverse_sample(schedule: Schedule, model_fn: ModelFn, x_t: jax.Array, t: jax.Array, *, mean_type: str,
                        var_type: str, clip_denoised: bool = True, y=None,
                        denoised_fn=None) -> tuple[jax.Array, jax.Array]:
    """One deterministic DDIM (eta = 0) step *up* the chain: x_t -> x_{t+1}.

    Uses abar_next (0 after the last step); the ODE encoder of Song et al. (2020).

    Returns:
      (sample [B, H, W, C], pred_xstart [B, H, W, C]).
    """
    out = model_mean_variance(schedule, model_fn, x_t, t, mean_type=mean_type, var_type=var_type,
                              clip_denoised=clip_denoised, y=y, denoised_fn=denoised_fn)
    shape = x_t.shape
    eps = ((extract(schedule.sqrt_recip_alphas_cumprod, t, shape) * x_t - out.pred_xstart)
           / extract(schedule.sqrt_recipm1_alphas_cumprod, t, shape))
    alpha_bar_next = extract(schedule.alphas_cumprod_next, t, shape)
    mean_pred = out.pred_xstart * jnp.sqrt(alpha_bar_next) + jnp.sqrt(1 - alpha_bar_next) * eps
    return mean_pred, out.pred_xstart


# ----------------------------------------------------------------------------- loops


def _run_chain(step: Callable, schedule: Schedule, x_T: jax.Array, noise_fn: Callable, explicit_noise, *,
               progress: bool, return_trajectory: bool):
    """lax.scan of `step(x, t [B], noise) -> (x, pred_xstart)` over t = K-1..0."""
    num_steps = schedule.num_timesteps
    ks = jnp.arange(num_steps, dtype=jnp.int32)
    ts = num_steps - 1 - ks
    report = progress_reporter(num_steps) if progress else None

    def body(x, xs):
        k, t_scalar, given = xs
        t = jnp.full((x.shape[0],), t_scalar, jnp.int32)
        noise = noise_fn(t_scalar) if given is None else given
        x, pred_xstart = step(x, t, noise)
        if report is not None:
            report(k)
        return x, ((x, pred_xstart) if return_trajectory else None)

    x, traj = lax.scan(body, x_T, (ks, ts, explicit_noise))
    if return_trajectory:
        return Trajectory(x, traj[0], traj[1])
    return x


def _loop(step: Callable, rng, schedule, shape, *, sample_ids, x_T, progress, return_trajectory):
    shape = tuple(int(d) for d in shape)
    sample_ids = jnp.arange(shape[0], dtype=jnp.int32) if sample_ids is None else jnp.asarray(sample_ids)
    check_loop_shapes(shape, sample_ids, x_T)
    keys = sample_keys(rng, sample_ids)
    x = initial_noise(keys, shape) if x_T is None else jnp.asarray(x_T, jnp.float32)
    return _run_chain(step, schedule, x, lambda t: step_noise(keys, t, shape), None, progress=progress,
                      return_trajectory=return_trajectory)


def p_sample_loop(rng: jax.Array, model_fn: ModelFn, schedule: Schedule, shape: tuple[int, ...], *,
                  mean_type: str, var_type: str, clip_denoised: bool = True, cond_fn: CondFn | None = None, y=None,
                  denoised_fn=None, sample_ids: jax.Array | None = None, x_T: jax.Array | None = None,
                  progress: bool = False, return_trajectory: bool = False):
    """Ancestral sampling over the whole (respaced) chain as one `lax.scan`.

    Call it inside `jax.jit` (the trace is cached per shape and options).
    Sample i draws x_T and every step's noise from `fold_in(rng, sample_ids[i])`,
    so it is the same whatever the batch size or device count.

    Args:
      rng: a typed key (`jax.random.key(seed)`).
      model_fn, cond_fn, y, mean_type, var_type, clip_denoised, denoised_fn: as in `p_sample`.
      schedule: the (respaced) schedule, K steps.
      shape: `(B, H, W, C)`.
      sample_ids: int `[B]` global sample indices; default `arange(B)`.
      x_T: optional `[B, H, W, C]` starting noise instead of the drawn one.
      progress: show a tqdm bar (host callback every ~K/50 steps).
      return_trajectory: also return every step's sample and pred_xstart.

    Returns:
      The final sample `[B, H, W, C]`, or a `Trajectory` with `return_trajectory`.
    """
    def step(x, t, noise):
        return p_sample(schedule, model_fn, x, t, noise, mean_type=mean_type, var_type=var_type,
                        clip_denoised=clip_denoised, cond_fn=cond_fn, y=y, denoised_fn=denoised_fn)

    return _loop(step, rng, schedule, shape, sample_ids=sample_ids, x_T=x_T, progress=progress,
                 return_trajectory=return_trajectory)


def ddim_sample_loop(rng: jax.Array, model_fn: ModelFn, schedule: Schedule, shape: tuple[int, ...], *,
                     eta: float = 0.0, mean_type: str, var_type: str, clip_denoised: bool = True,
                     cond_fn: CondFn | None = None, y=None, denoised_fn=None, sample_ids: jax.Array | None = None,
                     x_T: jax.Array | None = None, progress: bool = False, return_trajectory: bool = False):
    """DDIM sampling over the whole (respaced) chain as one `lax.scan`.

    Arguments and randomness as in `p_sample_loop`; `eta` as in `ddim_sample`
    (the step noise is drawn but multiplied by sigma = 0 when eta = 0).
    """
    def step(x, t, noise):
        return ddim_sample(schedule, model_fn, x, t, noise, eta=eta, mean_type=mean_type, var_type=var_type,
                           clip_denoised=clip_denoised, cond_fn=cond_fn, y=y, denoised_fn=denoised_fn)

    return _loop(step, rng, schedule, shape, sample_ids=sample_ids, x_T=x_T, progress=progress,
                 return_trajectory=return_trajectory)


def _check_noise(x_T, noise, num_steps):
    want = (num_steps,) + tuple(x_T.shape)
    if tuple(noise.shape) != want:
        raise ValueError(f"step_noise has shape {tuple(noise.shape)}, expected {want} ([K, *x_T.shape])")


def p_sample_loop_with_noise(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, noise: jax.Array, *,
                             mean_type: str, var_type: str, clip_denoised: bool = True,
                             cond_fn: CondFn | None = None, y=None, denoised_fn=None, progress: bool = False,
                             return_trajectory: bool = False):
    """`p_sample_loop` with explicit noise: `noise[k]` `[K, B, H, W, C]` is step k (t = K-1-k).

    This is how OpenAI's loops consume `randn_like` draws, so fixtures replay exactly.
    """
    _check_noise(x_T, noise, schedule.num_timesteps)

    def step(x, t, n):
        return p_sample(schedule, model_fn, x, t, n, mean_type=mean_type, var_type=var_type,
                        clip_denoised=clip_denoised, cond_fn=cond_fn, y=y, denoised_fn=denoised_fn)

    return _run_chain(step, schedule, jnp.asarray(x_T, jnp.float32), None, jnp.asarray(noise, jnp.float32),
                      progress=progress, return_trajectory=return_trajectory)


def ddim_sample_loop_with_noise(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, noise: jax.Array, *,
                                eta: float = 0.0, mean_type: str, var_type: str, clip_denoised: bool = True,
                                cond_fn: CondFn | None = None, y=None, denoised_fn=None, progress: bool = False,
                                return_trajectory: bool = False):
    """`ddim_sample_loop` with explicit noise `[K, B, H, W, C]` (step k is t = K-1-k)."""
    _check_noise(x_T, noise, schedule.num_timesteps)

    def step(x, t, n):
        return ddim_sample(schedule, model_fn, x, t, n, eta=eta, mean_type=mean_type, var_type=var_type,
                           clip_denoised=clip_denoised, cond_fn=cond_fn, y=y, denoised_fn=denoised_fn)

    return _run_chain(step, schedule, jnp.asarray(x_T, jnp.float32), None, jnp.asarray(noise, jnp.float32),
                      progress=progress, return_trajectory=return_trajectory)


def ddim_reverse_sample_loop(model_fn: ModelFn, schedule: Schedule, x_0: jax.Array, *, mean_type: str,
                             var_type: str, clip_denoised: bool = True, y=None, denoised_fn=None) -> jax.Array:
    """Encode x_0 with deterministic DDIM steps up the chain (one `lax.scan`).

    x_0 is taken as the sample at level t = 0 (as OpenAI's `ddim_reverse_sample`
    does) and `ddim_reverse_sample` is applied for t = 0..K-2, ending at level
    K-1: the level `ddim_sample_loop` starts from.  Decoding with
    `ddim_sample_loop(..., eta=0, x_T=<this>)` then retraces the chain (up to
    the ODE discretisation error, first order in the step size), its last step
    being the usual t = 0 denoising of x_0.

    Returns:
      x_{K-1} `[B, H, W, C]`.
    """
    def body(x, t_scalar):
        t = jnp.full((x.shape[0],), t_scalar, jnp.int32)
        x, _ = ddim_reverse_sample(schedule, model_fn, x, t, mean_type=mean_type, var_type=var_type,
                                   clip_denoised=clip_denoised, y=y, denoised_fn=denoised_fn)
        return x, None

    ts = jnp.arange(schedule.num_timesteps - 1, dtype=jnp.int32)
    x, _ = lax.scan(body, jnp.asarray(x_0, jnp.float32), ts)
    return x


def named_sampler(name: str, **options) -> Callable:
    """The loop behind a sampler name (`sample.py --sampler=NAME`), options bound.

    "ancestral" -> `p_sample_loop`; "ddim" -> `ddim_sample_loop` (pass `eta`);
    "dpm++2m" / "dpm++3m" -> `dpm_solver_sample_loop` multistep order 2 / 3
    with "dpmsolver++" (DPM-Solver++(2M), Lu et al. 2022b); "dpm2s" ->
    singlestep order 2 with "dpmsolver" (DPM-Solver-2, Lu et al. 2022a);
    "dpm++2m-sde" -> `dpmpp_2m_sde_sample_loop` (DPM-Solver++(2M) SDE, Lu et
    al. 2022b); "edm" -> `edm_sample_loop` (Karras et al. 2022, Alg. 2; 2K - 2
    network calls).  `options` set a sampler's `SAMPLER_OPTIONS` (e.g.
    `named_sampler("edm", s_churn=40.0)`); they are checked here, before any
    tracing.
    Every returned loop is called as `loop(rng, model_fn, schedule, shape, *,
    mean_type, var_type, clip_denoised, cond_fn, y, sample_ids, x_T, ...)`.

    Raises:
      ValueError: an unknown name, or an option the sampler does not take or
        a bad value for one.
    """
    loops = {
        "ancestral": (p_sample_loop, {}),
        "ddim": (ddim_sample_loop, {}),
        "dpm++2m": (dpm_solver_sample_loop, {"order": 2, "method": "multistep", "algorithm": "dpmsolver++"}),
        "dpm++3m": (dpm_solver_sample_loop, {"order": 3, "method": "multistep", "algorithm": "dpmsolver++"}),
        "dpm2s": (dpm_solver_sample_loop, {"order": 2, "method": "singlestep", "algorithm": "dpmsolver"}),
        "dpm++2m-sde": (dpmpp_2m_sde_sample_loop, {}),
        "edm": (edm_sample_loop, {}),
    }
    if name not in loops:
        raise ValueError(f"unknown sampler {name!r}; accepted: {', '.join(SAMPLER_NAMES)}")
    check_sampler_options(name, options)
    loop, bound = loops[name]
    return functools.partial(loop, **bound, **options)


def check_sampler_options(name: str, options) -> None:
    """Raise a one-line ValueError for an option `name` does not take, or a bad value (no tracing)."""
    accepted = SAMPLER_OPTIONS.get(name, {})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise ValueError(f"sampler {name!r} has no option {', '.join(map(repr, unknown))}; {takes}")
    values = {**accepted, **options}
    if name == "dpm++2m-sde":
        sde_solver.check_sde_options(**values, order=2, mean_type="epsilon")
    elif name == "edm":
        sde_solver.check_edm_options(**values, mean_type="epsilon")
