"""The forward process q and the model's reverse Gaussian p, as pure functions.

Semantics follow OpenAI's `GaussianDiffusion` exactly (Ho et al. 2020;
Nichol & Dhariwal 2021); the "v" mean type is Salimans & Ho (2022).  Arrays are NHWC; `t` is an int32 `[B]` index into
the (possibly respaced) schedule.  Every returned array has the full shape of
`x_t` (OpenAI broadcasts gathered coefficients the same way).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule

MEAN_TYPES = ("epsilon", "start_x", "previous_x", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LEARNED_VAR_TYPES = ("learned", "learned_range")


class Gaussian(NamedTuple):
    mean: jax.Array  # [B, H, W, C]
    variance: jax.Array  # [B, H, W, C]
    log_variance: jax.Array  # [B, H, W, C]


class MeanVariance(NamedTuple):
    """Output of `p_mean_variance`."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_xstart: jax.Array


def check_mean_type(mean_type: str) -> None:
    if mean_type not in MEAN_TYPES:
        raise ValueError(f"unknown mean_type {mean_type!r}; accepted: {', '.join(MEAN_TYPES)}")


def check_var_type(var_type: str) -> None:
    if var_type not in VAR_TYPES:
        raise ValueError(f"unknown var_type {var_type!r}; accepted: {', '.join(VAR_TYPES)}")


def extract(table: jax.Array, t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """table[t] broadcast to `shape` (`[B, ...]`); float32 like OpenAI's lookups.

    A float64 table (a Schedule built under `jax.experimental.enable_x64`, as
    the solver-order tests do) stays float64.
    """
    table = jnp.asarray(table)
    values = table[t].astype(jnp.float64 if table.dtype == jnp.float64 else jnp.float32)
    return jnp.broadcast_to(values.reshape((-1,) + (1,) * (len(shape) - 1)), shape)


def q_mean_variance(schedule: Schedule, x_start: jax.Array, t: jax.Array) -> Gaussian:
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I); Eq. 4 of Ho et al."""
    shape = x_start.shape
    mean = extract(schedule.sqrt_alphas_cumprod, t, shape) * x_start
    variance = extract(schedule.one_minus_alphas_cumprod, t, shape)
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, shape)
    return Gaussian(mean, variance, log_variance)


def q_sample(schedule: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Draw x_t ~ q(x_t | x_0) with the given standard-normal `noise`."""
    _check_same_shape(x_start, noise, "x_start", "noise")
    shape = x_start.shape
    return (extract(schedule.sqrt_alphas_cumprod, t, shape) * x_start
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape) * noise)


def q_posterior(schedule: Schedule, x_start: jax.Array, x_t: jax.Array, t: jax.Array) -> Gaussian:
    """q(x_{t-1} | x_t, x_0); Eqs. 6-7 of Ho et al.

    The log variance is the clipped table (entry 0 replaced by entry 1).
    """
    _check_same_shape(x_start, x_t, "x_start", "x_t")
    shape = x_t.shape
    mean = (extract(schedule.posterior_mean_coef1, t, shape) * x_start
            + extract(schedule.posterior_mean_coef2, t, shape) * x_t)
    variance = extract(schedule.posterior_variance, t, shape)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, shape)
    return Gaussian(mean, variance, log_variance)


# Alias under OpenAI's method name, so ported code reads the same.
q_posterior_mean_variance = q_posterior


def predict_xstart_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
    _check_same_shape(x_t, eps, "x_t", "eps")
    shape = x_t.shape
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, shape) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, shape) * eps)


def predict_eps_from_xstart(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                            pred_xstart: jax.Array) -> jax.Array:
    """The eps that `predict_xstart_from_eps` would map to `pred_xstart`."""
    _check_same_shape(x_t, pred_xstart, "x_t", "pred_xstart")
    shape = x_t.shape
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, shape) * x_t - pred_xstart)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, shape))


def predict_v(schedule: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """The v-prediction target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, Sec. 4).

    Args:
      x_start: x_0 `[B, H, W, C]`; t: int32 `[B]`; noise: the eps x_t was drawn with.

    Returns:
      v `[B, H, W, C]`.
    """
    _check_same_shape(x_start, noise, "x_start", "noise")
    shape = x_start.shape
    return (extract(schedule.sqrt_alphas_cumprod, t, shape) * noise
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape) * x_start)


def predict_xstart_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, Eq. 9 with alpha^2 + sigma^2 = 1)."""
    _check_same_shape(x_t, v, "x_t", "v")
    shape = x_t.shape
    return (extract(schedule.sqrt_alphas_cumprod, t, shape) * x_t
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape) * v)


def predict_eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v (Salimans & Ho 2022, Appendix D)."""
    _check_same_shape(x_t, v, "x_t", "v")
    shape = x_t.shape
    return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape) * x_t
            + extract(schedule.sqrt_alphas_cumprod, t, shape) * v)


def predict_xstart_from_xprev(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                              xprev: jax.Array) -> jax.Array:
    """Invert the posterior mean: x_0 = (x_{t-1} - coef2 x_t) / coef1."""
    _check_same_shape(x_t, xprev, "x_t", "xprev")
    shape = x_t.shape
    return (extract(schedule.recip_posterior_mean_coef1, t, shape) * xprev
            - extract(schedule.posterior_mean_coef2_over_coef1, t, shape) * x_t)


def split_model_output(model_output: jax.Array, x_t: jax.Array, var_type: str) -> tuple[jax.Array, jax.Array | None]:
    """Split `[..., 2C]` learned-variance outputs into (mean part, variance values).

    Raises:
      ValueError: the channel count does not fit `var_type` and `x_t`.
    """
    check_var_type(var_type)
    c = x_t.shape[-1]
    learned = var_type in LEARNED_VAR_TYPES
    want = 2 * c if learned else c
    if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != want:
        raise ValueError(
            f"model_output has shape {tuple(model_output.shape)} but x_t is {tuple(x_t.shape)}: "
            f"var_type {var_type!r} needs {want} output channels ({'2C: mean part, then variance values' if learned else 'C'})"
        )
    if learned:
        return model_output[..., :c], model_output[..., c:]
    return model_output, None


def model_variance(schedule: Schedule, var_values: jax.Array | None, t: jax.Array, shape,
                   *, var_type: str) -> tuple[jax.Array, jax.Array]:
    """(variance, log_variance) of p(x_{t-1} | x_t) for each variance type.

    "learned_range" interpolates in log space between the clipped posterior
    log variance and log beta_t with frac = (v + 1) / 2 (Eq. 15, Nichol &
    Dhariwal 2021), using the respaced betas.
    """
    check_var_type(var_type)
    if var_type == "learned":
        return jnp.exp(var_values), var_values
    if var_type == "learned_range":
        min_log = extract(schedule.posterior_log_variance_clipped, t, shape)
        max_log = extract(schedule.log_betas, t, shape)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        return jnp.exp(log_variance), log_variance
    if var_type == "fixed_large":
        return (extract(schedule.fixed_large_variance, t, shape),
                extract(schedule.fixed_large_log_variance, t, shape))
    return (extract(schedule.posterior_variance, t, shape),
            extract(schedule.posterior_log_variance_clipped, t, shape))


def p_mean_variance(schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array, *,
                    mean_type: str, var_type: str, clip_denoised: bool = True,
                    denoised_fn=None) -> MeanVariance:
    """p(x_{t-1} | x_t) from the network's output.

    Args:
      schedule: the (respaced) schedule.
      model_output: `[B, H, W, C]`, or `[B, H, W, 2C]` for learned variances
        (mean part first, then the variance values).
      x_t: `[B, H, W, C]`.
      t: int32 `[B]`.
      mean_type: what the mean part predicts: "epsilon", "start_x", "previous_x",
        or "v" (v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, Salimans & Ho 2022).
      var_type: "fixed_small", "fixed_large", "learned", "learned_range".
      clip_denoised: clamp pred_xstart to [-1, 1] before forming the mean.
      denoised_fn: optional map applied to pred_xstart before clipping.

    Returns:
      MeanVariance(mean, variance, log_variance, pred_xstart), all `[B, H, W, C]`.
    """
    check_mean_type(mean_type)
    mean_part, var_values = split_model_output(model_output, x_t, var_type)
    shape = x_t.shape
    variance, log_variance = model_variance(schedule, var_values, t, shape, var_type=var_type)

    def process_xstart(x):
        if denoised_fn is not None:
            x = denoised_fn(x)
        return jnp.clip(x, -1, 1) if clip_denoised else x

    if mean_type == "previous_x":
        pred_xstart = process_xstart(predict_xstart_from_xprev(schedule, x_t, t, mean_part))
        mean = mean_part
    else:
        if mean_type == "start_x":
            pred_xstart = process_xstart(mean_part)
        elif mean_type == "v":
            pred_xstart = process_xstart(predict_xstart_from_v(schedule, x_t, t, mean_part))
        else:
            pred_xstart = process_xstart(predict_xstart_from_eps(schedule, x_t, t, mean_part))
        mean = q_posterior(schedule, pred_xstart, x_t, t).mean
    return MeanVariance(mean, variance, log_variance, pred_xstart)


def _check_same_shape(a: jax.Array, b: jax.Array, name_a: str, name_b: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; they must match")
