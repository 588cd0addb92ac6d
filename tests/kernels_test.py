"""The fast formulations in models/kernels.py against their textbook forms (values and gradients)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import kernels


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
# The second case: float32 holds x only to ~1e-4 of its spread, but a one-pass
# E[x^2] - E[x]^2 variance would be off by percents.
@pytest.mark.parametrize("std,offset,rtol", [(3.0, 2.0, 2e-6), (0.05, 40.0, 5e-4)])
def test_group_norm_matches_textbook(shape, std, offset, rtol):
    kx, ks, kb, kc = jax.random.split(jax.random.key(0), 4)
    x = std * jax.random.normal(kx, shape) + offset
    c = shape[-1]
    scale, bias = 1 + jax.random.normal(ks, (c,)), jax.random.normal(kb, (c,))
    ct = jax.random.normal(kc, shape)
    _close(kernels.group_norm(x, scale, bias, 32, 1e-5), _textbook_group_norm(x, scale, bias, 32, 1e-5), rtol)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a, 32, 1e-5) * ct), argnums=(0, 1, 2))(x, scale, bias)
             for f in (kernels.group_norm, _textbook_group_norm)]
    _close(grads[0], grads[1], 5 * rtol)


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


def test_chunked_dense_is_dense_split():
    import flax.linen as nn

    from diffusion_jax.models.layers import ChunkedDense

    x = jax.random.normal(jax.random.key(3), (4, 16))
    ours, dense = ChunkedDense(12, chunks=3), nn.Dense(12)
    params = ours.init(jax.random.key(4), x)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, dense.init(jax.random.key(4), x)))
    params = jax.tree.map(lambda p: p + 1.0, params)  # a non-zero bias
    want = dense.apply(params, x)
    got = ours.apply(params, x)
    assert len(got) == 3
    _close(jnp.concatenate(got, axis=-1), want, 1e-6)


def test_cpu_flags_appended_once(monkeypatch):
    import diffusion_jax

    names = [f.split("=")[0] for f in diffusion_jax.CPU_XLA_FLAGS]
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {names[1]}=256")
    monkeypatch.setattr(diffusion_jax._metadata, "version", lambda _: "0.10.2")
    diffusion_jax._set_cpu_flags()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_force_host_platform_device_count=2", f"{names[1]}=256", diffusion_jax.CPU_XLA_FLAGS[0]]
    diffusion_jax._set_cpu_flags()  # idempotent, and a user's own choice is kept
    assert os.environ["XLA_FLAGS"].split() == flags
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(diffusion_jax._metadata, "version", lambda _: "0.12.0")
    diffusion_jax._set_cpu_flags()  # unknown jaxlib: the experimental option could abort XLA
    assert os.environ["XLA_FLAGS"] == ""


@pytest.mark.parametrize("shape", [(2, 4, 4, 8), (1, 3, 5, 16)])
def test_upsample_conv_is_conv_of_upsampled(shape):
    import flax.linen as nn

    from diffusion_jax.models.layers import UpsampleConv, conv, upsample_nearest

    class Textbook(nn.Module):
        @nn.compact
        def __call__(self, x):
            return conv(12, "float32", name="conv")(upsample_nearest(x))

    class Ours(nn.Module):
        @nn.compact
        def __call__(self, x):
            return UpsampleConv(12, name="conv")(x)

    x = jax.random.normal(jax.random.key(5), shape)
    params = Ours().init(jax.random.key(6), x)
    # Same parameter tree and init as nn.Conv, so checkpoints and converted weights carry over.
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, Textbook().init(jax.random.key(6), x)))
    params = jax.tree.map(lambda p: p + 0.1, params)
    _close(Ours().apply(params, x), Textbook().apply(params, x), 2e-6)
    ct = jax.random.normal(jax.random.key(7), (shape[0], 2 * shape[1], 2 * shape[2], 12))
    grads = [jax.grad(lambda p, x, m=m: jnp.sum(m.apply(p, x) * ct), argnums=(0, 1))(params, x) for m in (Ours(), Textbook())]
    _close(grads[0], grads[1], 2e-6)
