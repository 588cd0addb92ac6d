"""Inpainting as a sampling transform: keep the known region of every x0 prediction.

GLIDE (Nichol et al. 2022, glide-text2im `notebooks/inpaint.ipynb`) samples its
inpainting models with the ordinary ancestral loop plus a `denoised_fn` that,
at every step, overwrites the known region of the model's x0 prediction with
the given pixels, before clipping and before the posterior mean is formed:

    pred_xstart <- pred_xstart * (1 - mask) + image * mask        (mask: 1 = known)

x_t itself is not replaced. At the last step (t = 0) the posterior mean is
pred_xstart exactly (coef1 = 1, coef2 = 0, no noise), and DDIM's last step
returns pred_xstart as well (alpha_bar_prev = 1), so the known pixels come out
unchanged. The network additionally receives `image * mask` and `mask` as
input channels (`models.glide.InpaintText2ImUNet`); that part is the model
function's business, not this transform's.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def replace_known(pred_xstart: jax.Array, inpaint_image: jax.Array, inpaint_mask: jax.Array) -> jax.Array:
    """`pred_xstart * (1 - mask) + image * mask` (GLIDE's inpainting `denoised_fn`).

    Args:
      pred_xstart: `[B, H, W, C]` the model's x0 prediction.
      inpaint_image: `[B, H, W, C]` (or broadcastable) the given pixels in [-1, 1].
      inpaint_mask: `[B, H, W, 1]` (or broadcastable) 1 where the pixel is known, 0 where generated;
        values must be 0 or 1 for the known pixels to be kept exactly.

    Returns:
      `[B, H, W, C]` float32.
    """
    mask = jnp.asarray(inpaint_mask, jnp.float32)
    return (jnp.asarray(pred_xstart, jnp.float32) * (1.0 - mask)
            + jnp.asarray(inpaint_image, jnp.float32) * mask)


def known_region_fn(inpaint_image: jax.Array, inpaint_mask: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """A `denoised_fn` for `sampling.p_sample_loop` / `ddim_sample_loop`: `replace_known` with these inputs.

    Args:
      inpaint_image: `[B, H, W, C]` the given pixels in [-1, 1] (batch B of the sampled x).
      inpaint_mask: `[B, H, W, 1]` 1 = known, 0 = generated.
    """
    return lambda pred_xstart: replace_known(pred_xstart, inpaint_image, inpaint_mask)
