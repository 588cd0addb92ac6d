"""models.winograd: F(2x2, 3x3) and F(4x4, 3x3) equal XLA's convolution, values and gradients, and is used only where chosen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import kernels, winograd


def _direct(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("m,shape", [(2, (2, 4, 6, 3, 5)), (2, (1, 16, 16, 64, 8)), (4, (2, 8, 12, 3, 5)),
                                     (4, (1, 32, 32, 64, 8))])
def test_matches_direct_convolution_and_its_gradients(m, shape):
    b, h, w, cin, cout = shape
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, h, w, cin))
    k = jax.random.normal(kk, (3, 3, cin, cout)) / np.sqrt(9 * cin)
    g = jax.random.normal(kg, (b, h, w, cout))
    y, vjp = jax.vjp(lambda x, k: winograd.conv3x3(x, k, winograd.VARIANTS[m]), x, k)
    y_ref, vjp_ref = jax.vjp(_direct, x, k)
    # F(2x2)'s transforms are exact in float32 (measured ~7e-7 of the largest value); F(4x4)'s G rounds
    # (1/6, 1/24) and its entries up to 8 amplify rounding: ~5e-6 measured, bounded at 1.5e-5.
    tol_y, tol_grad = (2e-6, 3e-6) if m == 2 else (1.5e-5, 1.5e-5)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=tol_y * float(jnp.max(jnp.abs(y_ref))))
    for got, want in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol_grad * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("m", [2, 4])
def test_float64_agrees_to_rounding(m):
    """The transforms are exact algebra: in float64 only rounding separates them from the direct form."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (1, 8, 4, 2), jnp.float64)
        k = jax.random.normal(jax.random.key(2), (3, 3, 2, 3), jnp.float64)
        y = winograd.conv3x3(x, k, winograd.VARIANTS[m])
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(y, _direct(x, k), rtol=1e-12, atol=1e-12)


def test_tile_size_must_divide_the_image():
    with pytest.raises(ValueError, match="multiples of 4"):
        winograd.conv3x3(jnp.ones((1, 6, 8, 2)), jnp.ones((3, 3, 2, 3)), winograd.F4)


def test_dispatch_only_on_the_cpu_form_and_chosen_shapes(monkeypatch):
    calls = []
    monkeypatch.setattr(winograd, "conv3x3", lambda x, k, v: calls.append(x.shape) or _direct(x, k))
    big, small = jnp.ones((1, 16, 16, 64)), jnp.ones((1, 8, 8, 64))
    k = jnp.ones((3, 3, 64, 4))
    kernels.conv3x3(big, k, kernels="xla")
    kernels.conv3x3(small, k, kernels="cpu")  # 8x8: the transforms cost more than they save
    kernels.conv3x3(jnp.ones((1, 16, 16, 32)), jnp.ones((3, 3, 32, 4)), kernels="cpu")
    assert calls == []
    kernels.conv3x3(big, k, kernels="cpu")
    assert calls == [big.shape]
    assert not winograd.use_winograd((1, 17, 16, 64), (3, 3, 64, 4))  # odd sizes: no 2x2 tiling
    assert winograd.variant((1, 32, 32, 64), (3, 3, 64, 4)) is winograd.F4
    assert winograd.variant((1, 16, 16, 64), (3, 3, 64, 4)) is winograd.F2
    assert winograd.variant((1, 34, 34, 64), (3, 3, 64, 4)) is winograd.F2  # not a multiple of 4
