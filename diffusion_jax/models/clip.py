"""GLIDE's noised CLIP (Nichol et al. 2021, Sec. 2.4 and App. C), NLC Flax port of glide-text2im.

Two pre-LayerNorm transformers (Radford et al. 2021) with GLIDE's changes:

* ``ImageEncoder`` sees a *noised* image x_t and its diffusion timestep t. The
  first token is ``w_t[t]`` (a learned table indexed by the integer timestep)
  instead of CLIP's class token, the others are the patch projections; the
  embedding is read from that first token. Inputs are NHWC in [-1, 1]; the
  module applies OpenAI's ``(x + 1) * 127.5`` and CLIP's per-channel
  normalisation itself.
* ``TextEncoder`` embeds ``max_text_len`` tokens, runs a causal transformer and
  reads the final-LayerNormed state at position ``len - 1`` (the end token).

Both return the *raw* ``[B, n_embd]`` embedding; CLIP guidance normalises it
(``diffusion_jax.guidance.clip_cond_fn``).

The reference pads the context to a multiple of 32 and adds -1e10 to the logits
of padded keys; padded keys then get exactly zero weight, so here the context is
not padded and only the text encoder's causal mask is applied. Attention scales
q and k by ``n_head_state ** -0.25`` each, as the reference does.

Parameter names mirror the PyTorch state dict: ``blocks.block_0.f_attn.f_q.w``
is ``params["block_0"]["f_attn"]["f_q"]["w"]``. Layouts differ where Flax's
do: ``Affine.w`` is ``[in, out]`` (torch ``[out, in]``), ``patch_proj`` is HWIO
(torch OIHW). Dtype policy: float32 params, matmuls in ``dtype``, LayerNorm
statistics and the softmax in float32, embeddings returned as float32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_F32 = jnp.float32
KERNELS = ("auto", "cpu", "xla")

# CLIP's per-channel pixel statistics (0..255 scale), as glide_text2im/clip/encoders.py uses them.
IMAGE_CHANNEL_MEANS = (122.77093945, 116.74601272, 104.09373519)
IMAGE_CHANNEL_STDS = (68.50053285, 66.63215831, 70.32316309)


def _check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")


class LayerNorm(nn.Module):
    """``clip.utils.LayerNorm``: biased variance, float32 statistics; params ``g``, ``b`` [C]."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        g = self.param("g", nn.initializers.ones, (c,), _F32)
        b = self.param("b", nn.initializers.zeros, (c,), _F32)
        xf = x.astype(_F32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        return (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * g + b


class Affine(nn.Module):
    """``clip.utils.Affine``: y = x w + b with ``w`` [in, out] (torch stores [out, in])."""

    n_out: int
    use_bias: bool = True
    std: float | None = None
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = x.shape[-1]
        std = self.std if self.std is not None else math.sqrt(2.0 / (n_in + self.n_out))
        w = self.param("w", nn.initializers.normal(std), (n_in, self.n_out), _F32)
        y = jnp.matmul(x.astype(self.dtype), w.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("b", nn.initializers.zeros, (self.n_out,), _F32).astype(self.dtype)
        return y


def clip_attention(q: jax.Array, k: jax.Array, v: jax.Array, n_head: int, causal: bool) -> jax.Array:
    """Multi-head attention of ``AttentionResblock``.

    Args:
      q, k, v: [B, L, n_state]; heads are contiguous channel groups of width
        d = n_state / n_head.
      n_head: number of heads.
      causal: mask keys after the query (the text encoder).

    Returns:
      [B, L, n_state] = softmax((q d^-1/4)(k d^-1/4)^T) v per head, softmax in float32.
    """
    b, n, width = q.shape
    d = width // n_head
    s = math.sqrt(1.0 / math.sqrt(d))
    q, k, v = (a.reshape(b, n, n_head, d) for a in (q, k, v))
    w = jnp.einsum("bqhd,bkhd->bhqk", q * s, k * s, preferred_element_type=_F32)
    if causal:
        w = jnp.where(jnp.tril(jnp.ones((n, n), bool)), w, -1e10)
    w = jax.nn.softmax(w, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", w.astype(v.dtype), v)
    return out.reshape(b, n, width)


class AttentionResblock(nn.Module):
    """m + f_c(attention(f_q(ln m), f_k(ln m), f_v(ln m))); f_k has no bias."""

    n_head: int
    n_resblocks: int
    causal: bool
    dtype: str = "float32"

    @nn.compact
    def __call__(self, m: jax.Array) -> jax.Array:
        n_state = m.shape[-1]
        std = 1.0 / math.sqrt(n_state)
        r = LayerNorm(name="ln")(m)
        q = Affine(n_state, std=std, dtype=self.dtype, name="f_q")(r)
        k = Affine(n_state, use_bias=False, std=std, dtype=self.dtype, name="f_k")(r)
        v = Affine(n_state, std=std, dtype=self.dtype, name="f_v")(r)
        r = clip_attention(q, k, v, self.n_head, self.causal)
        c_std = 1.0 / math.sqrt(n_state * self.n_resblocks**2)
        return m + Affine(n_state, std=c_std, dtype=self.dtype, name="f_c")(r).astype(m.dtype)


class FullyConnectedResblock(nn.Module):
    """m + f_2(gelu(f_1(ln m))), hidden width 4 n_state, exact (erf) GELU."""

    n_resblocks: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, m: jax.Array) -> jax.Array:
        n_state = m.shape[-1]
        r = LayerNorm(name="ln")(m)
        r = Affine(4 * n_state, std=math.sqrt(2.0 / (4 * n_state)), dtype=self.dtype, name="f_1")(r)
        r = jax.nn.gelu(r, approximate=False)
        r = Affine(n_state, std=1.0 / math.sqrt(n_state * self.n_resblocks**2), dtype=self.dtype, name="f_2")(r)
        return m + r.astype(m.dtype)


class TransformerBlock(nn.Module):
    """f_mlp(f_attn(x)); ``n_resblocks`` (2 per block) only sets the output-layer init."""

    n_head: int
    n_resblocks: int
    causal: bool
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = AttentionResblock(self.n_head, self.n_resblocks, self.causal, self.dtype, name="f_attn")(x)
        return FullyConnectedResblock(self.n_resblocks, self.dtype, name="f_mlp")(x)


class ImageEmbedding(nn.Module):
    """Noised image + timestep -> [B, 1 + (S/p)^2, n_state] tokens (``encoders.ImageEmbedding``).

    tokens = ln(concat(w_t[t], patch_proj * normalise((x + 1) * 127.5)) + w_pos);
    with ``n_timestep == 0`` the first token is a learned ``pred_state`` (plain CLIP).
    """

    image_size: int
    patch_size: int
    n_state: int
    n_timestep: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array | None) -> jax.Array:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected x [B, {self.image_size}, {self.image_size}, 3], got {x.shape}")
        if (self.n_timestep == 0) != (t is None):
            raise ValueError(f"timesteps must be given iff n_timestep > 0 (n_timestep={self.n_timestep})")
        b, p, n = x.shape[0], self.patch_size, self.n_state
        n_patch = (self.image_size // p) ** 2
        proj = self.param("patch_proj", nn.initializers.normal(math.sqrt(2.0 / (n * p * p))), (p, p, 3, n), _F32)
        w_pos = self.param("w_pos", nn.initializers.normal(1.0 / math.sqrt(n)), (1 + n_patch, n), _F32)
        pixels = (x.astype(_F32) + 1.0) * 127.5
        pixels = (pixels - jnp.asarray(IMAGE_CHANNEL_MEANS, _F32)) / jnp.asarray(IMAGE_CHANNEL_STDS, _F32)
        h = jax.lax.conv_general_dilated(pixels, proj, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = h.reshape(b, n_patch, n)  # row-major patches, as torch's reshape of [B, n, S/p, S/p]
        if self.n_timestep == 0:
            sot = jnp.broadcast_to(self.param("pred_state", nn.initializers.normal(1.0 / math.sqrt(n)), (n,), _F32),
                                   (b, 1, n))
        else:
            w_t = self.param("w_t", nn.initializers.normal(1.0 / math.sqrt(n)), (self.n_timestep, n), _F32)
            t = jnp.asarray(t)
            if t.shape != (b,):
                raise ValueError(f"expected timesteps [{b}], got {t.shape}")
            t = jnp.round(t).astype(jnp.int32) if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.int32)
            sot = jnp.take(w_t, t, axis=0)[:, None]
        return LayerNorm(name="ln")(jnp.concatenate([sot, h], axis=1) + w_pos[None])


class TextEmbedding(nn.Module):
    """tokens [B, L] -> w_voc[tokens] + w_pos[:L]  (``encoders.TextEmbedding``)."""

    n_vocab: int
    n_context: int
    n_state: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.n_context:
            raise ValueError(f"expected tokens [B, L <= {self.n_context}], got {tokens.shape}")
        w_voc = self.param("w_voc", nn.initializers.normal(0.02), (self.n_vocab, self.n_state), _F32)
        w_pos = self.param("w_pos", nn.initializers.normal(0.01), (self.n_context, self.n_state), _F32)
        return jnp.take(w_voc, tokens.astype(jnp.int32), axis=0) + w_pos[None, : tokens.shape[1]]


class FeatureExtractor(nn.Module):
    """``{Text,Image}FeatureExtractor``: f(ln(h[b, index_b])) with ``f`` an Affine without bias."""

    n_embd: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, h: jax.Array, index: jax.Array) -> jax.Array:
        x = jnp.take_along_axis(h, index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
        x = LayerNorm(name="ln")(x)
        return Affine(self.n_embd, use_bias=False, dtype=self.dtype, name="f")(x).astype(_F32)


class ImageEncoder(nn.Module):
    """GLIDE's noised CLIP image tower: (x_t NHWC in [-1, 1], t [B]) -> raw embedding [B, n_embd].

    Attributes follow ``encoders.ImageEncoder``; n_state = n_head * n_head_state.
    ``n_timestep`` is the diffusion length (1000 for GLIDE's released model;
    0 gives plain CLIP, called with ``timesteps=None``). ``kernels`` is the
    model-wide backend switch (DESIGN §6); both backends run the same code here.
    """

    image_size: int
    patch_size: int
    n_embd: int
    n_head: int
    n_xf_blocks: int
    n_head_state: int = 64
    n_timestep: int = 0
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array | None = None) -> jax.Array:
        _check_kernels(self.kernels)
        n_state = self.n_head * self.n_head_state
        h = ImageEmbedding(self.image_size, self.patch_size, n_state, self.n_timestep, name="input")(x, timesteps)
        h = h.astype(self.dtype)
        for i in range(self.n_xf_blocks):
            h = TransformerBlock(self.n_head, 2 * self.n_xf_blocks, False, self.dtype, name=f"block_{i}")(h)
        return FeatureExtractor(self.n_embd, self.dtype, name="output")(h, jnp.zeros((h.shape[0],), jnp.int32))


class TextEncoder(nn.Module):
    """GLIDE's CLIP text tower: (tokens [B, L] int32, lens [B] int32) -> raw embedding [B, n_embd].

    ``tokens`` come from ``text.load_clip_tokenizer(...).padded_tokens_and_len``
    (start token, BPE ids, end token, zero padding); ``lens`` counts the start
    and end tokens, so position ``lens - 1`` is the end token. Positions after
    it do not reach the embedding (causal attention).
    """

    n_bpe_vocab: int
    max_text_len: int
    n_embd: int
    n_head: int
    n_xf_blocks: int
    n_head_state: int = 64
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, tokens: jax.Array, lens: jax.Array) -> jax.Array:
        _check_kernels(self.kernels)
        n_state = self.n_head * self.n_head_state
        h = TextEmbedding(self.n_bpe_vocab, self.max_text_len, n_state, name="input")(tokens).astype(self.dtype)
        for i in range(self.n_xf_blocks):
            h = TransformerBlock(self.n_head, 2 * self.n_xf_blocks, True, self.dtype, name=f"block_{i}")(h)
        return FeatureExtractor(self.n_embd, self.dtype, name="output")(h, jnp.asarray(lens) - 1)
