"""The U-Net's hot spots in two forms, one per backend: ``kernels="cpu" | "xla"``.

Every network (``UNet``, ``SuperResUNet``, ``EncoderUNet``, GLIDE's) has a
field ``kernels: str = "auto"``; ``resolve_kernels`` turns it into ``"cpu"``
(on the CPU backend) or ``"xla"`` (anything else) at trace time. Both forms
compute the same function with the same parameters, so
``module.clone(kernels="xla")`` runs a checkpoint trained with the other.

``"cpu"``: hand-written for XLA:CPU, each kept only after a paired A/B on
this machine (figures: ``bench/model.py``, ``bench/train.py``):

- ``group_norm_cpu``: sums every channel over the spatial axes first (a
  contiguous reduction), then averages each group with a small [C, C] dot,
  so the [B, C] statistics are materialised instead of being recomputed per
  element inside the normalising loop; a hand-written backward takes two
  reductions and one elementwise pass. Reducing the ``[B, HW, G, C/G]`` view
  in one go is ~5x slower on XLA:CPU.
- ``attention_cpu``: heads moved ahead of the sequence once, so every einsum
  is a plain batched GEMM; the forward normalises the [T, ch] output rather
  than the [T, S] weights, and a hand-written backward reuses the saved
  exponentials (a block's gradient 33 -> 18 ms against autodiff's). It keeps
  the [T, S] weights: O(T*S) memory.
- ``upsample_conv3x3_cpu``: a 3x3 conv of a nearest-neighbour 2x upsampled
  image as four 2x2 convs of the small image, one per output phase (16 taps
  per input pixel instead of 36), interleaved.

``"xla"``: the textbook forms. TPU and GPU compilers fuse these well on
their own (the CPU tricks above would only get in their way), and the
attention goes through JAX's one entry point to the fused kernels:

- ``group_norm_xla``: mean and variance of the ``[B, N, G, C/G]`` view in
  float32 (two passes, as torch), autodiff backward.
- ``attention_xla``: ``jax.nn.dot_product_attention`` on [B, T, heads, ch]:
  float32 logits and softmax, the weights cast to the value dtype before
  the second matmul (OpenAI's fp16 semantics). On GPU with bf16/fp16 inputs
  it requests cuDNN's flash attention (O(T) memory; ADM-256 attends over
  1024 tokens), falling back where cuDNN refuses the shapes; elsewhere
  JAX's XLA form (einsum, float32 softmax, einsum), which the TPU and GPU
  compilers fuse. JAX 0.10's ``implementation=None`` never picks cuDNN by
  itself. The cuDNN branch has not run here (no GPU was lent).
- ``upsample_conv3x3_xla``: the plain 3x3 conv of the nearest-upsampled
  image.

Both attention forms scale the float32 logits by 1/sqrt(ch); OpenAI scales q
and k by ch^-1/4 each before the matmul (for fp16 range), the same product
up to rounding. Convolutions and matmuls are XLA's own in both settings;
``diffusion_jax.runtime.xla_flags`` routes them to XLA:CPU's Eigen kernels.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import winograd

KERNELS = ("auto", "cpu", "xla")


def resolve_kernels(kernels: str) -> str:
    """A module's ``kernels`` field -> ``"cpu"`` or ``"xla"``.

    ``"auto"`` is ``"cpu"`` on JAX's CPU backend and ``"xla"`` on any other
    (TPU, GPU), read when the module is traced.

    Raises:
      ValueError: for anything but ``"auto"``, ``"cpu"``, ``"xla"``.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return kernels


def _group_mean(sums: jax.Array, num_groups: int, n: int) -> jax.Array:
    """[B, C] per-channel sums -> [B, C], each channel holding its group's mean.

    A [C, C] block-diagonal dot rather than a reshape-sum-repeat: XLA fuses
    the latter into the consumer's loop as per-element index arithmetic
    (~2x slower loops); a dot's result is materialised.
    """
    c = sums.shape[-1]
    per_group = c // num_groups
    same_group = np.kron(np.eye(num_groups, dtype=np.float32), np.full((per_group, per_group), 1.0 / n, np.float32))
    return jnp.dot(sums, jnp.asarray(same_group), precision=jax.lax.Precision.HIGHEST)


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
    b, c = x.shape[0], x.shape[-1]
    flat = x.reshape(b, -1, c)
    n = flat.shape[1] * (c // num_groups)
    mean = _group_mean(jnp.sum(flat, axis=1), num_groups, n)
    var = _group_mean(jnp.sum(jnp.square(flat - mean[:, None, :]), axis=1), num_groups, n)
    inv_std = jax.lax.rsqrt(var + epsilon)
    a = inv_std * scale
    y = flat * a[:, None, :] + (bias - mean * a)[:, None, :]
    return y.reshape(x.shape), (x, scale, mean, inv_std)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_cpu(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
                   epsilon: float) -> jax.Array:
    """``group_norm``'s XLA:CPU form: per-channel sums, group means by a [C, C] dot, custom VJP."""
    return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_bwd(num_groups, epsilon, res, g):
    # With xhat = (x - mean) * inv_std and dxhat = g * scale:
    #   dx = inv_std * (dxhat - mean_group(dxhat) - xhat * mean_group(dxhat * xhat)).
    # Two reductions over the activations, then one elementwise pass.
    x, scale, mean, inv_std = res
    b, c = x.shape[0], x.shape[-1]
    centred, g = x.reshape(b, -1, c) - mean[:, None, :], g.reshape(b, -1, c)
    n = centred.shape[1] * (c // num_groups)
    sum_g = jnp.sum(g, axis=1)  # [B, C]
    sum_g_xhat = inv_std * jnp.sum(g * centred, axis=1)
    mean_dxhat = _group_mean(scale * sum_g, num_groups, n)
    mean_dxhat_xhat = _group_mean(scale * sum_g_xhat, num_groups, n)
    coef_g, coef_x = inv_std * scale, inv_std * inv_std * mean_dxhat_xhat
    dx = g * coef_g[:, None, :] - centred * coef_x[:, None, :] - (inv_std * mean_dxhat)[:, None, :]
    # Batch sums of the [B, C] partial sums as a dot: XLA would merge a second reduce into the
    # first and re-read the activations for it.
    ones = jnp.ones((b,), sum_g.dtype)
    dscale, dbias = (jnp.dot(ones, s, precision=jax.lax.Precision.HIGHEST) for s in (sum_g_xhat, sum_g))
    return dx.reshape(x.shape), _sum_over_extra_axes(dscale, scale), _sum_over_extra_axes(dbias, scale)


def _sum_over_extra_axes(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Inside `shard_map`, the cotangent of a parameter replicated over mesh axes that the activations vary
    over is the sum over those axes (what autodiff's transpose of the implicit broadcast gives); outside it, a
    no-op."""
    extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


def _varying_axes(x: jax.Array) -> frozenset:
    """The mesh axes `x` varies over inside `shard_map` (JAX 0.10: `manual_axis_type.varying`; before: `vma`)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


group_norm_cpu.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm_xla(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
                   epsilon: float) -> jax.Array:
    """``group_norm``'s textbook form: mean and variance of the [B, N, G, C/G] view, autodiff."""
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, num_groups, c // num_groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    return ((g - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape) * scale + bias


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float, *,
               kernels: str = "auto") -> jax.Array:
    """GroupNorm (Wu & He 2018) over every axis but the first (batch) and the last (channels, grouped).

    ``y = (x - mean_g) / sqrt(var_g + epsilon) * scale + bias`` with two-pass
    statistics as torch forms them: the group mean, then E[(x - mean)^2].

    Args:
      x: [B, ..., C] float32.
      scale, bias: [C].
      num_groups: G, dividing C.
      epsilon: added to the variance.
      kernels: "cpu" | "xla" | "auto" (see the module docstring).

    Returns:
      [B, ..., C] float32.
    """
    fn = group_norm_cpu if resolve_kernels(kernels) == "cpu" else group_norm_xla
    return fn(x, scale, bias, num_groups, epsilon)


def _unnormalised(q: jax.Array, k: jax.Array):
    """exp(logits - rowmax) and its row sums, float32: ([B, heads, T, S], [B, heads, T, 1])."""
    logits = jnp.einsum("bhtc,bhsc->bhts", q, k, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / math.sqrt(q.shape[-1]))
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return e, jnp.sum(e, axis=-1, keepdims=True)


def _attention_fwd(q, k, v):
    # Normalising the [T, ch] output instead of the [T, S] weights saves a pass.
    e, total = _unnormalised(q, k)
    out = jnp.einsum("bhts,bhsc->bhtc", e.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
    out = out.astype(v.dtype)
    return out, (q, k, v, e, total, out)


@jax.custom_vjp
def _attention_heads(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return _attention_fwd(q, k, v)[0]


def _attention_bwd(res, g):
    q, k, v, e, total, out = res
    w = e / total
    dv = jnp.einsum("bhts,bhtc->bhsc", w.astype(g.dtype), g)
    dw = jnp.einsum("bhtc,bhsc->bhts", g, v, preferred_element_type=jnp.float32)
    # Softmax backward: sum_s dw*w equals g . out row by row; then the 1/sqrt(ch) scale.
    g_dot_out = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dlogits = (w * (dw - g_dot_out) * (1.0 / math.sqrt(q.shape[-1]))).astype(q.dtype)
    dq = jnp.einsum("bhts,bhsc->bhtc", dlogits, k)
    dk = jnp.einsum("bhts,bhtc->bhsc", dlogits, q)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention_heads.defvjp(_attention_fwd, _attention_bwd)


def attention_cpu(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``attention``'s XLA:CPU form: head-major GEMMs, output normalised, custom VJP."""
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, heads, T, ch]
    return jnp.swapaxes(_attention_heads(q, k, v), 1, 2)


# Errors JAX's cuDNN attention raises at trace time for shapes, dtypes or cuDNN versions outside
# its flash kernel (head size, sequence length, compute capability).
_CUDNN_INELIGIBLE = (ValueError, NotImplementedError, RuntimeError, TypeError)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``attention``'s textbook form: ``jax.nn.dot_product_attention`` (float32 logits and softmax).

    On GPU with bf16/fp16 inputs it asks for cuDNN's fused flash attention
    (O(T) memory); JAX 0.10's ``implementation=None`` always takes the XLA
    path, so the choice is made here, falling back to XLA's form where cuDNN
    refuses the shapes at trace time. Elsewhere (TPU, float32) XLA's form.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except _CUDNN_INELIGIBLE:
            pass
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=None)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kernels: str = "auto") -> jax.Array:
    """Scaled dot-product attention (Vaswani et al. 2017, Eq. 1), all heads at once.

    ``softmax(q k^T / sqrt(ch)) v`` per head, logits and softmax in float32.

    Args:
      q: [B, T, heads, ch] queries.
      k, v: [B, S, heads, ch] keys and values (same dtype as ``q``).
      kernels: "cpu" | "xla" | "auto" (see the module docstring).

    Returns:
      [B, T, heads, ch] in ``v``'s dtype.
    """
    fn = attention_cpu if resolve_kernels(kernels) == "cpu" else attention_xla
    return fn(q, k, v)


# Rows (or columns) of a 3x3 kernel that see each input row after 2x nearest upsampling:
# output phase 0 reads input offsets (-1, 0) with taps (w0, w1 + w2); phase 1 reads (0, +1)
# with (w0 + w1, w2).
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)
_PHASE_PAD = ((1, 0), (0, 1))


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], nearest neighbour (torch ``F.interpolate(mode="nearest")``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv3x3(x: jax.Array, kernel: jax.Array, *, kernels: str = "auto") -> jax.Array:
    """The 3x3 stride-1 convolution with PyTorch's padding 1 (OpenAI's ``conv_nd(dims, c, c, 3, padding=1)``).

    ``"cpu"``: Winograd's F(4x4, 3x3) or F(2x2, 3x3) (``models.winograd``) for
    the shapes where it measured faster on XLA:CPU (``winograd.variant``),
    XLA's convolution for the rest. ``"xla"``: XLA's convolution.

    Args:
      x: [B, H, W, Cin].
      kernel: [3, 3, Cin, Cout] (HWIO), in x's dtype.

    Returns:
      [B, H, W, Cout], no bias.
    """
    v = winograd.variant(x.shape, kernel.shape, x.dtype) if resolve_kernels(kernels) == "cpu" else None
    if v is not None:
        return winograd.conv3x3(x, kernel, v)
    return _conv3x3(x, kernel)


def conv1x1(x: jax.Array, kernel: jax.Array, *, kernels: str = "auto") -> jax.Array:
    """The 1x1 convolution (OpenAI's ``conv_nd(dims, c, c_out, 1)`` skip connections).

    ``"cpu"``: one GEMM over the flattened pixels. XLA:CPU's convolution took
    its kernel gradient through copies of both activations to [C, H, W, B]
    (~12 ms of the reference training step). ``"xla"``: XLA's convolution.

    Args:
      x: [B, H, W, Cin].
      kernel: [1, 1, Cin, Cout] (HWIO), in x's dtype.

    Returns:
      [B, H, W, Cout], no bias.
    """
    if resolve_kernels(kernels) == "cpu":
        return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((0, 0), (0, 0)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def upsample_conv3x3_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``upsample_conv3x3``'s textbook form: the 3x3 conv of the upsampled image."""
    return _conv3x3(upsample_nearest(x), kernel)


def upsample_conv3x3(x: jax.Array, kernel: jax.Array, *, kernels: str = "auto") -> jax.Array:
    """conv3x3(nearest_upsample_2x(x)) with PyTorch's padding 1 (OpenAI ``Upsample(use_conv=True)``).

    Args:
      x: [B, H, W, Cin].
      kernel: [3, 3, Cin, Cout] (HWIO), in x's dtype.
      kernels: "cpu" | "xla" | "auto" (see the module docstring).

    Returns:
      [B, 2H, 2W, Cout], no bias.
    """
    fn = upsample_conv3x3_cpu if resolve_kernels(kernels) == "cpu" else upsample_conv3x3_xla
    return fn(x, kernel)


def upsample_conv3x3_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``upsample_conv3x3`` without the upsampled image: four 2x2 phase convs of ``x``, interleaved.

    The same sum as the textbook form up to float rounding: the kernel taps
    that see the same input pixel are added first.
    """
    b, h, w, _ = x.shape
    taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
    rows = []
    for a in range(2):
        cols = []
        for c in range(2):
            k = jnp.einsum("ry,sx,yxio->rsio", taps[a], taps[c], kernel, precision=jax.lax.Precision.HIGHEST)
            cols.append(jax.lax.conv_general_dilated(x, k, (1, 1), (_PHASE_PAD[a], _PHASE_PAD[c]),
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2, Cout]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, kernel.shape[-1])
