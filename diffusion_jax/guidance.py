"""Guidance as transforms of the model function and gradient functions.

* `classifier_free` (Ho & Salimans 2021; GLIDE's notebooks): one doubled
  forward pass, eps <- eps(null) + s * (eps(y) - eps(null)) on the eps channels.
* `classifier_cond_fn` (Dhariwal & Nichol 2021): s * grad_x log p(y | x_t, t),
  to pass as `cond_fn` to any sampler in `diffusion_jax.sampling`.
* `clip_cond_fn` (GLIDE, Nichol et al. 2021): s * grad_x of the noised-CLIP
  logit of x_t with its caption, passed the same way.

Both are pure functions of arrays and compose: `p_sample_loop(rng,
classifier_free(model_fn, 3.0, null_label=1000), ..., cond_fn=classifier_cond_fn(clf, 1.0))`.
Labels `y` may be an int array `[B]` or a pytree whose leaves lead with B
(GLIDE: `{"tokens": [B, L], "mask": [B, L]}`); a null label is then one row
of the same structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
ClassifierFn = Callable[[jax.Array, jax.Array], jax.Array]


def null_labels(null_label, batch: int, like=None):
    """`null_label` (an int or one row of a pytree) broadcast to `[batch, ...]`.

    Args:
      null_label: the "no condition" value: an int class index, or a pytree of
        per-example rows (e.g. `{"tokens": [L], "mask": [L]}`).
      batch: B.
      like: optional labels of the same structure; leaves take their dtypes.

    Returns:
      A pytree like `null_label` whose leaves have a leading batch axis.
    """
    if like is None:
        return jax.tree.map(lambda n: jnp.broadcast_to(jnp.asarray(n), (batch,) + jnp.shape(n)), null_label)
    return jax.tree.map(
        lambda n, v: jnp.broadcast_to(jnp.asarray(n, dtype=jnp.asarray(v).dtype), (batch,) + jnp.shape(n)),
        null_label, like)


def _eps_channels(x: jax.Array, out: jax.Array, eps_channels: int | None) -> int:
    c_in, c_out = x.shape[-1], out.shape[-1]
    if eps_channels is not None:
        if not 0 < eps_channels <= c_out:
            raise ValueError(f"eps_channels={eps_channels} but the model returns {c_out} channels")
        return eps_channels
    if c_out in (c_in, 2 * c_in):  # eps only, or eps then learned-variance values.
        return c_in
    raise ValueError(
        f"cannot tell which of the model's {c_out} output channels are eps (x has {c_in}); pass eps_channels")


def classifier_free(model_fn: ModelFn, scale: float, *, null_label, eps_channels: int | None = None) -> ModelFn:
    """Classifier-free guidance as a model function (Ho & Salimans 2021, Eq. 6).

    Runs `model_fn` once on `[x; x]`, `[t; t]`, `[y; null]` (batch 2B) and returns
    `[B, ...]` with eps_hat = eps(null) + scale * (eps(y) - eps(null)) on the
    first `eps_channels` channels; the remaining (learned-variance) channels
    come from the conditional half, as in GLIDE.  scale = 1 is the conditional
    model, scale = 0 the unconditional one.

    Args:
      model_fn: `(x [B,H,W,C], timesteps [B], y) -> [B,H,W,C or 2C]`.
      scale: guidance scale s (a Python float or a traced scalar).
      null_label: the null class index (`num_classes` for our models with
        `null_label=True`), or one row of `y`'s pytree structure (GLIDE's empty
        caption: end tokens with mask all False).
      eps_channels: how many leading output channels are eps; default C when
        the model returns C or 2C channels for C-channel x.

    Returns:
      A model function with the same signature; `y` must not be None.
    """
    def guided(x, timesteps, y):
        if y is None:
            raise ValueError("classifier_free guidance needs labels y (the conditional half)")
        b = x.shape[0]
        null = null_labels(null_label, b, like=y)
        y2 = jax.tree.map(lambda a, n: jnp.concatenate([jnp.asarray(a), n], axis=0), y, null)
        out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([timesteps, timesteps], axis=0), y2)
        cond, uncond = out[:b], out[b:]
        c = _eps_channels(x, out, eps_channels)
        cond_eps, uncond_eps = cond[..., :c], uncond[..., :c]
        half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
        return jnp.concatenate([half_eps, cond[..., c:]], axis=-1)

    return guided


def unconditional(model_fn: ModelFn, *, null_label) -> ModelFn:
    """Sample a class-conditional (null-label-trained) model unconditionally.

    The returned model function ignores its `y` and feeds the null label to
    every example, so it can be used with `y=None`.
    """
    def uncond(x, timesteps, y=None):
        del y
        return model_fn(x, timesteps, null_labels(null_label, x.shape[0]))

    return uncond


def classifier_cond_fn(classifier_fn: ClassifierFn, scale: float) -> Callable:
    """Classifier guidance gradient (Dhariwal & Nichol 2021, Alg. 1 and 2).

    cond_fn(x, timesteps, y) = scale * d/dx sum_i log_softmax(classifier_fn(x, timesteps))[i, y_i];
    the sum makes it per-example since examples do not interact.  Pass it as
    `cond_fn` to `p_sample` (mean shift) or `ddim_sample` (score shift).

    Args:
      classifier_fn: `(x [B,H,W,C], timesteps [B]) -> logits [B, num_classes]`.
      scale: the classifier scale s.

    Returns:
      `cond_fn(x, timesteps, y [B] int) -> [B, H, W, C]` float32.
    """
    def cond_fn(x, timesteps, y):
        if y is None:
            raise ValueError("classifier guidance needs class labels y [B]")
        y = jnp.asarray(y)

        def log_p(x_in):
            logits = classifier_fn(x_in, timesteps).astype(jnp.float32)
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            return jnp.sum(jnp.take_along_axis(log_probs, y[:, None].astype(jnp.int32), axis=-1))

        return jax.grad(log_p)(x.astype(jnp.float32)) * scale

    return cond_fn


def clip_cond_fn(image_fn: ClassifierFn, text_embeddings: jax.Array, scale: float, *,
                 logit_scale: float = 100.0) -> Callable:
    """CLIP guidance gradient (Nichol et al. 2021, GLIDE Sec. 2.4, Eq. 3 with a noised CLIP).

    cond_fn(x, timesteps) = scale * d/dx logit_scale * sum_i <t_i / (|t_i| + 1e-12), f_i / (|f_i| + 1e-12)>
    with f = image_fn(x, timesteps) and t = text_embeddings: the CLIP logit of
    each image with its own caption, as glide-text2im's ``CLIPModel.cond_fn``.
    Pass it as `cond_fn` to any sampler, like `classifier_cond_fn`.

    Args:
      image_fn: `(x [B,H,W,C] in [-1, 1], timesteps [B]) -> raw image embedding [B, D]`
        (e.g. `lambda x, t: clip_image.apply({'params': p}, x, t)`). It receives
        the sampler's model timesteps: GLIDE's noised CLIP indexes a table by the
        original timestep, so use a schedule without `rescale_timesteps`.
      text_embeddings: raw text embeddings `[B, D]` (or `[1, D]` / `[D]`, broadcast); another
        row count raises a ValueError naming both shapes (at trace time).
      scale: the guidance scale s.
      logit_scale: CLIP's logit scale (exp of its learned temperature; 100 in GLIDE).

    Returns:
      `cond_fn(x, timesteps, y=None) -> [B, H, W, C]` float32; `y` is ignored.
    """
    text = jnp.asarray(text_embeddings, jnp.float32)
    text = text / (jnp.linalg.norm(text, axis=-1, keepdims=True) + 1e-12)

    def cond_fn(x, timesteps, y=None):
        del y

        def logit(x_in):
            z = image_fn(x_in, timesteps).astype(jnp.float32)
            if text.ndim == 2 and text.shape[0] not in (1, z.shape[0]):
                raise ValueError(
                    f"CLIP guidance got {text.shape[0]} text embeddings {text.shape} for a batch of {z.shape[0]} "
                    f"images {x.shape}: pass one prompt per image ([{z.shape[0]}, {text.shape[1]}]) or a single "
                    "prompt for all ([1, D] / [D]), e.g. the prompt list repeated to the batch size")
            z = z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-12)
            return logit_scale * jnp.sum(jnp.broadcast_to(text, z.shape) * z)

        return jax.grad(logit)(x.astype(jnp.float32)) * scale

    return cond_fn


def drop_labels(rng: jax.Array, labels: jax.Array, p_uncond: float, *, null_label: int) -> jax.Array:
    """Replace each label by `null_label` with probability p_uncond (CFG training).

    Args:
      rng: a key.
      labels: int `[B]`.
      p_uncond: drop probability.
      null_label: the null class index.

    Returns:
      int `[B]` labels.
    """
    drop = jax.random.bernoulli(rng, p_uncond, labels.shape)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)
