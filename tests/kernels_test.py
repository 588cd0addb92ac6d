"""The fast formulations in models/kernels.py against their textbook forms (values and gradients)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import kernels

_NHWC = ("NHWC", "HWIO", "NHWC")


def _textbook_group_norm(x, scale, bias, groups, eps):
    g = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    return ((g - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _close(a, b, rtol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        scale = np.max(np.abs(v)) + 1e-30
        assert np.max(np.abs(u - v)) / scale < rtol, np.max(np.abs(u - v)) / scale


@pytest.mark.parametrize("shape", [(3, 8, 8, 64), (2, 5, 7, 32), (4, 96), (2, 4, 4, 4, 64)])
def test_group_norm_matches_textbook(shape):
    kx, ks, kb, kc = jax.random.split(jax.random.key(0), 4)
    x = 3.0 * jax.random.normal(kx, shape) + 2.0
    c = shape[-1]
    scale, bias = 1 + jax.random.normal(ks, (c,)), jax.random.normal(kb, (c,))
    ct = jax.random.normal(kc, shape)
    _close(kernels.group_norm(x, scale, bias, 32, 1e-5), _textbook_group_norm(x, scale, bias, 32, 1e-5), 2e-6)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a, 32, 1e-5) * ct), argnums=(0, 1, 2))(x, scale, bias)
             for f in (kernels.group_norm, _textbook_group_norm)]
    _close(grads[0], grads[1], 1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 8, 16, 24), (3, 5, 7, 8, 8), (1, 1, 1, 4, 4)])
def test_conv3x3_value_and_gradients_match_lax(shape):
    b, h, w, cin, cout = shape
    kx, kw, kc = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (b, h, w, cin))
    k = jax.random.normal(kw, (3, 3, cin, cout)) / math.sqrt(9 * cin)
    ct = jax.random.normal(kc, (b, h, w, cout))
    lax_conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
    _close(kernels.conv3x3(x, k), lax_conv(x, k), 1e-6)
    got = jax.grad(lambda x, k: jnp.sum(kernels.conv3x3(x, k) * ct), argnums=(0, 1))(x, k)
    want = jax.grad(lambda x, k: jnp.sum(lax_conv(x, k) * ct), argnums=(0, 1))(x, k)
    _close(got, want, 1e-5)


def test_conv_dispatch_routes_only_plain_3x3():
    x = jnp.ones((1, 6, 6, 4))
    dn = jax.lax.conv_dimension_numbers(x.shape, (3, 3, 4, 4), _NHWC)
    calls = []
    orig = kernels.conv3x3
    try:
        kernels.conv3x3 = lambda *a: calls.append(1) or orig(*a)
        kernels.conv_general_dilated(x, jnp.ones((3, 3, 4, 4)), (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        assert len(calls) == 1
        kernels.conv_general_dilated(x, jnp.ones((3, 3, 4, 4)), (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
        dn1 = jax.lax.conv_dimension_numbers(x.shape, (1, 1, 4, 4), _NHWC)
        out = kernels.conv_general_dilated(x, jnp.ones((1, 1, 4, 4)), (1, 1), ((0, 0), (0, 0)),
                                           dimension_numbers=dn1)
        assert len(calls) == 1 and out.shape == (1, 6, 6, 4)
    finally:
        kernels.conv3x3 = orig


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_attention_matches_dot_product_attention(dtype, rtol):
    kq, kk, kv, kc = jax.random.split(jax.random.key(2), 4)
    shape = (2, 10, 3, 8)  # [B, T, heads, ch]
    q, k, v = (2 * jax.random.normal(key, shape).astype(dtype) for key in (kq, kk, kv))
    ct = jax.random.normal(kc, shape).astype(dtype)
    want_fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1 / math.sqrt(8))
    _close(kernels.attention(q, k, v), want_fn(q, k, v), rtol)
    got = jax.grad(lambda *a: jnp.sum(kernels.attention(*a) * ct).astype(jnp.float32), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(want_fn(*a) * ct).astype(jnp.float32), argnums=(0, 1, 2))(q, k, v)
    _close(got, want, 5 * rtol)
