"""3x3 stride-1 convolutions by Winograd's minimal filtering F(m x m, 3x3) (Lavin & Gray 2016), for XLA:CPU.

Each m x m block of outputs is computed from the (m+2) x (m+2) input tile
around it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A

with the element-wise product summed over input channels: (m+2)^2 matrix
products [tiles, Cin] x [Cin, Cout] instead of 9 m^2 multiply-adds per
output pixel in the direct form: 2.25x fewer for F(2x2, 3x3), 4x fewer for
F(4x4, 3x3).

- F(2x2, 3x3): B^T and A^T hold only 0 and +-1, G only 0, +-1/2 and 1; the
  transforms are exact in float32 (~6e-7 relative to the direct convolution).
- F(4x4, 3x3): interpolation points 0, +-1, +-2 and infinity; G's 1/6 and
  1/24 round and entries up to 8 amplify rounding: ~5e-6 of the largest
  output (``tests/winograd_test.py`` bounds both; the OpenAI parity fixtures
  pass unchanged).

The gradient is hand-written: the input's is the same kind of convolution of
the output gradient with the kernel flipped and transposed (again Winograd);
the kernel's is summed over the same tiles, G^T [sum_tiles V^T dM] G with
dM = A dY A^T, where XLA's filter-gradient convolution first transposes both
activations to [C, H, W, B]. Autodiff through the tile transforms would
scatter-add slices and run 2-3x slower than the direct form.

Only ``kernels.conv3x3`` calls this, and only where it measured faster on
XLA:CPU (``variant``); accelerators keep XLA's convolution.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Variant(NamedTuple):
    """F(m x m, 3x3): output tile m, input tile m + 2, and its three transforms."""

    m: int
    B_T: np.ndarray  # [m+2, m+2] input transform
    G: np.ndarray  # [m+2, 3] kernel transform
    A_T: np.ndarray  # [m, m+2] output transform


# Lavin & Gray 2016, sections 4.1 and 4.2.
F2 = Variant(
    2,
    np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
    np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64),
    np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64))
F4 = Variant(
    4,
    np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
    np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
    np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64))
VARIANTS = {2: F2, 4: F4}


def _combine(m, parts):
    """[sum_i m[a, i] * parts[i] for each row a of m]: element-wise adds, with a multiply only where |m[a, i]| != 1.

    Written out term by term so that XLA fuses each transform into one loop
    (an einsum with a small matrix became a dot plus two transposes).
    """
    out = []
    for row in m:
        acc = None
        for c, p in zip(row, parts):
            c = float(c)
            if c == 0:
                continue
            term = p if abs(c) == 1 else p * c
            if acc is None:
                acc = -term if c == -1 else term
            else:
                acc = acc - term if c == -1 else acc + term
        out.append(acc)
    return out


def transform_kernel(kernel: jax.Array, v: Variant) -> jax.Array:
    """[3, 3, Cin, Cout] HWIO -> [(m+2)^2, Cin, Cout]: G g G^T for every (in, out) pair."""
    rows = _combine(v.G, [kernel[y] for y in range(3)])  # m+2 x [3, Cin, Cout]
    u = jnp.stack([jnp.stack(_combine(v.G, [r[x] for x in range(3)])) for r in rows])
    return u.reshape(-1, *kernel.shape[2:])


def variant(x_shape, kernel_shape, dtype=jnp.float32) -> Variant | None:
    """The F(m x m, 3x3) that measured fastest on XLA:CPU for this shape; None: XLA's direct convolution.

    Whole-model A/B on the reference training step (README, "Layout, benchmarks, kernels"):
    F(4x4) from 32x32 images up, F(2x2) at 16x16; below 256 pixels or 64
    input channels the tile transforms cost more than the multiply-adds they
    save. F(4x4) only in float32: its larger transform entries (up to 8)
    cost bfloat16 ~20 % more error than F(2x2) or the direct form.
    """
    _, h, w, cin = x_shape
    if kernel_shape[:2] != (3, 3) or cin < 64 or h * w < 256:
        return None
    if h % 4 == 0 and w % 4 == 0 and h * w >= 1024 and jnp.dtype(dtype) == jnp.float32:
        return F4
    if h % 2 == 0 and w % 2 == 0:
        return F2
    return None


def use_winograd(x_shape, kernel_shape) -> bool:
    """Whether ``variant`` picks a Winograd form for this shape."""
    return variant(x_shape, kernel_shape) is not None


def conv3x3(x: jax.Array, kernel: jax.Array, v: Variant | None = None) -> jax.Array:
    """The 3x3 stride-1 convolution with PyTorch's padding 1, by F(m x m, 3x3).

    Args:
      x: [B, H, W, Cin] with H and W multiples of m.
      kernel: [3, 3, Cin, Cout] (HWIO), x's dtype.
      v: F2 or F4; None: ``variant``'s choice (F2 where it has none).

    Returns:
      [B, H, W, Cout], no bias.
    """
    v = v or variant(x.shape, kernel.shape, x.dtype) or F2
    if x.shape[1] % v.m or x.shape[2] % v.m:
        raise ValueError(f"F({v.m}x{v.m}, 3x3) needs H and W multiples of {v.m}, got {x.shape[1:3]}")
    return _conv3x3(x, kernel, v.m)


def _input_tiles(x, v: Variant):
    """[B, H, W, Cin] -> [(m+2)^2, B*H/m*W/m, Cin]: B^T d B for every (m+2)-square tile (stride m), padding 1.

    Separable: the row transform over whole rows first, then the column
    transform; two fusions, where the tile elements one by one took 17
    (1.6x slower on XLA:CPU).
    """
    _, h, w, cin = x.shape
    r, m = v.m + 2, v.m
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = jnp.stack(_combine(v.B_T, [xp[:, i:i + h:m] for i in range(r)]))  # [r, B, H/m, W+2, Cin]
    tiles = jnp.stack(_combine(v.B_T, [rows[:, :, :, j:j + w:m] for j in range(r)]), axis=1)
    return tiles.reshape(r * r, -1, cin)


def _forward(x, kernel, v: Variant, transposed=False):
    """Y for x [B, H, W, C]; with ``transposed`` the kernel is [3, 3, Cout, C], used as [3, 3, C, Cout] (dx)."""
    b, h, w, _ = x.shape
    r, m = v.m + 2, v.m
    spec = "tnc,toc->tno" if transposed else "tnc,tco->tno"
    mm = jnp.einsum(spec, _input_tiles(x, v), transform_kernel(kernel, v), preferred_element_type=x.dtype)
    mm = mm.reshape(r, r, b, h // m, w // m, -1)
    # Y = A^T M A, columns then rows, laid out as [B, H/m, m, W/m, m, Cout].
    cols = jnp.stack(_combine(v.A_T, [mm[:, j] for j in range(r)]), axis=-2)  # [r, B, H/m, W/m, m, Cout]
    y = jnp.stack(_combine(v.A_T, [cols[i] for i in range(r)]), axis=2)
    return y.reshape(b, h, w, -1)


def _kernel_grad(x, g, v: Variant):
    """d(loss)/d(kernel) by the same tiling: G^T [sum over tiles of V^T dM] G, with dM = A dY A^T."""
    r, m = v.m + 2, v.m
    cout = g.shape[-1]
    a = v.A_T.T
    # dY at each output phase (p, q); dM[i, j] = sum_pq A_T[p, i] A_T[q, j] dY[p, q], columns then rows.
    cols = [jnp.stack(_combine(a, [g[:, p::m, q::m] for q in range(m)])) for p in range(m)]  # [r, B, H/m, W/m, C]
    dm = jnp.stack(_combine(a, cols)).reshape(r * r, -1, cout)
    du = jnp.einsum("tnc,tno->tco", _input_tiles(x, v), dm, preferred_element_type=x.dtype)
    du = du.reshape(r, r, *du.shape[1:])
    rows = _combine(v.G.T, [du[i] for i in range(r)])  # 3 x [r, Cin, Cout]
    return jnp.stack([jnp.stack(_combine(v.G.T, [row[j] for j in range(r)])) for row in rows])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x, kernel, m):
    return _forward(x, kernel, VARIANTS[m])


def _fwd(x, kernel, m):
    return _forward(x, kernel, VARIANTS[m]), (x, kernel)


def _bwd(m, res, g):
    x, kernel = res
    v = VARIANTS[m]
    # d/dx of a stride-1, padding-1 3x3 conv: the same conv of g with the kernel rotated 180 degrees
    # and its in/out channels swapped (the swap left to the GEMM: no transposed copy).
    dx = _forward(g, kernel[::-1, ::-1], v, transposed=True)
    return dx.astype(x.dtype), _kernel_grad(x, g, v).astype(kernel.dtype)


_conv3x3.defvjp(_fwd, _bwd)
