"""GLIDE's text encoder (Nichol et al. 2021, Sec. 2.3), NLC Flax port of glide-text2im.

Tokens are embedded (``token_embedding`` + ``positional_embedding``); with
``xf_padding`` the positions where ``mask`` is False are *replaced* by a learned
per-position ``padding_embedding``. A bidirectional pre-LayerNorm transformer
(no attention mask: padding positions are attended to) follows, then an
optional ``final_ln``. The U-Net receives two things:

* ``xf_proj = transformer_proj(xf_out[:, -1])`` ``[B, 4 * model_channels]``,
  added to the timestep embedding. Position -1 is read whatever the caption
  length, so for a short caption it is a padding slot.
* ``xf_out`` ``[B, text_ctx, xf_width]``, which every attention block projects
  to extra keys/values (``encoder_kv``).

Parameter names mirror the PyTorch state dict (``transformer.resblocks.0.ln_1``
is ``params["transformer"]["resblocks_0"]["ln_1"]``). Dtype policy as in
``layers``: float32 params, matmuls in ``dtype``, LayerNorm statistics and the
softmax in float32, ``xf_proj`` returned as float32.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import qkv_attention

_F32 = jnp.float32


class TextEncoding(NamedTuple):
    """What the U-Net needs from the text encoder; compute it once per caption batch.

    xf_proj: [B, 4 * model_channels] float32, added to the timestep embedding.
    xf_out: [B, text_ctx, xf_width] in the compute dtype (NLC; GLIDE passes NCL).
    """

    xf_proj: jax.Array
    xf_out: jax.Array


class LayerNorm32(nn.Module):
    """LayerNorm (eps 1e-5) over the last axis, statistics in float32 (GLIDE ``xf.LayerNorm``)."""

    epsilon: float = 1e-5
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), _F32)
        bias = self.param("bias", nn.initializers.zeros, (c,), _F32)
        xf = x.astype(_F32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        # Two-pass variance like torch (Flax's default "fast variance" is E[x^2] - mean^2).
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class _Attention(nn.Module):
    """GLIDE ``MultiheadAttention``: ``c_qkv`` -> per-head attention -> ``c_proj``.

    GLIDE's ``QKVMultiheadAttention`` views the [B, L, 3W] projection as
    ``[heads, 3 * ch]`` and splits q, k, v within each head: the legacy layout
    of ``layers.qkv_attention`` (no mask: padding slots are attended to).
    """

    heads: int
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = x.shape[-1]
        dense = {"dtype": self.dtype, "param_dtype": _F32}
        qkv = nn.Dense(3 * w, name="c_qkv", **dense)(x)
        h = qkv_attention(qkv, self.heads, legacy=True, kernels=self.kernels)
        return nn.Dense(w, name="c_proj", **dense)(h)


class _MLP(nn.Module):
    """GLIDE ``MLP``: ``c_fc`` (4W) -> exact GELU -> ``c_proj``."""

    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = x.shape[-1]
        dense = {"dtype": self.dtype, "param_dtype": _F32}
        h = nn.Dense(4 * w, name="c_fc", **dense)(x)
        return nn.Dense(w, name="c_proj", **dense)(jax.nn.gelu(h, approximate=False))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Submodules ``attn.{c_qkv,c_proj}``, ``ln_1``, ``mlp.{c_fc,c_proj}``, ``ln_2``.
    Call: ``block(x [B, L, W])`` -> ``[B, L, W]``.
    """

    heads: int
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        attn = _Attention(self.heads, self.dtype, self.kernels, name="attn")
        x = x + attn(LayerNorm32(dtype=self.dtype, name="ln_1")(x))
        return x + _MLP(self.dtype, name="mlp")(LayerNorm32(dtype=self.dtype, name="ln_2")(x))


class Transformer(nn.Module):
    """``layers`` residual attention blocks (``resblocks_<i>``); ``[B, L, W]`` -> ``[B, L, W]``."""

    layers: int
    heads: int
    use_checkpoint: bool = False
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cls = nn.remat(ResidualAttentionBlock) if self.use_checkpoint else ResidualAttentionBlock
        for i in range(self.layers):
            x = cls(self.heads, self.dtype, self.kernels, name=f"resblocks_{i}")(x)
        return x


class TextEncoder(nn.Module):
    """GLIDE's caption encoder (``Text2ImUNet.get_text_emb``).

    Its parameters (``token_embedding``, ``positional_embedding``,
    ``padding_embedding``, ``transformer``, ``final_ln``, ``transformer_proj``)
    sit at the top level of the U-Net's tree: the U-Net shares its scope.

    Call args:
      tokens: [B, text_ctx] int token ids.
      mask: [B, text_ctx] bool, True on caption tokens; required with ``xf_padding``
        (ignored without it, as in GLIDE).

    Returns:
      ``TextEncoding(xf_proj [B, proj_dim] float32, xf_out [B, text_ctx, xf_width])``.
    """

    text_ctx: int
    xf_width: int
    xf_layers: int
    xf_heads: int
    proj_dim: int
    xf_final_ln: bool = True
    xf_padding: bool = True
    n_vocab: int = 50257
    use_checkpoint: bool = False
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> TextEncoding:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.text_ctx:
            raise ValueError(f"tokens must be [B, text_ctx={self.text_ctx}], got shape {tuple(tokens.shape)}")
        w = self.xf_width
        normal = nn.initializers.normal
        xf_in = nn.Embed(self.n_vocab, w, embedding_init=normal(0.02), param_dtype=_F32, name="token_embedding")(
            tokens.astype(jnp.int32)
        )
        pos = self.param("positional_embedding", normal(0.01), (self.text_ctx, w), _F32)
        xf_in = xf_in + pos[None]
        if self.xf_padding:
            if mask is None:
                raise ValueError("this model uses xf_padding: pass mask [B, text_ctx] (True on caption tokens)")
            mask = jnp.asarray(mask)
            if mask.shape != tokens.shape:
                raise ValueError(f"mask must have the shape of tokens {tuple(tokens.shape)}, got {tuple(mask.shape)}")
            pad = self.param("padding_embedding", normal(0.01), (self.text_ctx, w), _F32)
            # Replace (not add): the ids at padding positions do not matter.
            xf_in = jnp.where(mask.astype(bool)[..., None], xf_in, pad[None])
        xf_out = Transformer(self.xf_layers, self.xf_heads, self.use_checkpoint, self.dtype, self.kernels,
                             name="transformer")(
            xf_in.astype(self.dtype)
        )
        if self.xf_final_ln:
            xf_out = LayerNorm32(dtype=self.dtype, name="final_ln")(xf_out)
        # GLIDE reads the LAST position, not the caption's end token.
        xf_proj = nn.Dense(self.proj_dim, dtype=self.dtype, param_dtype=_F32, name="transformer_proj")(xf_out[:, -1])
        return TextEncoding(xf_proj.astype(_F32), xf_out)
