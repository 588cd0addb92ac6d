"""Conditioning inputs derived from training images: low-resolution copies and inpainting masks.

* `area_downsample(images, size)`: the super-resolution model's `low_res`
  input, PyTorch's `F.interpolate(x, size, mode="area")` (adaptive average
  pooling), which guided-diffusion's `super_res_train.py` applies to each
  training batch. Works on NumPy (host batches) and JAX arrays.
* `inpaint_masks(key, example_ids, height, width)`: GLIDE's inpainting
  fine-tuning erases random regions of each training example and feeds the
  rest with a mask channel. The paper does not publish its mask
  distribution; ours erases one random axis-aligned rectangle per example
  (each side uniform in [ceil(min_frac * side), side], position uniform), so
  every mask from "erase a strip" to "erase everything" (plain generation)
  occurs. Masks are a pure function of (key, global example index), like every
  other random draw in training.

Mask convention (GLIDE): 1 keeps the given pixel, 0 marks the region to generate.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# fold_in constant that separates the mask stream from the per-step stream
# fold_in(rng, step): "mask" in ASCII, far beyond any step count.
MASK_STREAM = 0x6D61736B


def area_weights(in_size: int, out_size: int) -> np.ndarray:
    """float64 `[out_size, in_size]` averaging matrix of adaptive average pooling.

    Row i averages input cells [floor(i * in / out), ceil((i + 1) * in / out)),
    the windows of `torch.nn.functional.adaptive_avg_pool1d` (= `interpolate(mode="area")`).
    """
    if not 0 < out_size <= in_size:
        raise ValueError(f"area downsampling needs 0 < out_size <= in_size, got {out_size} from {in_size}")
    w = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        lo, hi = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
        w[i, lo:hi] = 1.0 / (hi - lo)
    return w


def area_downsample(images, size: int | tuple[int, int]):
    """Area-downsampled copies, as OpenAI's `F.interpolate(images, size, mode="area")`.

    Args:
      images: float `[B, H, W, C]` (NumPy or JAX).
      size: output side `s` (square) or `(h, w)`, each at most the input's.

    Returns:
      float32 `[B, h, w, C]`, same array library as `images`. With integer
      factors (H = f * h) each output pixel is the mean of an f x f block.
    """
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    rows = area_weights(images.shape[1], h).astype(np.float32)
    cols = area_weights(images.shape[2], w).astype(np.float32)
    xp = np if isinstance(images, np.ndarray) else jnp
    x = xp.asarray(images, xp.float32)
    return xp.einsum("ih,bhwc,jw->bijc", rows, x, cols).astype(xp.float32)


def inpaint_mask(key: jax.Array, height: int, width: int, *, min_frac: float = 0.25) -> jax.Array:
    """One random inpainting mask `[H, W, 1]` float32: 0 inside an erased rectangle, 1 elsewhere.

    The rectangle's height is uniform in [ceil(min_frac * H), H] (width likewise)
    and its top-left corner uniform over the positions where it fits.
    """
    kh, kw, ky, kx = jax.random.split(key, 4)
    h = jax.random.randint(kh, (), max(1, math.ceil(min_frac * height)), height + 1)
    w = jax.random.randint(kw, (), max(1, math.ceil(min_frac * width)), width + 1)
    top = jax.random.randint(ky, (), 0, height - h + 1)
    left = jax.random.randint(kx, (), 0, width - w + 1)
    r, c = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    erased = (r >= top) & (r < top + h) & (c >= left) & (c < left + w)
    return jnp.where(erased, 0.0, 1.0).astype(jnp.float32)[..., None]


def inpaint_masks(key: jax.Array, example_ids: jax.Array, height: int, width: int, *,
                  min_frac: float = 0.25) -> jax.Array:
    """Masks `[B, H, W, 1]` for global example indices `[B]`: mask i = `inpaint_mask(fold_in(key, ids[i]))`.

    `key` is the training run's base key (`fold_in(rng, MASK_STREAM)` of the
    step key's parent), so a mask depends on (seed, global example index) only:
    not on the device count, microbatching or where a resumed run restarts.
    """
    ids = jnp.asarray(example_ids, jnp.uint32)
    return jax.vmap(lambda i: inpaint_mask(jax.random.fold_in(key, i), height, width, min_frac=min_frac))(ids)
