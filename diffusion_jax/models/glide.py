"""GLIDE's text-conditional U-Nets (Nichol et al. 2021), NHWC Flax port of glide-text2im.

``Text2ImUNet`` is the ADM U-Net (``unet.unet_trunk``: ``layers.ResBlock``,
BigGAN up/down blocks, scale-shift norm) whose attention blocks also attend to
the caption: each ``layers.AttentionBlock`` projects the text encoder's
``xf_out`` with a 1x1 ``encoder_kv`` and PREPENDS those keys/values to the
image's (softmax over ``text_ctx + H*W``). The
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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import unet
from diffusion_jax.models.glide_xf import TextEncoder, TextEncoding
from diffusion_jax.models.kernels import resolve_kernels

_F32 = jnp.float32


class _Trunk(nn.Module):
    """Time embedding (+ the caption's ``xf_proj``), then ``unet.unet_trunk`` attending to ``xf_out``.

    GLIDE's blocks are the ADM ones (``layers.ResBlock``; ``layers.AttentionBlock``
    in the legacy head layout, with ``encoder_kv`` when the model has text).
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
    kernels: str
    use_new_attention_order: bool = False  # GLIDE's QKVAttention reads qkv as [heads, 3, ch]

    @nn.compact
    def __call__(self, x, timesteps, xf_proj, xf_out, train: bool = False):
        emb = unet.time_embed(self, timesteps)
        if xf_proj is not None:
            emb = emb + xf_proj.astype(_F32)
        return unet.unet_trunk(self, x, emb, train, encoder_out=xf_out)


_TRUNK_FIELDS = (
    "model_channels", "out_channels", "num_res_blocks", "attention_resolutions", "dropout", "channel_mult",
    "use_checkpoint", "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
    "resblock_updown", "dtype", "kernels",
)


class Text2ImUNet(nn.Module):
    """GLIDE's text-conditional U-Net (``glide_text2im.text2im_model.Text2ImUNet``).

    Attributes mirror the PyTorch constructor; ``attention_resolutions`` are
    downsample factors, ``in_channels`` the trunk's input width, ``xf_width=0``
    disables the text path. ``dtype`` is the compute dtype; params float32.
    ``kernels`` ("auto" | "cpu" | "xla", see ``models.kernels``) picks the
    form of GroupNorm, attention (the U-Net's and the text transformer's) and
    the upsampling conv; the parameters do not depend on it.

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
    kernels: str = "auto"

    def setup(self):
        resolve_kernels(self.kernels)  # an unknown value fails here, before any layer
        if self.xf_width:
            self.text_encoder = TextEncoder(
                text_ctx=self.text_ctx, xf_width=self.xf_width, xf_layers=self.xf_layers, xf_heads=self.xf_heads,
                proj_dim=4 * self.model_channels, xf_final_ln=self.xf_final_ln, xf_padding=self.xf_padding,
                n_vocab=self.n_vocab, use_checkpoint=self.use_checkpoint, dtype=self.dtype, kernels=self.kernels,
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
