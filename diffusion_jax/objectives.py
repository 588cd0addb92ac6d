"""Training losses and timestep samplers (Nichol & Dhariwal 2021, Sec. 3).

`training_losses` takes the network's output array, so it stays a pure
function of arrays; the caller runs the network on `q_sample(x_0, t, noise)`.
The timestep samplers are pure, jit-able state pytrees that the train step
keeps on device and checkpoints save.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import gaussian, likelihood
from diffusion_jax.schedules import Schedule

LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
SAMPLER_NAMES = ("uniform", "loss-second-moment")


class LossTerms(NamedTuple):
    """Per-example `[B]` loss terms; `mse`/`vb` are zeros where a loss has none."""

    loss: jax.Array
    mse: jax.Array
    vb: jax.Array


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; accepted: {', '.join(LOSS_TYPES)}")


def vb_weight(loss_type: str, num_timesteps: int) -> float:
    """The factor OpenAI puts on the per-step vb term (bits/dim) in each loss.

    With L_vlb = sum_t L_t ~ K * L_t, the hybrid loss L_simple + lambda L_vlb
    has lambda = weight / K: "rescaled_mse" gives weight K / 1000 (lambda =
    0.001, the paper's value), "mse" gives weight 1 (lambda = 1 / K),
    "rescaled_kl" gives K (the full bound), "kl" gives 1.
    """
    check_loss_type(loss_type)
    return {"mse": 1.0, "rescaled_mse": num_timesteps / 1000.0, "kl": 1.0,
            "rescaled_kl": float(num_timesteps)}[loss_type]


def hybrid_lambda(loss_type: str, num_timesteps: int) -> float:
    """lambda in L_hybrid = L_simple + lambda * L_vlb implied by `loss_type`."""
    return vb_weight(loss_type, num_timesteps) / num_timesteps


def training_losses(schedule: Schedule, model_output: jax.Array, x_start: jax.Array, x_t: jax.Array,
                    t: jax.Array, noise: jax.Array, *, mean_type: str, var_type: str, loss_type: str,
                    vb_scale: float | None = None, snr_gamma: float = 0.0) -> LossTerms:
    """Per-example training losses for one batch (OpenAI's `training_losses`).

    Args:
      schedule: the (respaced) schedule; K = schedule.num_timesteps.
      model_output: network output at (x_t, model_timesteps(t)), `[B,H,W,C]`
        or `[B,H,W,2C]` for learned variances.
      x_start: data `[B, H, W, C]` in [-1, 1].
      x_t: q_sample(schedule, x_start, t, noise).
      t: int32 `[B]`.
      noise: the noise x_t was drawn with.
      mean_type, var_type: the model's parameterisation.
      loss_type: "mse" / "rescaled_mse" (L_simple, plus the vb term with
        learned variances: L_hybrid), "kl" / "rescaled_kl" (L_vlb).
      vb_scale: override the factor on the vb term (see `vb_weight`).
      snr_gamma: min-SNR-gamma weighting of the MSE term (Hang et al. 2023);
        0 keeps it off (OpenAI's loss), a typical value is 5.  See
        `min_snr_weight`; the vb term is not reweighted.

    Returns:
      LossTerms(loss, mse, vb) with loss = mse + vb (or vb alone for the KL
      types); `mse` is the (min-SNR weighted) MSE term.  For MSE types the vb
      term sees the mean part through a stop-gradient, so it trains only the
      variance (Sec. 3.1).
    """
    check_loss_type(loss_type)
    gaussian.check_mean_type(mean_type)
    _check_snr_gamma(snr_gamma, mean_type)
    mean_part, var_values = gaussian.split_model_output(model_output, x_t, var_type)
    weight = vb_weight(loss_type, schedule.num_timesteps) if vb_scale is None else vb_scale
    zeros = jnp.zeros(x_t.shape[:1], jnp.float32)
    if loss_type in ("kl", "rescaled_kl"):
        vb, _ = likelihood.vb_terms_bpd(schedule, model_output, x_start, x_t, t, mean_type=mean_type,
                                        var_type=var_type, clip_denoised=False)
        return LossTerms(loss=vb * weight, mse=zeros, vb=vb)
    if var_values is not None:
        frozen_out = jnp.concatenate([jax.lax.stop_gradient(mean_part), var_values], axis=-1)
        vb, _ = likelihood.vb_terms_bpd(schedule, frozen_out, x_start, x_t, t, mean_type=mean_type,
                                        var_type=var_type, clip_denoised=False)
        vb = vb * weight
    else:
        vb = zeros
    if mean_type == "previous_x":
        target = gaussian.q_posterior(schedule, x_start, x_t, t).mean
    elif mean_type == "start_x":
        target = x_start
    elif mean_type == "v":
        target = gaussian.predict_v(schedule, x_start, t, noise)
    else:
        target = noise
    mse = likelihood.mean_flat((target - mean_part) ** 2)
    if snr_gamma > 0:
        mse = mse * min_snr_weight(snr(schedule, t), snr_gamma, mean_type)
    return LossTerms(loss=mse + vb, mse=mse, vb=vb)


# ----------------------------------------------------------------------------
# Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training
# via Min-SNR Weighting Strategy", Sec. 3.4).

MIN_SNR_MEAN_TYPES = ("epsilon", "start_x", "v")


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """SNR(t) = abar_t / (1 - abar_t) of the (respaced) schedule, `[B]` float32."""
    return (jnp.asarray(schedule.alphas_cumprod)[t].astype(jnp.float32)
            / jnp.asarray(schedule.one_minus_alphas_cumprod)[t].astype(jnp.float32))


def min_snr_weight(snr_t: jax.Array, gamma: float, mean_type: str) -> jax.Array:
    """Per-example weight of the MSE term under min-SNR-gamma (Hang et al. 2023, Eq. 12).

    The x_0-space weight min(SNR, gamma) expressed in each parameterisation's
    own MSE.  At fixed x_t, ||eps - eps_hat||^2 = SNR ||x_0 - x_0_hat||^2 and
    ||v - v_hat||^2 = (SNR + 1) ||x_0 - x_0_hat||^2, so the weights are
    min(SNR, gamma) for "start_x", min(SNR, gamma) / SNR for "epsilon" and
    min(SNR, gamma) / (SNR + 1) for "v".  gamma = 0 means off: weight 1.

    Args:
      snr_t: SNR `[B]` (any shape), e.g. `snr(schedule, t)`.
      gamma: the clamp gamma >= 0.
      mean_type: "epsilon", "start_x" or "v".

    Returns:
      Weights with the shape of `snr_t`.

    Raises:
      ValueError: gamma < 0 or a mean type without a min-SNR weight.
    """
    _check_snr_gamma(gamma, mean_type)
    snr_t = jnp.asarray(snr_t)
    if gamma == 0:
        return jnp.ones_like(snr_t)
    clamped = jnp.minimum(snr_t, gamma)
    if mean_type == "start_x":
        return clamped
    if mean_type == "v":
        return clamped / (snr_t + 1)
    return clamped / snr_t


def _check_snr_gamma(gamma: float, mean_type: str) -> None:
    if gamma < 0:
        raise ValueError(f"snr_gamma must be >= 0 (0 turns min-SNR weighting off, 5 is the paper's value), got {gamma}")
    if gamma > 0 and mean_type not in MIN_SNR_MEAN_TYPES:
        raise ValueError(f"min-SNR weighting (snr_gamma={gamma}) is defined for mean_type in "
                         f"{', '.join(MIN_SNR_MEAN_TYPES)}, not {mean_type!r}; set snr_gamma=0")


# ----------------------------------------------------------------------------
# Timestep samplers.  Both return (t [B] int32, weights [B] float32) with
# weights = 1 / (K p(t)), so mean(weights * loss) is unbiased for the uniform
# average over t.


class UniformState(NamedTuple):
    """The uniform sampler has no state; an empty pytree keeps one interface."""


class LossHistory(NamedTuple):
    """Loss-second-moment state: the last `history_per_term` losses per t."""

    loss_history: jax.Array  # float32 [K, history_per_term]
    loss_counts: jax.Array  # int32 [K]


@dataclasses.dataclass(frozen=True)
class UniformSampler:
    """t ~ U{0, ..., K-1}, weights 1."""

    num_timesteps: int

    def init(self) -> UniformState:
        return UniformState()

    def weights(self, state: UniformState) -> jax.Array:
        del state
        return jnp.ones((self.num_timesteps,), jnp.float32)

    def update(self, state: UniformState, t: jax.Array, losses: jax.Array) -> UniformState:
        del t, losses
        return state

    def sample(self, state: UniformState, rng: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
        return _sample_from_weights(self.weights(state), rng, batch_size)


@dataclasses.dataclass(frozen=True)
class LossSecondMomentSampler:
    """OpenAI's `LossSecondMomentResampler`: p(t) ∝ sqrt(E[L_t^2]).

    Uniform until every t holds `history_per_term` losses; then mixed with
    `uniform_prob` of the uniform distribution (Sec. 3.3, Nichol & Dhariwal).
    """

    num_timesteps: int
    history_per_term: int = 10
    uniform_prob: float = 0.001

    def init(self) -> LossHistory:
        return LossHistory(
            loss_history=jnp.zeros((self.num_timesteps, self.history_per_term), jnp.float32),
            loss_counts=jnp.zeros((self.num_timesteps,), jnp.int32),
        )

    def warmed_up(self, state: LossHistory) -> jax.Array:
        return jnp.all(state.loss_counts == self.history_per_term)

    def weights(self, state: LossHistory) -> jax.Array:
        """Sampling weights `[K]` (unnormalised ones until warm)."""
        w = jnp.sqrt(jnp.mean(state.loss_history ** 2, axis=-1))
        w = w / jnp.sum(w)
        w = w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return jnp.where(self.warmed_up(state), w, jnp.ones_like(w))

    def update(self, state: LossHistory, t: jax.Array, losses: jax.Array) -> LossHistory:
        """Record `losses` `[N]` at timesteps `t` `[N]` in order, as OpenAI does.

        A full row shifts out its oldest loss; repeated t within one batch are
        applied one after another, so the result matches the sequential loop.
        """
        h = self.history_per_term

        def record(carry, tl):
            hist, counts = carry
            ti, loss = tl
            row, n = hist[ti], counts[ti]
            full = n == h
            shifted = jnp.concatenate([row[1:], loss[None]])
            appended = row.at[jnp.minimum(n, h - 1)].set(loss)
            hist = hist.at[ti].set(jnp.where(full, shifted, appended))
            counts = counts.at[ti].set(jnp.where(full, n, n + 1))
            return (hist, counts), None

        (hist, counts), _ = jax.lax.scan(
            record, (state.loss_history, state.loss_counts),
            (jnp.asarray(t, jnp.int32), jnp.asarray(losses, jnp.float32)))
        return LossHistory(hist, counts)

    def sample(self, state: LossHistory, rng: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
        return _sample_from_weights(self.weights(state), rng, batch_size)


def _sample_from_weights(w: jax.Array, rng: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    p = w / jnp.sum(w)
    t = jax.random.choice(rng, p.shape[0], shape=(batch_size,), p=p).astype(jnp.int32)
    return t, (1.0 / (p.shape[0] * p[t])).astype(jnp.float32)


def make_timestep_sampler(name: str, num_timesteps: int):
    """"uniform" or "loss-second-moment" (OpenAI's `--schedule_sampler` names)."""
    samplers = {"uniform": UniformSampler, "loss-second-moment": LossSecondMomentSampler}
    if name not in samplers:
        raise ValueError(f"unknown schedule sampler {name!r}; accepted: {', '.join(SAMPLER_NAMES)}")
    return samplers[name](num_timesteps)


class ClipLoss(NamedTuple):
    """Symmetric InfoNCE terms (`clip_contrastive_loss`); all float32 scalars."""

    loss: jax.Array  # (image_loss + text_loss) / 2
    image_loss: jax.Array  # cross-entropy of each image over the batch's captions
    text_loss: jax.Array  # cross-entropy of each caption over the batch's images
    accuracy: jax.Array  # fraction of images whose best caption is their own


def clip_contrastive_loss(image_embeddings: jax.Array, text_embeddings: jax.Array,
                          logit_scale: jax.Array | float) -> ClipLoss:
    """CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3) on raw embeddings.

    With f_i = image_i / |image_i|, g_j = text_j / |text_j| (the norms get
    +1e-12, as `guidance.clip_cond_fn` normalises) and logits
    L_ij = logit_scale * <f_i, g_j>, pair i is the positive of row i and of
    column i:  loss = (CE(L, diag) + CE(L^T, diag)) / 2, each averaged over B.

    Args:
      image_embeddings: `[B, D]` (GLIDE: the noised image tower at x_t, t).
      text_embeddings: `[B, D]`, row i the caption of image i.
      logit_scale: the temperature multiplier exp(s) (a scalar; learned or fixed).

    Returns:
      `ClipLoss(loss, image_loss, text_loss, accuracy)`.
    """
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.ndim != 2:
        raise ValueError(f"expected image and text embeddings of one shape [B, D]; got {image_embeddings.shape} "
                         f"and {text_embeddings.shape}")
    f = image_embeddings.astype(jnp.float32)
    g = text_embeddings.astype(jnp.float32)
    f = f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-12)
    g = g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-12)
    logits = jnp.asarray(logit_scale, jnp.float32) * (f @ g.T)
    diag = jnp.arange(logits.shape[0])
    image_loss = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[diag, diag])
    text_loss = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[diag, diag])
    accuracy = jnp.mean((jnp.argmax(logits, axis=1) == diag).astype(jnp.float32))
    return ClipLoss((image_loss + text_loss) / 2, image_loss, text_loss, accuracy)
