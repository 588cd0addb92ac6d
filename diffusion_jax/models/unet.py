"""The ADM U-Net (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021), NHWC Flax port.

One module covers improved-diffusion's and guided-diffusion's ``UNetModel``
and ``SuperResModel``. Parameter tree (mirrors OpenAI's state dict, "." before
an index becomes "_"; see ``layers``)::

    time_embed_0, time_embed_2         Dense (timestep MLP, float32)
    label_emb                          Embed (class-conditional only)
    input_blocks_0_0                   Conv (stem)
    input_blocks_{i}_0                 ResBlock | Downsample (``op``) | down ResBlock
    input_blocks_{i}_1                 AttentionBlock (at attention resolutions)
    middle_block_0 / _1 / _2           ResBlock, AttentionBlock, ResBlock
    output_blocks_{i}_{0,1,2}          ResBlock, [AttentionBlock], [Upsample (``conv``) | up ResBlock]
    out_0, out_2                       GroupNorm32, zero-initialised Conv

so ``input_blocks.1.0.in_layers.2.weight`` lives at
``params["input_blocks_1_0"]["in_layers_2"]["kernel"]``.

``down_path``, ``up_path`` and ``unet_trunk`` are the one U-Net trunk: the
ADM networks, the classifier (down path only) and GLIDE's text U-Nets (which
pass the caption as ``encoder_out`` to every attention block) all call them
from their own compact ``__call__``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models.kernels import resolve_kernels


def _res_cls(m):
    # static_argnums counts `self` as 0: (x=1, emb=2, train=3).
    return (
        nn.remat(layers.ResBlock, static_argnums=(3,))
        if m.use_checkpoint
        else layers.ResBlock
    )


def _attn(m, name: str, num_heads: int) -> nn.Module:
    cls = nn.remat(layers.AttentionBlock) if m.use_checkpoint else layers.AttentionBlock
    return cls(
        num_heads=num_heads,
        num_head_channels=m.num_head_channels,
        use_new_attention_order=m.use_new_attention_order,
        dtype=m.dtype,
        kernels=m.kernels,
        name=name,
    )


def _res(
    m, out_channels: int, name: str, up: bool = False, down: bool = False
) -> nn.Module:
    return _res_cls(m)(
        out_channels=out_channels,
        dropout=m.dropout,
        use_scale_shift_norm=m.use_scale_shift_norm,
        up=up,
        down=down,
        dtype=m.dtype,
        kernels=m.kernels,
        name=name,
    )


def time_embed(m, timesteps: jax.Array) -> jax.Array:
    """[B] timesteps -> [B, 4 * model_channels] float32 (sinusoid, Dense, SiLU, Dense)."""
    dim = 4 * m.model_channels
    dense = {"dtype": jnp.float32, "param_dtype": jnp.float32}
    emb = layers.timestep_embedding(timesteps, m.model_channels)
    emb = nn.Dense(dim, name="time_embed_0", **dense)(emb)
    return nn.Dense(dim, name="time_embed_2", **dense)(nn.silu(emb))


def down_path(m, x: jax.Array, emb: jax.Array, train: bool, encoder_out: jax.Array | None = None):
    """Input blocks and middle block, shared by ``UNet``, ``EncoderUNet`` and GLIDE's U-Nets.

    Called from inside the owner's compact ``__call__`` (submodules attach to
    ``m``, whose fields are ``UNet``'s). ``x`` [B, H, W, C_in], ``emb`` [B, E]
    float32, ``encoder_out`` [B, L, W_xf] or None (GLIDE's caption, attended
    to by every attention block). Returns ``(h, hs)``: the middle-block
    output and the list of every input block's output (the skip connections).
    """
    mult = tuple(m.channel_mult)
    ch = int(mult[0] * m.model_channels)
    h = layers.conv(ch, m.dtype, name="input_blocks_0_0", kernels=m.kernels)(x.astype(m.dtype))
    hs, idx, ds = [h], 1, 1
    for level, mu in enumerate(mult):
        for _ in range(m.num_res_blocks):
            ch = int(mu * m.model_channels)
            h = _res(m, ch, f"input_blocks_{idx}_0")(h, emb, train)
            if ds in m.attention_resolutions:
                h = _attn(m, f"input_blocks_{idx}_1", m.num_heads)(h, encoder_out)
            hs.append(h)
            idx += 1
        if level != len(mult) - 1:
            name = f"input_blocks_{idx}_0"
            if m.resblock_updown:
                h = _res(m, ch, name, down=True)(h, emb, train)
            else:
                h = layers.Downsample(ch, dtype=m.dtype, name=name)(h)
            hs.append(h)
            idx += 1
            ds *= 2
    h = _res(m, ch, "middle_block_0")(h, emb, train)
    h = _attn(m, "middle_block_1", m.num_heads)(h, encoder_out)
    h = _res(m, ch, "middle_block_2")(h, emb, train)
    return h, hs


def up_path(m, h: jax.Array, hs: list, emb: jax.Array, train: bool, encoder_out: jax.Array | None = None):
    """Output blocks: ``down_path``'s mirror, each block first concatenating a skip connection.

    ``h`` the middle-block output, ``hs`` the skip connections (consumed);
    other arguments as in ``down_path``. Returns [B, H, W, channel_mult[0] * model_channels].
    """
    heads_up = m.num_heads if m.num_heads_upsample == -1 else m.num_heads_upsample
    ds, idx = 2 ** (len(m.channel_mult) - 1), 0
    for level, mu in reversed(list(enumerate(m.channel_mult))):
        for i in range(m.num_res_blocks + 1):
            h = jnp.concatenate([h, hs.pop()], axis=-1)
            ch = int(mu * m.model_channels)
            h = _res(m, ch, f"output_blocks_{idx}_0")(h, emb, train)
            j = 1
            if ds in m.attention_resolutions:
                h = _attn(m, f"output_blocks_{idx}_1", heads_up)(h, encoder_out)
                j = 2
            if level and i == m.num_res_blocks:
                name = f"output_blocks_{idx}_{j}"
                if m.resblock_updown:
                    h = _res(m, ch, name, up=True)(h, emb, train)
                else:
                    h = layers.Upsample(ch, dtype=m.dtype, kernels=m.kernels, name=name)(h)
                ds //= 2
            idx += 1
    return h


def unet_trunk(m, x: jax.Array, emb: jax.Array, train: bool, encoder_out: jax.Array | None = None) -> jax.Array:
    """The whole U-Net after the embeddings: ``down_path``, ``up_path``, then ``out`` (norm, SiLU, conv).

    Args as in ``down_path``. Returns [B, H, W, out_channels] float32.
    """
    h, hs = down_path(m, x, emb, train, encoder_out)
    h = up_path(m, h, hs, emb, train, encoder_out)
    h = nn.silu(layers.GroupNorm32(dtype=m.dtype, kernels=m.kernels, name="out_0")(h))
    h = layers.conv(m.out_channels, m.dtype, zero=True, name="out_2", kernels=m.kernels)(h)
    return h.astype(jnp.float32)


def check_image(
    x: jax.Array, image_size: int, in_channels: int, what: str = "x"
) -> None:
    """Raise ValueError unless x is [B, image_size, image_size, in_channels]."""
    want = (image_size, image_size, in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(
            f"{what} must be NHWC [B, {image_size}, {image_size}, {in_channels}], got shape {tuple(x.shape)}"
        )


def check_timesteps(timesteps: jax.Array, batch: int) -> None:
    if jnp.ndim(timesteps) != 1 or jnp.shape(timesteps)[0] != batch:
        raise ValueError(
            f"timesteps must have shape [{batch}], got {tuple(jnp.shape(timesteps))}"
        )


class UNet(nn.Module):
    """ADM U-Net: ``apply({'params': p}, x, timesteps, y=None, train=False)``.

    Attributes mirror OpenAI's ``UNetModel`` constructor; ``attention_resolutions``
    are downsample factors (1 = full resolution). ``channel_mult`` entries may be
    floats (the 512 model's 0.5): widths are ``int(mult * model_channels)``.
    ``null_label`` adds one embedding row, index ``num_classes``, as the
    classifier-free-guidance "no label" class. ``dtype`` is the compute dtype
    ("float32" | "bfloat16"); params are float32, the output is float32.
    ``kernels`` ("auto" | "cpu" | "xla") picks how GroupNorm, attention and
    the upsampling conv are computed (``models.kernels``); the parameters are
    the same, so ``module.clone(kernels="xla")`` runs the same checkpoint.

    Call args:
      x: [B, H, W, in_channels] with H = W = image_size.
      timesteps: [B] int or float32 (float when OpenAI rescales timesteps).
      y: [B] int labels, required iff ``num_classes`` is set.
      train: enables dropout (needs ``rngs={'dropout': key}``).

    Returns:
      [B, H, W, out_channels] float32 (eps first, then variance values).
    """

    image_size: int
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 3
    num_res_blocks: int = 2
    attention_resolutions: tuple = ()
    dropout: float = 0.0
    channel_mult: tuple = (1, 2, 2, 2)
    num_classes: int | None = None
    null_label: bool = False
    use_checkpoint: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dtype: str = "float32"
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, timesteps, y=None, train: bool = False):
        check_image(x, self.image_size, self.in_channels)
        return self._forward(x, timesteps, y, train)

    def _forward(self, x, timesteps, y, train):
        resolve_kernels(self.kernels)  # an unknown value fails here, before any layer
        check_timesteps(timesteps, x.shape[0])
        emb = time_embed(self, timesteps)
        if self.num_classes is not None:
            if y is None:
                raise ValueError(
                    "this model is class-conditional (num_classes set): pass y [B]"
                )
            if jnp.shape(y) != (x.shape[0],):
                raise ValueError(
                    f"y must have shape [{x.shape[0]}], got {tuple(jnp.shape(y))}"
                )
            rows = self.num_classes + int(self.null_label)
            emb = emb + nn.Embed(
                rows, emb.shape[-1], param_dtype=jnp.float32, name="label_emb"
            )(y)
        elif y is not None:
            raise ValueError(
                "y was given but the model is unconditional (num_classes is None)"
            )
        return unet_trunk(self, x, emb, train)


def bilinear_resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """[B, h, w, C] -> [B, height, width, C] like torch ``F.interpolate(mode="bilinear",
    align_corners=False)`` without antialiasing (half-pixel centres, edge clamp)."""
    shape = (x.shape[0], height, width, x.shape[-1])
    return jax.image.resize(x, shape, method="bilinear", antialias=False)


class SuperResUNet(UNet):
    """U-Net conditioned on a low-resolution image (OpenAI ``SuperResModel``).

    Call: ``apply({'params': p}, x, timesteps, low_res, y=None, train=False)``;
    ``low_res`` [B, h, w, C_lr] is upsampled bilinearly to x's size and
    concatenated after ``x`` on channels, so ``in_channels`` = C_x + C_lr.
    """

    @nn.compact
    def __call__(self, x, timesteps, low_res, y=None, train: bool = False):
        if low_res is None or low_res.ndim != 4 or low_res.shape[0] != x.shape[0]:
            raise ValueError(
                f"low_res must be NHWC [B={x.shape[0]}, h, w, C], got {getattr(low_res, 'shape', None)}"
            )
        up = bilinear_resize(low_res.astype(jnp.float32), x.shape[1], x.shape[2])
        h = jnp.concatenate([x.astype(jnp.float32), up], axis=-1)
        check_image(
            h, self.image_size, self.in_channels, what="concat([x, upsampled low_res])"
        )
        return self._forward(h, timesteps, y, train)
