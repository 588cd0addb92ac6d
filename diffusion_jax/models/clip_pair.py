"""A noised CLIP pair trained from scratch: GLIDE's image tower, a text tower and a logit scale.

``ClipPair`` holds the two towers of ``models.clip`` (Nichol et al. 2021, Sec. 2.4
and App. C) under the names ``image`` and ``text`` plus CLIP's learned log
temperature ``logit_scale`` (Radford et al. 2021, Sec. 2.5: initialised to
log(1 / 0.07), the scale exp(.) clipped at 100). ``params["image"]`` is an
``ImageEncoder`` parameter tree, so the image tower is usable on its own, like
the released GLIDE CLIP's.

Grey images (``image_channels == 1``) are repeated to three channels before the
tower, so ``x`` keeps the diffusion model's channel count and CLIP guidance's
gradient w.r.t. ``x`` is the sum of the three colour channels' gradients.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.clip import ImageEncoder, TextEncoder

MAX_LOGIT_SCALE = 100.0  # CLIP clips exp(logit_scale) at 100.


class ClipPair(nn.Module):
    """Noised image tower + text tower + learned logit scale (fields are the towers' fields).

    Attributes:
      image_size, patch_size: the image tower's input side and patch side.
      image_channels: channels of ``x`` (1: grey, repeated to RGB; 3: RGB).
      n_embd: the shared embedding width.
      n_head_image, n_xf_blocks_image / n_head_text, n_xf_blocks_text: tower sizes.
      n_head_state: channels per head (width = heads * n_head_state).
      n_timestep: the diffusion length T the timestep table covers.
      n_vocab, text_ctx: token ids and tokens per caption of the text tower.
    """

    image_size: int = 8
    patch_size: int = 2
    image_channels: int = 3
    n_embd: int = 64
    n_head_image: int = 2
    n_xf_blocks_image: int = 2
    n_head_text: int = 2
    n_xf_blocks_text: int = 2
    n_head_state: int = 32
    n_timestep: int = 1000
    n_vocab: int = 257
    text_ctx: int = 48
    dtype: str = "float32"
    kernels: str = "auto"

    def setup(self):
        if self.image_channels not in (1, 3):
            raise ValueError(f"image_channels must be 1 (grey) or 3 (RGB), got {self.image_channels}")
        self.image = ImageEncoder(self.image_size, self.patch_size, self.n_embd, self.n_head_image,
                                  self.n_xf_blocks_image, self.n_head_state, self.n_timestep, self.dtype, self.kernels)
        self.text = TextEncoder(self.n_vocab, self.text_ctx, self.n_embd, self.n_head_text, self.n_xf_blocks_text,
                                self.n_head_state, self.dtype, self.kernels)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), (), jnp.float32)

    def encode_image(self, x: jax.Array, timesteps: jax.Array) -> jax.Array:
        """x_t [B, S, S, image_channels] in [-1, 1], original timesteps t [B] -> raw embedding [B, n_embd]."""
        if x.ndim != 4 or x.shape[-1] != self.image_channels:
            raise ValueError(f"expected x [B, {self.image_size}, {self.image_size}, {self.image_channels}], "
                             f"got {x.shape}")
        if self.image_channels == 1:
            x = jnp.repeat(x, 3, axis=-1)
        return self.image(x, timesteps)

    def encode_text(self, tokens: jax.Array, lens: jax.Array) -> jax.Array:
        """tokens [B, text_ctx] int32, lens [B] (read at position lens - 1) -> raw embedding [B, n_embd]."""
        return self.text(tokens, lens)

    def scale(self) -> jax.Array:
        """exp(logit_scale) clipped at 100: the temperature of the contrastive logits (float32 scalar)."""
        return jnp.minimum(jnp.exp(self.logit_scale), MAX_LOGIT_SCALE)

    def __call__(self, x: jax.Array, timesteps: jax.Array, tokens: jax.Array, lens: jax.Array):
        """(image embeddings [B, n_embd], text embeddings [B, n_embd], logit scale ()) , all raw."""
        return self.encode_image(x, timesteps), self.encode_text(tokens, lens), self.scale()
