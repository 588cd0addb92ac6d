"""Noisy ImageNet classifier of guided-diffusion (``EncoderUNetModel``), NHWC.

The U-Net's input blocks and middle block (same parameter names as
``unet.UNet``), then a pooling head under ``out_*``:

  pool="adaptive"    out_0 GroupNorm32, SiLU, spatial mean, out_3 1x1 Conv (zero init)
  pool="attention"   out_0 GroupNorm32, SiLU, out_2 AttentionPool2d
                     (positional_embedding [HW+1, C], qkv_proj, c_proj)
  pool="spatial"     mean of every input/middle block output, out_0 Dense(2048), ReLU, out_2 Dense
  pool="spatial_v2"  same features, out_0 Dense(2048), out_1 GroupNorm32, SiLU, out_3 Dense
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers, unet
from diffusion_jax.models.kernels import resolve_kernels

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling (OpenAI ``AttentionPool2d``), new qkv order.

    Call: ``pool(x [B,H,W,C])`` -> ``[B, output_dim]``: the mean token is
    prepended, positional embeddings added, and the mean token's attention
    output projected by ``c_proj``.
    """

    spacial_dim: int
    num_head_channels: int
    output_dim: int
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if h != self.spacial_dim or w != self.spacial_dim:
            raise ValueError(
                f"AttentionPool2d expects {self.spacial_dim}x{self.spacial_dim}, got {h}x{w}"
            )
        heads = layers.attention_heads(c, 1, self.num_head_channels)
        pos = self.param(
            "positional_embedding",
            lambda k, s: jax.random.normal(k, s, jnp.float32) / c**0.5,
            (h * w + 1, c),
        )
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)
        x = x + pos.astype(x.dtype)[None]
        dense = {"dtype": self.dtype, "param_dtype": jnp.float32}
        qkv = nn.Dense(3 * c, name="qkv_proj", **dense)(x)
        x = layers.qkv_attention(qkv, heads, legacy=False, kernels=self.kernels)
        x = nn.Dense(self.output_dim, name="c_proj", **dense)(x)
        return x[:, 0]


class EncoderUNet(nn.Module):
    """Half U-Net classifier: ``apply({'params': p}, x, timesteps, train=False)``.

    Attributes mirror guided-diffusion's ``EncoderUNetModel`` (same defaults);
    ``attention_resolutions`` are downsample factors. Returns float32 logits
    ``[B, out_channels]`` for x ``[B, image_size, image_size, in_channels]``
    and ``timesteps`` ``[B]`` (int or float32). ``kernels`` as in ``unet.UNet``.
    """

    image_size: int
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 1000
    num_res_blocks: int = 2
    attention_resolutions: tuple = ()
    dropout: float = 0.0
    channel_mult: tuple = (1, 2, 4, 8)
    use_checkpoint: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1  # Accepted for OpenAI compatibility; unused.
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    pool: str = "adaptive"
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, timesteps, train: bool = False):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        resolve_kernels(self.kernels)
        unet.check_image(x, self.image_size, self.in_channels)
        unet.check_timesteps(timesteps, x.shape[0])
        emb = unet.time_embed(self, timesteps)
        h, hs = unet.down_path(self, x, emb, train)
        if self.pool.startswith("spatial"):
            feats = [jnp.mean(a.astype(jnp.float32), axis=(1, 2)) for a in hs + [h]]
            h = jnp.concatenate(feats, axis=-1)
            dense = {"dtype": self.dtype, "param_dtype": jnp.float32}
            h = nn.Dense(2048, name="out_0", **dense)(h)
            if self.pool == "spatial":
                h = nn.Dense(self.out_channels, name="out_2", **dense)(nn.relu(h))
            else:
                h = nn.silu(layers.GroupNorm32(dtype=self.dtype, kernels=self.kernels, name="out_1")(h))
                h = nn.Dense(self.out_channels, name="out_3", **dense)(h)
            return h.astype(jnp.float32)
        h = nn.silu(layers.GroupNorm32(dtype=self.dtype, kernels=self.kernels, name="out_0")(h))
        if self.pool == "adaptive":
            h = jnp.mean(h, axis=(1, 2), keepdims=True)
            h = layers.conv(
                self.out_channels, self.dtype, kernel=1, zero=True, name="out_3"
            )(h)
            return h.reshape(h.shape[0], -1).astype(jnp.float32)
        spacial = self.image_size // 2 ** (len(self.channel_mult) - 1)
        h = AttentionPool2d(
            spacial, self.num_head_channels, self.out_channels, self.dtype, self.kernels, name="out_2"
        )(h)
        return h.astype(jnp.float32)
