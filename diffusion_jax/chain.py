"""What every sampler shares: the network call, guidance, per-sample randomness, progress.

The ancestral and DDIM loops (`diffusion_jax.sampling`) and DPM-Solver
(`diffusion_jax.dpm_solver`) are built from these; both modules re-export
nothing of each other's, so neither imports the other's internals.
`sampling` keeps re-exporting every name here (its public API since the
first release).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax import gaussian
from diffusion_jax.gaussian import MeanVariance, extract
from diffusion_jax.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
CondFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


class Trajectory(NamedTuple):
    """Loop output with `return_trajectory=True`; step k is respaced t = K-1-k."""

    sample: jax.Array  # [B, H, W, C], the final sample (== samples[-1])
    samples: jax.Array  # [K, B, H, W, C], x after each step
    pred_xstart: jax.Array  # [K, B, H, W, C], x0 prediction of each step


def model_mean_variance(schedule: Schedule, model_fn: ModelFn, x_t: jax.Array, t: jax.Array, *,
                        mean_type: str, var_type: str, clip_denoised: bool = True, y=None,
                        denoised_fn=None) -> MeanVariance:
    """Run the network at x_t and form p(x_{t-1} | x_t) (`gaussian.p_mean_variance`)."""
    model_output = model_fn(x_t, schedule.model_timesteps(t), y)
    return gaussian.p_mean_variance(schedule, model_output, x_t, t, mean_type=mean_type, var_type=var_type,
                                    clip_denoised=clip_denoised, denoised_fn=denoised_fn)


def condition_mean(schedule: Schedule, cond_fn: CondFn, pmv: MeanVariance, x_t: jax.Array, t: jax.Array, *,
                   y=None) -> jax.Array:
    """Classifier guidance on the mean: mu + Sigma * grad log p(y | x_t).

    Sohl-Dickstein et al. (2015) / Dhariwal & Nichol (2021) Alg. 1.  Sigma is the
    model's (possibly learned) variance and the gradient is taken at x_t, not at
    the mean, exactly as guided-diffusion does (its issue #51).

    Returns:
      The shifted mean `[B, H, W, C]`.
    """
    grad = cond_fn(x_t, schedule.model_timesteps(t), y)
    return pmv.mean.astype(jnp.float32) + pmv.variance * grad.astype(jnp.float32)


def condition_score(schedule: Schedule, cond_fn: CondFn, pmv: MeanVariance, x_t: jax.Array, t: jax.Array, *,
                    y=None) -> MeanVariance:
    """Classifier guidance on the score: eps <- eps - sqrt(1 - abar_t) * grad.

    Dhariwal & Nichol (2021) Alg. 2 (Song et al. 2020's conditional score).
    pred_xstart and the mean are recomputed from the shifted eps; the new
    pred_xstart is *not* clipped again (it can be large even with clipping on).
    abar_t is the respaced one, gathered as float32 and then 1 - abar, sqrt.
    """
    alpha_bar = extract(schedule.alphas_cumprod, t, x_t.shape)
    eps = gaussian.predict_eps_from_xstart(schedule, x_t, t, pmv.pred_xstart)
    eps = eps - jnp.sqrt(1 - alpha_bar) * cond_fn(x_t, schedule.model_timesteps(t), y)
    pred_xstart = gaussian.predict_xstart_from_eps(schedule, x_t, t, eps)
    mean = gaussian.q_posterior(schedule, pred_xstart, x_t, t).mean
    return MeanVariance(mean, pmv.variance, pmv.log_variance, pred_xstart)


def predict_x0_eps(schedule: Schedule, model_fn: ModelFn, x: jax.Array, t: jax.Array, *, mean_type: str,
                   var_type: str, clip_denoised: bool, cond_fn: CondFn | None = None, y=None,
                   denoised_fn=None) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) at (x, t) on the grid, both as `sampling.ddim_sample` forms them (the ODE/SDE solvers' input).

    The network output goes through `gaussian.p_mean_variance` (every mean
    type; learned-variance channels ignored; optional clipping), `cond_fn`
    shifts the score (eps - sqrt(1 - abar_t) grad, `condition_score`), and eps
    is re-derived from the (clipped) x0.
    """
    out = model_mean_variance(schedule, model_fn, x, t, mean_type=mean_type, var_type=var_type,
                              clip_denoised=clip_denoised, y=y, denoised_fn=denoised_fn)
    if cond_fn is not None:
        out = condition_score(schedule, cond_fn, out, x, t, y=y)
    return out.pred_xstart, gaussian.predict_eps_from_xstart(schedule, x, t, out.pred_xstart)


def sample_keys(rng: jax.Array, sample_ids: jax.Array) -> jax.Array:
    """Per-sample keys `[B]`: `fold_in(rng, sample_ids[i])` (global sample index)."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(sample_ids, jnp.uint32))


def initial_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_T `[B, *shape[1:]]`: one standard-normal draw per sample key."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[0], tuple(shape[1:])))(keys)


def step_noise(keys: jax.Array, t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The noise of respaced step t (scalar) for each sample key, `[B, *shape[1:]]`."""
    draw = lambda k: jax.random.normal(jax.random.fold_in(jax.random.split(k)[1], t), tuple(shape[1:]))
    return jax.vmap(draw)(keys)


class _Progress:
    """Host-side tqdm bar fed by `jax.debug.callback` from inside the scan."""

    def __init__(self, total: int):
        self.total, self.bar, self.seen = total, None, 0

    def __call__(self, k) -> None:
        from tqdm.auto import tqdm

        k = int(k)
        if self.bar is None or k == 0:  # A new run of the compiled loop.
            if self.bar is not None:
                self.bar.close()
            self.bar, self.seen = tqdm(total=self.total, desc="sampling", unit="step"), 0
        self.bar.update(k + 1 - self.seen)
        self.seen = k + 1
        if self.seen == self.total:
            self.bar.close()
            self.bar = None


def progress_reporter(num_steps: int) -> Callable[[jax.Array], None]:
    """`report(k)` for use inside a scan over K steps: feeds a tqdm bar every ~K/50 steps."""
    hook = _Progress(num_steps)
    every = max(1, num_steps // 50)

    def report(k):
        lax.cond((k % every == 0) | (k == num_steps - 1), lambda: jax.debug.callback(hook, k), lambda: None)

    return report


def check_loop_shapes(shape, sample_ids, x_T) -> None:
    """Raise a ValueError if `sample_ids` `[B]` or `x_T` do not fit `shape`."""
    if sample_ids.shape != (shape[0],):
        raise ValueError(f"sample_ids has shape {tuple(sample_ids.shape)} but the batch is {shape[0]} (shape {shape})")
    if x_T is not None and tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape is {tuple(shape)}")
