"""GLIDE's text-conditional U-Nets (Nichol et al. 2021), NHWC Flax port of glide-text2im.

``Text2ImUNet`` is the ADM U-Net (``layers.ResBlock``, BigGAN up/down blocks,
scale-shift norm) whose attention blocks also attend to the caption: each one
projects the text encoder's ``xf_out`` with a 1x1 ``encoder_kv`` and PREPENDS
those keys/values to the image's (softmax over ``text_ctx + H*W``). The
caption's ``xf_proj`` is added to the timestep embedding. GLIDE folds the SiLU
into its GroupNorm; the arithmetic is the ADM block's, and the state-dict
indices (``in_layers.0/2``, ``out_layers.0/3``, ``out.0/2``) are unchanged.

Variants differ only in what the trunk's first conv sees:

* ``SuperResText2ImUNet``: ``concat([x, bilinear(low_res)])`` (align_corners=False).
* ``InpaintText2ImUNet``: ``concat([x, inpaint_image * inpaint_mask, inpaint_mask])``
  (zeros when omitted).
* ``SuperResInpaintText2ImUNet``: the inpainting inputs, then the upsampled image.

``in_channels`` is the trunk's input width (3 / 6 / 7 / 10), as for
``unet.SuperResUNet``. Parameter names mirror the PyTorch state dict (the text
encoder's and the trunk's parameters share the top-level scope).

Call: ``module.apply({'params': p}, x, timesteps, tokens=tokens, mask=mask,
low_res=None, inpaint_image=None, inpaint_mask=None)`` -> ``[B, H, W, 6]`` float32.
To encode a caption batch once per sampling run::

    enc = module.apply({'params': p}, tokens, mask, method="encode_text")
    out = module.apply({'params': p}, x, t, text=enc)   # no transformer pass
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers, unet
from diffusion_jax.models.glide_xf import TextEncoder, TextEncoding

_F32 = jnp.float32
_ZEROS = nn.initializers.zeros


def glide_qkv_attention(qkv: jax.Array, encoder_kv: jax.Array | None, num_heads: int) -> jax.Array:
    """GLIDE's ``QKVAttention`` with optional encoder keys/values.

    Args:
      qkv: [B, T, 3C] image projection, legacy per-head layout ``[heads, 3, ch]``.
      encoder_kv: [B, L, 2C] text projection, layout ``[heads, 2, ch]``, or None.
      num_heads: heads; ``ch = C // num_heads``.

    Returns:
      [B, T, C]. Keys/values are ``concat([ek, k])`` along the sequence; logits
      scaled by 1/sqrt(ch) (q and k by ch^-1/4 each in GLIDE), float32 softmax.
    """
    b, t, width = qkv.shape
    ch = width // (3 * num_heads)
    qkv = qkv.reshape(b, t, num_heads, 3, ch)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    if encoder_kv is not None:
        ekv = encoder_kv.reshape(b, encoder_kv.shape[1], num_heads, 2, ch)
        k = jnp.concatenate([ekv[..., 0, :].astype(k.dtype), k], axis=1)
        v = jnp.concatenate([ekv[..., 1, :].astype(v.dtype), v], axis=1)
    out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(ch))
    return out.reshape(b, t, num_heads * ch)


class GlideAttentionBlock(nn.Module):
    """Spatial self-attention that also attends to the caption (GLIDE ``AttentionBlock``).

    Submodules ``norm``, ``qkv``, ``encoder_kv`` (only when ``encoder_out`` is
    given, i.e. ``xf_width > 0``) and ``proj_out`` (zero-initialised).
    Call: ``block(x [B,H,W,C], encoder_out [B,L,W_xf] | None)`` -> ``[B,H,W,C]``.
    """

    num_heads: int = 1
    num_head_channels: int = -1
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, encoder_out: jax.Array | None = None) -> jax.Array:
        b, hh, ww, c = x.shape
        heads = layers.attention_heads(c, self.num_heads, self.num_head_channels)
        dense = {"dtype": self.dtype, "param_dtype": _F32}
        h = layers.GroupNorm32(dtype=self.dtype, name="norm")(x).reshape(b, hh * ww, c)
        qkv = nn.Dense(3 * c, name="qkv", **dense)(h)
        ekv = None
        if encoder_out is not None:
            ekv = nn.Dense(2 * c, name="encoder_kv", **dense)(encoder_out.astype(self.dtype))
        h = glide_qkv_attention(qkv, ekv, heads)
        h = nn.Dense(c, kernel_init=_ZEROS, name="proj_out", **dense)(h)
        return x + h.reshape(b, hh, ww, c)


class _Trunk(nn.Module):
    """Time embedding + ADM down/middle/up path with text attention, and ``out``.

    Call: ``trunk(h [B,H,W,in], timesteps [B], xf_proj [B,E] | None,
    xf_out [B,L,W] | None, train)`` -> ``[B,H,W,out_channels]`` float32.
    """

    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple
    dropout: float
    channel_mult: tuple
    use_checkpoint: bool
    num_heads: int
    num_head_channels: int
    num_heads_upsample: int
    use_scale_shift_norm: bool
    resblock_updown: bool
    dtype: str

    def _res(self, out_channels: int, name: str, up: bool = False, down: bool = False):
        # static_argnums counts `self` as 0: (x=1, emb=2, train=3).
        cls = nn.remat(layers.ResBlock, static_argnums=(3,)) if self.use_checkpoint else layers.ResBlock
        return cls(out_channels=out_channels, dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
                   up=up, down=down, dtype=self.dtype, name=name)

    def _attn(self, name: str, num_heads: int):
        cls = nn.remat(GlideAttentionBlock) if self.use_checkpoint else GlideAttentionBlock
        return cls(num_heads=num_heads, num_head_channels=self.num_head_channels, dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, x, timesteps, xf_proj, xf_out, train: bool = False):
        emb = unet.time_embed(self, timesteps)
        if xf_proj is not None:
            emb = emb + xf_proj.astype(_F32)
        mult = tuple(self.channel_mult)
        ch = int(mult[0] * self.model_channels)
        h = layers.conv(ch, self.dtype, name="input_blocks_0_0")(x.astype(self.dtype))
        hs, idx, ds = [h], 1, 1
        for level, mu in enumerate(mult):
            for _ in range(self.num_res_blocks):
                ch = int(mu * self.model_channels)
                h = self._res(ch, f"input_blocks_{idx}_0")(h, emb, train)
                if ds in self.attention_resolutions:
                    h = self._attn(f"input_blocks_{idx}_1", self.num_heads)(h, xf_out)
                hs.append(h)
                idx += 1
            if level != len(mult) - 1:
                name = f"input_blocks_{idx}_0"
                if self.resblock_updown:
                    h = self._res(ch, name, down=True)(h, emb, train)
                else:
                    h = layers.Downsample(ch, dtype=self.dtype, name=name)(h)
                hs.append(h)
                idx, ds = idx + 1, ds * 2
        h = self._res(ch, "middle_block_0")(h, emb, train)
        h = self._attn("middle_block_1", self.num_heads)(h, xf_out)
        h = self._res(ch, "middle_block_2")(h, emb, train)
        h = self._up_path(h, hs, emb, xf_out, ds, train)
        h = nn.silu(layers.GroupNorm32(dtype=self.dtype, name="out_0")(h))
        h = layers.conv(self.out_channels, self.dtype, zero=True, name="out_2")(h)
        return h.astype(_F32)

    def _up_path(self, h, hs, emb, xf_out, ds, train):
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        idx = 0
        for level, mu in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                ch = int(mu * self.model_channels)
                h = self._res(ch, f"output_blocks_{idx}_0")(h, emb, train)
                j = 1
                if ds in self.attention_resolutions:
                    h = self._attn(f"output_blocks_{idx}_1", heads_up)(h, xf_out)
                    j = 2
                if level and i == self.num_res_blocks:
                    name = f"output_blocks_{idx}_{j}"
                    if self.resblock_updown:
                        h = self._res(ch, name, up=True)(h, emb, train)
                    else:
                        h = layers.Upsample(ch, dtype=self.dtype, name=name)(h)
                    ds //= 2
                idx += 1
        return h


_TRUNK_FIELDS = (
    "model_channels", "out_channels", "num_res_blocks", "attention_resolutions", "dropout", "channel_mult",
    "use_checkpoint", "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
    "resblock_updown", "dtype",
)


class Text2ImUNet(nn.Module):
    """GLIDE's text-conditional U-Net (``glide_text2im.text2im_model.Text2ImUNet``).

    Attributes mirror the PyTorch constructor; ``attention_resolutions`` are
    downsample factors, ``in_channels`` the trunk's input width, ``xf_width=0``
    disables the text path. ``dtype`` is the compute dtype; params float32.

    Call args:
      x: [B, H, W, C] NHWC (C = 3 for GLIDE), H = W = image_size.
      timesteps: [B] int (GLIDE feeds ``timestep_map[t]``, never rescaled).
      tokens: [B, text_ctx] int; mask: [B, text_ctx] bool (False = padding).
      low_res / inpaint_image / inpaint_mask: see the subclasses; ``None`` here.
      text: a precomputed ``TextEncoding`` (from ``encode_text``) instead of
        tokens/mask, so a sampling loop runs the transformer once.
      train: enables dropout (``rngs={'dropout': key}``).

    Returns:
      [B, H, W, out_channels] float32 (eps, then LEARNED_RANGE variance values).
    """

    image_size: int
    in_channels: int = 3
    model_channels: int = 192
    out_channels: int = 6
    num_res_blocks: int = 3
    attention_resolutions: tuple = (2, 4, 8)
    dropout: float = 0.0
    channel_mult: tuple = (1, 2, 3, 4)
    use_checkpoint: bool = False
    num_heads: int = 1
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    text_ctx: int = 128
    xf_width: int = 512
    xf_layers: int = 16
    xf_heads: int = 8
    xf_final_ln: bool = True
    xf_padding: bool = True
    n_vocab: int = 50257
    dtype: str = "float32"

    def setup(self):
        if self.xf_width:
            self.text_encoder = TextEncoder(
                text_ctx=self.text_ctx, xf_width=self.xf_width, xf_layers=self.xf_layers, xf_heads=self.xf_heads,
                proj_dim=4 * self.model_channels, xf_final_ln=self.xf_final_ln, xf_padding=self.xf_padding,
                n_vocab=self.n_vocab, use_checkpoint=self.use_checkpoint, dtype=self.dtype,
            )
            nn.share_scope(self, self.text_encoder)
        self.trunk = _Trunk(**{f: getattr(self, f) for f in _TRUNK_FIELDS})
        nn.share_scope(self, self.trunk)

    def encode_text(self, tokens: jax.Array, mask: jax.Array | None = None) -> TextEncoding | None:
        """Run the text encoder: ``TextEncoding(xf_proj [B, 4*model_channels], xf_out [B, L, W])``.

        Returns None for a model without text (``xf_width == 0``).
        """
        if not self.xf_width:
            return None
        return self.text_encoder(tokens, mask)

    def __call__(self, x, timesteps, tokens=None, mask=None, low_res=None, inpaint_image=None,
                 inpaint_mask=None, *, text: TextEncoding | None = None, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC [B, H, W, C], got shape {tuple(x.shape)}")
        h = self._trunk_input(jnp.asarray(x, _F32), low_res, inpaint_image, inpaint_mask)
        unet.check_image(h, self.image_size, self.in_channels, what=self._input_what)
        unet.check_timesteps(timesteps, x.shape[0])
        text = self._text(tokens, mask, text, x.shape[0])
        xf_proj, xf_out = (None, None) if text is None else (text.xf_proj, text.xf_out)
        return self.trunk(h, timesteps, xf_proj, xf_out, train)

    def _text(self, tokens, mask, text, batch: int) -> TextEncoding | None:
        if not self.xf_width:
            return None
        if text is not None:
            if tokens is not None:
                raise ValueError("pass either tokens/mask or a precomputed text encoding, not both")
        elif tokens is None:
            raise ValueError("this model is text-conditional: pass tokens [B, text_ctx] and mask (or text=...)")
        else:
            text = self.encode_text(tokens, mask)
        if text.xf_proj.shape[0] != batch:
            raise ValueError(f"text batch {text.xf_proj.shape[0]} does not match x batch {batch}")
        return text

    _input_what = "x"

    def _trunk_input(self, x, low_res, inpaint_image, inpaint_mask):
        _reject(self, low_res=low_res, inpaint_image=inpaint_image, inpaint_mask=inpaint_mask)
        return x


def _reject(model, **unused) -> None:
    given = sorted(k for k, v in unused.items() if v is not None)
    if given:
        raise ValueError(f"{type(model).__name__} does not take {', '.join(given)}")


def _upsampled(low_res, x) -> jax.Array:
    if low_res is None or jnp.ndim(low_res) != 4 or low_res.shape[0] != x.shape[0]:
        raise ValueError(f"low_res must be NHWC [B={x.shape[0]}, h, w, C], got {getattr(low_res, 'shape', None)}")
    return unet.bilinear_resize(jnp.asarray(low_res, _F32), x.shape[1], x.shape[2])


def _inpaint_inputs(x, inpaint_image, inpaint_mask) -> list:
    img = jnp.zeros_like(x) if inpaint_image is None else jnp.asarray(inpaint_image, _F32)
    msk = jnp.zeros_like(x[..., :1]) if inpaint_mask is None else jnp.asarray(inpaint_mask, _F32)
    return [img * msk, msk]


class SuperResText2ImUNet(Text2ImUNet):
    """Text2ImUNet on ``concat([x, bilinear(low_res)])``; ``low_res`` [B, h, w, C] is required."""

    in_channels: int = 6
    _input_what = "concat([x, upsampled low_res])"

    def _trunk_input(self, x, low_res, inpaint_image, inpaint_mask):
        _reject(self, inpaint_image=inpaint_image, inpaint_mask=inpaint_mask)
        return jnp.concatenate([x, _upsampled(low_res, x)], axis=-1)


class InpaintText2ImUNet(Text2ImUNet):
    """Text2ImUNet on ``concat([x, inpaint_image * inpaint_mask, inpaint_mask])``.

    ``inpaint_image`` [B, H, W, C] and ``inpaint_mask`` [B, H, W, 1] (1 = known
    pixel) default to zeros.
    """

    in_channels: int = 7
    _input_what = "concat([x, inpaint_image * inpaint_mask, inpaint_mask])"

    def _trunk_input(self, x, low_res, inpaint_image, inpaint_mask):
        _reject(self, low_res=low_res)
        return jnp.concatenate([x, *_inpaint_inputs(x, inpaint_image, inpaint_mask)], axis=-1)


class SuperResInpaintText2ImUNet(Text2ImUNet):
    """Text2ImUNet on ``concat([x, inpaint_image * inpaint_mask, inpaint_mask, bilinear(low_res)])``."""

    in_channels: int = 10
    _input_what = "concat([x, inpaint_image * inpaint_mask, inpaint_mask, upsampled low_res])"

    def _trunk_input(self, x, low_res, inpaint_image, inpaint_mask):
        parts = _inpaint_inputs(x, inpaint_image, inpaint_mask)
        return jnp.concatenate([x, *parts, _upsampled(low_res, x)], axis=-1)


GLIDE_CLASSES = {
    "glide": Text2ImUNet,
    "glide_upsample": SuperResText2ImUNet,
    "glide_inpaint": InpaintText2ImUNet,
    "glide_upsample_inpaint": SuperResInpaintText2ImUNet,
}


def glide_model_class(kind: str) -> type:
    """The module class of a GLIDE kind ("glide", "glide_upsample", "glide_inpaint",
    "glide_upsample_inpaint")."""
    if kind not in GLIDE_CLASSES:
        raise ValueError(f"unknown GLIDE kind {kind!r}; accepted: {sorted(GLIDE_CLASSES)}")
    return GLIDE_CLASSES[kind]


def glide_model_fn(module: Text2ImUNet, params: Any, **fixed):
    """A ``model_fn(x, timesteps, y)`` for samplers and ``guidance.classifier_free``.

    Args:
      module, params: a GLIDE network and its parameters.
      **fixed: per-image inputs that are not labels (``low_res``,
        ``inpaint_image``, ``inpaint_mask``) with batch B; when x arrives with
        batch k*B (classifier-free guidance doubles it) they are tiled k times.

    ``y`` is a dict with ``tokens`` and ``mask``, or with ``text`` (a
    ``TextEncoding`` from ``encode_text``, so the transformer runs once per
    sampling run rather than once per step); guidance's null label is one row
    of the same structure (the empty caption, or its encoding).
    """

    def model_fn(x, timesteps, y):
        kw = {}
        for k, v in fixed.items():
            if v is not None:
                reps = x.shape[0] // v.shape[0]
                if reps * v.shape[0] != x.shape[0]:
                    raise ValueError(f"{k} has batch {v.shape[0]}, which does not divide x's batch {x.shape[0]}")
                kw[k] = jnp.tile(v, (reps,) + (1,) * (v.ndim - 1))
        return module.apply({"params": params}, x, timesteps, **dict(y or {}), **kw)

    return model_fn
