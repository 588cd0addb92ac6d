"""The U-Net's hot spots, written the way XLA compiles them fastest.

Each function computes exactly what its textbook form computes (the tests
compare both, values and gradients); only the arrangement differs:

- ``group_norm``: sums every channel over the spatial axes first (a
  contiguous reduction), then the channels of a group. Reducing the
  ``[B, HW, G, C/G]`` view in one go is ~5x slower on XLA:CPU.
- ``conv2d``: a 3x3, stride-1, padded convolution whose weight gradient is
  three GEMMs over a channel-major im2col of the input (one per kernel row),
  1.3-2x faster on XLA:CPU than the backward convolution XLA emits.
- ``attention``: softmax(q k^T / sqrt(ch)) v with heads moved ahead of the
  sequence once, so both einsums are plain batched GEMMs.

Figures: ``bench/model.py`` and ``bench/train.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               epsilon: float) -> jax.Array:
    """GroupNorm over every axis but the first (batch) and the last (channels, grouped).

    Two-pass statistics as torch forms them: the group mean, then
    E[(x - mean)^2]. ``x`` [B, ..., C] float32; ``scale``/``bias`` [C].
    """
    b, c = x.shape[0], x.shape[-1]
    per_group = c // num_groups
    flat = x.reshape(b, -1, c)
    n = flat.shape[1] * per_group

    def group_mean(v):  # [B, P, C] -> [B, C], each channel holding its group's mean
        sums = jnp.sum(v, axis=1).reshape(b, num_groups, per_group)
        return jnp.repeat(jnp.sum(sums, axis=-1) / n, per_group, axis=-1)

    centred = flat - group_mean(flat)[:, None, :]
    inv_std = jax.lax.rsqrt(group_mean(jnp.square(centred)) + epsilon)
    y = centred * (inv_std * scale)[:, None, :] + bias
    return y.reshape(x.shape)


def _conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


@jax.custom_vjp
def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """3x3 convolution, stride 1, zero padding 1: x [B,H,W,Cin], w [3,3,Cin,Cout]."""
    return _conv3x3(x, w)


def _conv3x3_fwd(x, w):
    return _conv3x3(x, w), (x, w)


def _conv3x3_bwd(res, g):
    x, w = res
    dx = jax.vjp(lambda v: _conv3x3(v, w), x)[1](g)[0]
    b, h, wd, c = x.shape
    # Channel-major padded input: rows of the im2col matrix are contiguous.
    xp = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (1, 1), (1, 1)))
    g2 = g.reshape(b * h * wd, -1).astype(x.dtype)
    rows = []
    for i in range(3):  # kernel row i: [3*Cin, BHW] @ [BHW, Cout]
        cols = jnp.concatenate([xp[:, :, i:i + h, j:j + wd] for j in range(3)], axis=0)
        rows.append(jnp.dot(cols.reshape(3 * c, -1), g2, preferred_element_type=jnp.float32))
    dw = jnp.stack(rows).reshape(w.shape).astype(w.dtype)
    return dx, dw


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` for ``flax.linen.Conv``, routing plain 3x3 convs to ``conv3x3``."""
    plain = (
        rhs.shape[:2] == (3, 3)
        and tuple(window_strides) == (1, 1)
        and [tuple(p) for p in padding] == [(1, 1), (1, 1)]
        and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
        and feature_group_count == 1
        and precision is None
        and lhs.ndim == 4
        and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    if plain:
        return conv3x3(lhs, rhs)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(ch)) v for q, k, v [B, T, heads, ch]; softmax in float32.

    Returns [B, T, heads, ch] in ``v``'s dtype.
    """
    ch = q.shape[-1]
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, heads, T, ch]
    logits = jnp.einsum("bhtc,bhsc->bhts", q, k, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / math.sqrt(ch))
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits)
    weights = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)
    out = jnp.einsum("bhts,bhsc->bhtc", weights, v)
    return jnp.swapaxes(out, 1, 2)
