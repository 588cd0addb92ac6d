"""Variational-bound terms in bits/dim: Gaussian KLs, the discretized decoder.

The definitions are OpenAI's (`losses.py`, `_vb_terms_bpd`, `_prior_bpd`,
`calc_bpd_loop`): the decoder uses the tanh-approximate normal CDF with
256 bins of half-width 1/255 on data in [-1, 1], every probability is floored
at 1e-12, and every term is averaged over pixels and divided by log 2.  The
CDF differences are evaluated in a cancellation-free form of the same
function, so float32 results agree with OpenAI's float64 maths to float32
precision even in the tails (where OpenAI's own float32 run is nats off).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import chain, gaussian
from diffusion_jax.schedules import Schedule


class BpdTerms(NamedTuple):
    """Per-timestep terms of `calc_bpd_loop`, each `[B]`."""

    vb: jax.Array  # L_{t-1} in bits/dim (the decoder NLL L_0 at t = 0)
    xstart_mse: jax.Array  # mean((pred_xstart - x_0)^2)
    mse: jax.Array  # mean((eps(pred_xstart) - noise)^2), eps from the clipped x_0


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all non-batch axes: `[B, ...] -> [B]`."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats.

    All arguments broadcast (Python scalars allowed).
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2))


def _cdf_arg(x):
    # 2u with u = sqrt(2/pi) (x + 0.044715 x^3), the argument of OpenAI's tanh form.
    return 2.0 * np.sqrt(2.0 / np.pi) * (x + 0.044715 * jnp.power(x, 3))


def approx_standard_normal_cdf(x):
    """OpenAI's tanh approximation of the standard normal CDF.

    0.5 (1 + tanh(u)) is evaluated as the identical sigmoid(2u): in float32
    the tanh form cancels catastrophically in the lower tail (and XLA's tanh
    saturates to -1 beyond |u| ~ 7.9), the sigmoid form does not.
    """
    return jax.nn.sigmoid(_cdf_arg(x))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood (nats) of uint8 images under a discretized Gaussian.

    Args:
      x: targets in [-1, 1] that were uint8 values mapped by v / 127.5 - 1.
      means: Gaussian means, same shape.
      log_scales: log standard deviations, same shape.

    Returns:
      Elementwise log probabilities; the edge bins extend to -inf / +inf and
      every probability is floored at 1e-12 before the log.
    """
    x = jnp.asarray(x)
    if jnp.shape(x) != jnp.shape(means) or jnp.shape(x) != jnp.shape(log_scales):
        raise ValueError(
            f"x {jnp.shape(x)}, means {jnp.shape(means)} and log_scales {jnp.shape(log_scales)} must have one shape"
        )
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    plus_arg = _cdf_arg(inv_stdv * (centered_x + 1.0 / 255.0))
    min_arg = _cdf_arg(inv_stdv * (centered_x - 1.0 / 255.0))
    cdf_plus = jax.nn.sigmoid(plus_arg)
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    # 1 - cdf(min) = sigmoid(-arg), without the cancellation of 1 - cdf.
    log_one_minus_cdf_min = jnp.log(jnp.maximum(jax.nn.sigmoid(-min_arg), 1e-12))
    # The bin mass as a difference of lower-tail CDFs when the bin lies above
    # the mean (upper-tail complements there), so float32 keeps its digits.
    upper = min_arg > 0
    cdf_delta = jnp.where(upper, jax.nn.sigmoid(-min_arg) - jax.nn.sigmoid(-plus_arg),
                          cdf_plus - jax.nn.sigmoid(min_arg))
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))),
    )


def vb_terms_bpd(schedule: Schedule, model_output: jax.Array, x_start: jax.Array, x_t: jax.Array,
                 t: jax.Array, *, mean_type: str, var_type: str, clip_denoised: bool = True,
                 cond_fn: chain.CondFn | None = None, y=None) -> tuple[jax.Array, jax.Array]:
    """One term of the variational bound, in bits/dim.

    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder
    NLL -log p(x_0 | x_1) for t = 0 (Eq. 5 of Ho et al.; Sec. 2 of Nichol &
    Dhariwal).

    With `cond_fn` the bound is that of the classifier-guided chain
    (Dhariwal & Nichol 2021, Alg. 1): at every t, the decoder included, the
    model's mean is shifted to mean + Sigma * cond_fn(x_t, timesteps, y) by
    `chain.condition_mean`, the very function `sampling.p_sample` uses; the
    variance and pred_xstart are the model's.

    Args:
      cond_fn: optional `(x_t, model timesteps [B], y) -> s * grad log p(y | x_t)`
        (`guidance.classifier_cond_fn`); None: the unguided bound.
      y: the labels `cond_fn` receives.

    Returns:
      (bpd [B], pred_xstart [B, H, W, C]).
    """
    true = gaussian.q_posterior(schedule, x_start, x_t, t)
    out = gaussian.p_mean_variance(schedule, model_output, x_t, t, mean_type=mean_type,
                                   var_type=var_type, clip_denoised=clip_denoised)
    if cond_fn is not None:
        out = out._replace(mean=chain.condition_mean(schedule, cond_fn, out, x_t, t, y=y))
    kl = normal_kl(true.mean, true.log_variance, out.mean, out.log_variance)
    kl = mean_flat(kl) / np.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out.mean,
                                                       log_scales=0.5 * out.log_variance)
    decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl), out.pred_xstart


def prior_bpd(schedule: Schedule, x_start: jax.Array) -> jax.Array:
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim, `[B]`; not trainable."""
    t = jnp.full((x_start.shape[0],), schedule.num_timesteps - 1, jnp.int32)
    qt = gaussian.q_mean_variance(schedule, x_start, t)
    return mean_flat(normal_kl(qt.mean, qt.log_variance, 0.0, 0.0)) / np.log(2.0)


def bpd_terms(schedule: Schedule, model_output: jax.Array, x_start: jax.Array, x_t: jax.Array,
              t: jax.Array, noise: jax.Array, *, mean_type: str, var_type: str,
              clip_denoised: bool = True, cond_fn: chain.CondFn | None = None, y=None) -> BpdTerms:
    """The terms `calc_bpd_loop` records for one timestep, given x_t = q_sample(x_0, t, noise).

    `mse` compares `noise` with the eps re-derived from the (clipped)
    pred_xstart, not with the raw network output, as OpenAI does.  `cond_fn`
    / `y`: classifier guidance of the vb term (see `vb_terms_bpd`); it
    shifts the mean only, so `mse` and `xstart_mse` are the model's.
    """
    vb, pred_xstart = vb_terms_bpd(schedule, model_output, x_start, x_t, t, mean_type=mean_type,
                                   var_type=var_type, clip_denoised=clip_denoised, cond_fn=cond_fn, y=y)
    eps = gaussian.predict_eps_from_xstart(schedule, x_t, t, pred_xstart)
    return BpdTerms(vb=vb, xstart_mse=mean_flat((pred_xstart - x_start) ** 2),
                    mse=mean_flat((eps - noise) ** 2))


def total_bpd(vb: jax.Array, prior: jax.Array) -> jax.Array:
    """The full bound: sum over t of `vb` `[B, K]` plus the prior `[B]`."""
    return jnp.sum(vb, axis=1) + prior
