"""3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016), for XLA:CPU.

Each 2x2 block of outputs is computed from the 4x4 input tile around it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A

with the element-wise product summed over input channels: 16 matrix
products [tiles, Cin] x [Cin, Cout] instead of 36 per 2x2 block, 2.25x fewer
multiply-adds than the direct convolution. B^T and A^T hold only 0 and +-1,
G only 0, +-1/2 and 1, so the transforms are exact sums in float32 and the
result differs from the direct convolution by rounding only (relative error
~1e-6 on unit-scale data, `tests/winograd_test.py`).

The gradient is hand-written: the input's is the same kind of convolution of
the output gradient with the kernel flipped and transposed (again Winograd);
the kernel's is summed over the same tiles, G^T [sum_tiles V^T dM] G with
dM = A dY A^T: 16 products with the tiles as the contracted axis, where XLA's
filter-gradient convolution first transposes both activations to [C, H, W, B]
(4-6 % of a training step in transposes alone). Autodiff through the tile
transforms would scatter-add slices and run 2-3x slower than the direct form.

Only ``kernels.conv3x3`` calls this, and only where it measured faster on
XLA:CPU (``use_winograd``); accelerators keep XLA's convolution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# F(2x2, 3x3) (Lavin & Gray 2016, section 4.1).
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def _combine(m, parts):
    """[sum_i m[a, i] * parts[i] for each row a of m]: element-wise adds, with a multiply only where |m[a, i]| != 1.

    Written out term by term so that XLA fuses each transform into one loop
    (an einsum with a 4x3 matrix became a dot plus two transposes).
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


def transform_kernel(kernel: jax.Array) -> jax.Array:
    """[3, 3, Cin, Cout] HWIO -> [16, Cin, Cout]: G g G^T for every (in, out) pair."""
    rows = _combine(G, [kernel[y] for y in range(3)])  # 4 x [3, Cin, Cout]
    u = jnp.stack([jnp.stack(_combine(G, [r[x] for x in range(3)])) for r in rows])  # [4, 4, Cin, Cout]
    return u.reshape(16, *kernel.shape[2:])


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 3x3 stride-1 convolution with PyTorch's padding 1, by F(2x2, 3x3).

    Args:
      x: [B, H, W, Cin] with H and W even.
      kernel: [3, 3, Cin, Cout] (HWIO), x's dtype.

    Returns:
      [B, H, W, Cout], no bias.
    """
    return _conv3x3(x, kernel)


def _input_tiles(x):
    """[B, H, W, Cin] -> [16, B*H/2*W/2, Cin]: B^T d B for every 4x4 tile (stride 2) of the padded image.

    Separable: the row transform over whole rows first, then the column
    transform; two fusions, where the 16 tile elements one by one took 17
    (1.6x slower on XLA:CPU).
    """
    _, h, w, cin = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = jnp.stack(_combine(B_T, [xp[:, i:i + h:2] for i in range(4)]))  # [4, B, H/2, W+2, Cin]
    tiles = jnp.stack(_combine(B_T, [rows[:, :, :, j:j + w:2] for j in range(4)]), axis=1)
    return tiles.reshape(16, -1, cin)


def _forward(x, kernel, transposed=False):
    """Y for x [B, H, W, C]; with ``transposed`` the kernel is [3, 3, Cout, C], used as [3, 3, C, Cout] (dx)."""
    b, h, w, _ = x.shape
    spec = "tnc,toc->tno" if transposed else "tnc,tco->tno"
    m = jnp.einsum(spec, _input_tiles(x), transform_kernel(kernel), preferred_element_type=x.dtype)
    m = m.reshape(4, 4, b, h // 2, w // 2, -1)
    # Y = A^T M A, columns then rows, laid out as [B, H/2, 2, W/2, 2, Cout].
    cols = jnp.stack(_combine(A_T, [m[:, j] for j in range(4)]), axis=-2)  # [4, B, H/2, W/2, 2, Cout]
    y = jnp.stack(_combine(A_T, [cols[i] for i in range(4)]), axis=2)
    return y.reshape(b, h, w, -1)


def _kernel_grad(x, g):
    """d(loss)/d(kernel) by the same tiling: G^T [sum over tiles of V^T dM] G, with dM = A dY A^T."""
    cout = g.shape[-1]
    a = A_T.T
    # dY at each 2x2 output phase (p, q); dM[i, j] = sum_pq A_T[p, i] A_T[q, j] dY[p, q], columns then rows.
    cols = [jnp.stack(_combine(a, [g[:, p::2, q::2] for q in range(2)])) for p in range(2)]  # [4, B, H/2, W/2, C]
    dm = jnp.stack(_combine(a, cols)).reshape(16, -1, cout)
    du = jnp.einsum("tnc,tno->tco", _input_tiles(x), dm, preferred_element_type=x.dtype)
    du = du.reshape(4, 4, *du.shape[1:])
    rows = _combine(G.T, [du[a] for a in range(4)])  # 3 x [4, Cin, Cout]
    return jnp.stack([jnp.stack(_combine(G.T, [r[b] for b in range(4)])) for r in rows])


@jax.custom_vjp
def _conv3x3(x, kernel):
    return _forward(x, kernel)


def _fwd(x, kernel):
    return _forward(x, kernel), (x, kernel)


def _bwd(res, g):
    x, kernel = res
    # d/dx of a stride-1, padding-1 3x3 conv: the same conv of g with the kernel rotated 180 degrees
    # and its in/out channels swapped (the swap left to the GEMM: no transposed copy).
    dx = _forward(g, kernel[::-1, ::-1], transposed=True)
    return dx.astype(x.dtype), _kernel_grad(x, g).astype(kernel.dtype)


_conv3x3.defvjp(_fwd, _bwd)


def use_winograd(x_shape, kernel_shape) -> bool:
    """Whether F(2x2, 3x3) beat XLA:CPU's direct convolution for this shape (whole-model A/B, README).

    Faster from 16x16 images up with at least 64 input channels; below that
    the tile transforms cost more than the multiply-adds they save.
    """
    _, h, w, cin = x_shape
    return h % 2 == 0 and w % 2 == 0 and h * w >= 256 and cin >= 64 and kernel_shape[:2] == (3, 3)
