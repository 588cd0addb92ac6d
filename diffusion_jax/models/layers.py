"""Building blocks of the ADM U-Net (Dhariwal & Nichol 2021), NHWC.

Every module mirrors one OpenAI PyTorch module, and its Flax submodule names
mirror the PyTorch state-dict names with "." before an index replaced by "_":
``in_layers.2`` becomes ``in_layers_2``, ``emb_layers.1`` becomes
``emb_layers_1``. Leaves are Flax's (``kernel``/``bias`` for convs and dense
layers, ``scale``/``bias`` for GroupNorm, ``embedding`` for embeddings), so
``diffusion_jax.convert`` maps a checkpoint onto the tree with one rule.

Dtype policy: parameters are float32; convolutions and the attention matmuls
run in the compute ``dtype``; GroupNorm statistics, the softmax, the timestep
embedding and its MLP stay float32 (as OpenAI's fp16 mode keeps them).

Modules that hold a GroupNorm, an attention or an upsampling conv take
``kernels`` ("auto" | "cpu" | "xla", see ``kernels``): the same parameters,
computed by the form that compiles best on the backend.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.kernels import (attention, conv1x1, conv3x3, group_norm, upsample_conv3x3,
                                         upsample_nearest)

_ZEROS = nn.initializers.zeros


def timestep_embedding(
    timesteps: jax.Array, dim: int, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal timestep embedding, OpenAI's layout (cos first), float32.

    Args:
      timesteps: [B] int or float timesteps (float when rescale_timesteps).
      dim: embedding width; an odd width gets a trailing zero column.
      max_period: controls the lowest frequency.

    Returns:
      [B, dim] float32: ``[cos(t*f_0..f_{h-1}), sin(t*f_0..f_{h-1})]`` with
      ``h = dim // 2`` and ``f_i = exp(-ln(max_period) * i / h)``.
    """
    half = dim // 2
    # Frequencies are constants: the float32 exponent as torch forms it, then a
    # correctly rounded exp (float64 -> float32), which matches torch's float32
    # exp; XLA's float32 exp differs by an ulp, which t ~ 4000 amplifies to 1e-4.
    expo = (
        np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    ) / np.float32(half)
    freqs = np.exp(expo.astype(np.float64)).astype(np.float32)
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm32(nn.Module):
    """GroupNorm with 32 groups, eps 1e-5, computed in float32 (OpenAI's GroupNorm32).

    Statistics are taken over every axis but the first (batch) within each
    channel group, so it also serves 2-D inputs ``[B, C]`` (classifier
    "spatial_v2" head). Output is cast to ``dtype``.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(
                f"GroupNorm32: {c} channels not divisible by {self.num_groups} groups"
            )
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        y = group_norm(x.astype(jnp.float32), scale, bias, self.num_groups, self.epsilon, kernels=self.kernels)
        return y.astype(self.dtype)


def conv(
    features: int,
    dtype,
    kernel: int = 3,
    stride: int = 1,
    zero: bool = False,
    name=None,
    kernels: str = "auto",
) -> "Conv":
    """Square conv with PyTorch's symmetric padding ``kernel // 2``; params float32."""
    return Conv(features, kernel, stride, zero, dtype, kernels, name=name)


class Conv(nn.Module):
    """``nn.Conv`` for square kernels with PyTorch's padding ``kernel // 2``: same ``kernel``/``bias`` leaves and init.

    3x3 stride-1 convolutions go through ``kernels.conv3x3`` (Winograd on
    XLA:CPU where it measured faster, XLA's convolution elsewhere), 1x1 ones
    through ``kernels.conv1x1`` (a GEMM on XLA:CPU); the rest are XLA's
    convolution.
    """

    features: int
    kernel: int = 3
    stride: int = 1
    zero: bool = False
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = _ZEROS if self.zero else nn.initializers.lecun_normal()
        kernel = self.param("kernel", init, (self.kernel, self.kernel, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", _ZEROS, (self.features,), jnp.float32)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        if self.kernel == 3 and self.stride == 1:
            return conv3x3(x, kernel, kernels=self.kernels) + bias
        if self.kernel == 1 and self.stride == 1:
            return conv1x1(x, kernel, kernels=self.kernels) + bias
        pad = self.kernel // 2
        y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), ((pad, pad), (pad, pad)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


def avg_pool2(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/2, W/2, C], 2x2 average pool with stride 2."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (``conv``)."""

    out_channels: int
    use_conv: bool = True
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return UpsampleConv(self.out_channels, self.dtype, self.kernels, name="conv")(x)
        return upsample_nearest(x)


class UpsampleConv(nn.Module):
    """``conv(features, 3x3)(upsample_nearest(x))`` without forming the upsampled image.

    Same ``kernel``/``bias`` params and init as ``conv``'s nn.Conv (so the
    same checkpoints load); computed by ``kernels.upsample_conv3x3`` (its
    "cpu" form does 2.25x fewer multiply-adds).
    """

    features: int
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        return upsample_conv3x3(x, kernel, kernels=self.kernels) + bias


class Downsample(nn.Module):
    """2x downsampling: stride-2 3x3 conv (``op``) or 2x2 average pool."""

    out_channels: int
    use_conv: bool = True
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return conv(self.out_channels, self.dtype, stride=2, name="op")(x)
        return avg_pool2(x)


class ChunkedDense(nn.Module):
    """``nn.Dense`` (same ``kernel``/``bias`` leaves and init) returning its output in equal chunks.

    Each chunk gets its slice of the bias after the split. XLA:CPU fuses the
    bias add into the consumers, and a slice of a fused add there defeats
    vectorisation (~3x slower scale-shift norm); a slice of the matmul does not.
    """

    features: int
    chunks: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.dot(x.astype(jnp.float32), kernel)
        n = self.features // self.chunks
        return [y[..., i * n:(i + 1) * n] + bias[i * n:(i + 1) * n] for i in range(self.chunks)]


class ResBlock(nn.Module):
    """ADM residual block with timestep conditioning (OpenAI ``ResBlock``).

    ``h = in_layers(x)``; the embedding projection is added (or applied as
    ``norm(h) * (1 + scale) + shift`` with scale-shift norm); then
    ``out_layers`` and a skip connection. With ``up``/``down`` (BigGAN style)
    the non-learned resample sits between the norm-act and the first conv, and
    is applied to the skip branch too.

    Call: ``block(x [B,H,W,C], emb [B,E], train)`` -> ``[B,H',W',out_channels]``.
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        oc = self.out_channels
        h = nn.silu(GroupNorm32(dtype=self.dtype, kernels=self.kernels, name="in_layers_0")(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = avg_pool2(h), avg_pool2(x)
        h = conv(oc, self.dtype, name="in_layers_2", kernels=self.kernels)(h)
        # The embedding MLP stays float32 (OpenAI's fp16 mode never casts Linear layers).
        chunks = ChunkedDense(2 * oc if self.use_scale_shift_norm else oc,
                              chunks=2 if self.use_scale_shift_norm else 1, name="emb_layers_1")(nn.silu(emb))
        chunks = [e.astype(self.dtype)[:, None, None, :] for e in chunks]
        norm = GroupNorm32(dtype=self.dtype, kernels=self.kernels, name="out_layers_0")
        if self.use_scale_shift_norm:
            scale, shift = chunks
            h = norm(h) * (1 + scale) + shift
        else:
            h = norm(h + chunks[0])
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = conv(oc, self.dtype, zero=True, name="out_layers_3", kernels=self.kernels)(h)
        if x.shape[-1] != oc:
            x = conv(oc, self.dtype, kernel=1, name="skip_connection")(x)
        return x + h


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of heads an OpenAI attention block uses (num_head_channels wins)."""
    if num_head_channels != -1:
        if channels % num_head_channels:
            raise ValueError(
                f"attention: {channels} channels not divisible by num_head_channels={num_head_channels}"
            )
        return channels // num_head_channels
    if num_heads < 1 or channels % num_heads:
        raise ValueError(
            f"attention: {channels} channels not divisible by num_heads={num_heads}"
        )
    return num_heads


def _split_heads(proj: jax.Array, num_heads: int, parts: int, legacy: bool) -> list[jax.Array]:
    """[B, T, parts * heads * ch] -> ``parts`` arrays [B, T, heads, ch] (legacy: ``[heads, parts, ch]``)."""
    b, t, width = proj.shape
    ch = width // (parts * num_heads)
    if legacy:
        proj = proj.reshape(b, t, num_heads, parts, ch)
        return [proj[..., i, :] for i in range(parts)]
    proj = proj.reshape(b, t, parts, num_heads, ch)
    return [proj[:, :, i] for i in range(parts)]


def qkv_attention(qkv: jax.Array, num_heads: int, legacy: bool, encoder_kv: jax.Array | None = None, *,
                  kernels: str = "auto") -> jax.Array:
    """Multi-head self-attention over a fused qkv projection, optionally also over encoder keys/values.

    One function for OpenAI's ``QKVAttentionLegacy`` / ``QKVAttention``
    (improved- and guided-diffusion, ``AttentionPool2d``), GLIDE's
    ``QKVAttention`` with the caption's ``encoder_kv`` and GLIDE's text
    transformer (its ``[heads, 3 * ch]`` split is the legacy layout).

    Args:
      qkv: [B, T, 3C], the output of the 1x1 ``qkv`` projection.
      num_heads: heads; each has ``ch = C // num_heads`` channels.
      legacy: channel layout of ``qkv``. True (improved-diffusion, guided
        ``QKVAttentionLegacy``, GLIDE): ``[heads, 3, ch]`` - heads first, then
        q/k/v within each head. False (guided ``QKVAttention``, also
        ``AttentionPool2d``): ``[3, heads, ch]``.
      encoder_kv: [B, L, 2C] or None: extra keys/values (GLIDE's projected
        caption), layout ``[heads, 2, ch]`` (legacy) or ``[2, heads, ch]``,
        PREPENDED to the image's, so the softmax runs over ``L + T`` positions.
      kernels: "cpu" | "xla" | "auto" (``kernels.attention``).

    Returns:
      [B, T, C] with channel layout ``[heads, ch]``. The logits are scaled by
      ``1/sqrt(ch)`` (OpenAI scales q and k by ``ch^-1/4`` each) and the
      softmax runs in float32.
    """
    b, t, width = qkv.shape
    q, k, v = _split_heads(qkv, num_heads, 3, legacy)
    if encoder_kv is not None:
        ek, ev = _split_heads(encoder_kv, num_heads, 2, legacy)
        k = jnp.concatenate([ek.astype(k.dtype), k], axis=1)
        v = jnp.concatenate([ev.astype(v.dtype), v], axis=1)
    out = attention(q, k, v, kernels=kernels)
    return out.reshape(b, t, width // 3)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection (OpenAI ``AttentionBlock``, also GLIDE's).

    Submodules ``norm`` (GroupNorm32), ``qkv`` and ``proj_out`` (1x1 conv1d in
    PyTorch, Dense here; ``proj_out`` zero-initialised), and ``encoder_kv``
    when ``encoder_out`` is given: GLIDE projects the text encoder's output to
    keys/values that every head also attends to (``qkv_attention``).

    Call: ``block(x [B,H,W,C], encoder_out [B,L,W_xf] | None = None)`` -> ``[B,H,W,C]``.
    """

    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, encoder_out: jax.Array | None = None) -> jax.Array:
        b, hh, ww, c = x.shape
        heads = attention_heads(c, self.num_heads, self.num_head_channels)
        dense = {"dtype": self.dtype, "param_dtype": jnp.float32}
        h = GroupNorm32(dtype=self.dtype, kernels=self.kernels, name="norm")(x).reshape(b, hh * ww, c)
        qkv = nn.Dense(3 * c, name="qkv", **dense)(h)
        ekv = None
        if encoder_out is not None:
            ekv = nn.Dense(2 * c, name="encoder_kv", **dense)(encoder_out.astype(self.dtype))
        h = qkv_attention(qkv, heads, not self.use_new_attention_order, ekv, kernels=self.kernels)
        h = nn.Dense(c, kernel_init=_ZEROS, name="proj_out", **dense)(h)
        return x + h.reshape(b, hh, ww, c)
