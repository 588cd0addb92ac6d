"""models/kernels.py: both forms ("cpu", "xla") against float64 NumPy formulas and each other (values, gradients)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import kernels, layers

FORMS = ("cpu", "xla")


def _close(a, b, rtol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        assert u.shape == v.shape, (u.shape, v.shape)
        scale = np.max(np.abs(v)) + 1e-30
        assert np.max(np.abs(u - v)) / scale < rtol, np.max(np.abs(u - v)) / scale


def _np_group_norm(x, scale, bias, groups, eps, ct):
    """float64 GroupNorm and its VJP for cotangent ct: (y, (dx, dscale, dbias))."""
    x, scale, bias, ct = (np.asarray(a, np.float64) for a in (x, scale, bias, ct))
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    mean_g = lambda a: np.broadcast_to(np.mean(a, axis=(1, 3), keepdims=True), a.shape)
    inv_std = 1 / np.sqrt(mean_g(np.square(g - mean_g(g))) + eps)
    xhat = (g - mean_g(g)) * inv_std
    dxhat = (ct * scale).reshape(g.shape)
    dx = inv_std * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat))
    xhat = xhat.reshape(x.shape)
    axes = tuple(range(x.ndim - 1))
    return xhat * scale + bias, (dx.reshape(x.shape), np.sum(ct * xhat, axes), np.sum(ct, axes))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(3, 8, 8, 64), (2, 5, 7, 32), (4, 96), (2, 4, 4, 4, 64)])
# The second case: float32 holds x only to ~1e-4 of its spread, but a one-pass
# E[x^2] - E[x]^2 variance would be off by percents.
@pytest.mark.parametrize("std,offset,rtol", [(3.0, 2.0, 2e-6), (0.05, 40.0, 5e-4)])
def test_group_norm_matches_numpy(form, shape, std, offset, rtol):
    kx, ks, kb, kc = jax.random.split(jax.random.key(0), 4)
    x = std * jax.random.normal(kx, shape) + offset
    c = shape[-1]
    scale, bias = 1 + jax.random.normal(ks, (c,)), jax.random.normal(kb, (c,))
    ct = jax.random.normal(kc, shape)
    fn = lambda *a: kernels.group_norm(*a, 32, 1e-5, kernels=form)
    want, want_grads = _np_group_norm(x, scale, bias, 32, 1e-5, ct)
    _close(fn(x, scale, bias), want, rtol)
    _close(jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2))(x, scale, bias), want_grads, 5 * rtol)


def _np_attention(q, k, v, ct):
    """float64 softmax(q k^T / sqrt(ch)) v per head ([B, T, heads, ch]) and its VJP: (out, (dq, dk, dv))."""
    q, k, v, ct = (np.asarray(a, np.float64) for a in (q, k, v, ct))
    s = 1 / np.sqrt(q.shape[-1])
    logits = np.einsum("bthc,bshc->bhts", q, k) * s
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    dw = np.einsum("bthc,bshc->bhts", ct, v)
    dlogits = w * (dw - np.sum(dw * w, -1, keepdims=True)) * s
    grads = (np.einsum("bhts,bshc->bthc", dlogits, k), np.einsum("bhts,bthc->bshc", dlogits, q),
             np.einsum("bhts,bthc->bshc", w, ct))
    return np.einsum("bhts,bshc->bthc", w, v), grads


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("t,s", [(10, 10), (6, 14)])  # self-attention; queries over prepended keys
def test_attention_matches_numpy(form, dtype, rtol, t, s):
    kq, kk, kv, kc = jax.random.split(jax.random.key(2), 4)
    q = (2 * jax.random.normal(kq, (2, t, 3, 8))).astype(dtype)  # [B, T, heads, ch]
    k, v = ((2 * jax.random.normal(key, (2, s, 3, 8))).astype(dtype) for key in (kk, kv))
    ct = jax.random.normal(kc, q.shape).astype(dtype)
    fn = lambda *a: kernels.attention(*a, kernels=form)
    out = fn(q, k, v)
    assert out.dtype == dtype
    want, want_grads = _np_attention(q, k, v, ct)  # from the rounded inputs
    _close(out, want, rtol)
    grads = jax.grad(lambda *a: jnp.sum(fn(*a) * ct).astype(jnp.float32), argnums=(0, 1, 2))(q, k, v)
    _close(grads, want_grads, 5 * rtol)


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
    from diffusion_jax.runtime import xla_flags

    names = [f.split("=")[0] for f in xla_flags.CPU_XLA_FLAGS]
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {names[1]}=256")
    monkeypatch.setattr(xla_flags.metadata, "version", lambda _: "0.10.2")
    xla_flags.set_cpu_flags()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_force_host_platform_device_count=2", f"{names[1]}=256", xla_flags.CPU_XLA_FLAGS[0]]
    xla_flags.set_cpu_flags()  # idempotent, and a user's own choice is kept
    assert os.environ["XLA_FLAGS"].split() == flags
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_flags.metadata, "version", lambda _: "0.12.0")
    xla_flags.set_cpu_flags()  # unknown jaxlib: the experimental option could abort XLA
    assert os.environ["XLA_FLAGS"] == ""


def test_library_import_changes_nothing_global():
    import subprocess
    import sys

    code = "import os; before = dict(os.environ); import diffusion_jax; assert dict(os.environ) == before"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(2, 4, 4, 8), (1, 3, 5, 16)])
def test_upsample_conv_is_conv_of_upsampled(form, shape):
    import flax.linen as nn

    from diffusion_jax.models.layers import UpsampleConv, conv, upsample_nearest

    class Textbook(nn.Module):
        @nn.compact
        def __call__(self, x):
            return conv(12, "float32", name="conv")(upsample_nearest(x))

    class Ours(nn.Module):
        @nn.compact
        def __call__(self, x):
            return UpsampleConv(12, kernels=form, name="conv")(x)

    x = jax.random.normal(jax.random.key(5), shape)
    params = Ours().init(jax.random.key(6), x)
    # Same parameter tree and init as nn.Conv, so checkpoints and converted weights carry over.
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, Textbook().init(jax.random.key(6), x)))
    params = jax.tree.map(lambda p: p + 0.1, params)
    _close(Ours().apply(params, x), Textbook().apply(params, x), 2e-6)
    ct = jax.random.normal(jax.random.key(7), (shape[0], 2 * shape[1], 2 * shape[2], 12))
    grads = [jax.grad(lambda p, x, m=m: jnp.sum(m.apply(p, x) * ct), argnums=(0, 1))(params, x) for m in (Ours(), Textbook())]
    _close(grads[0], grads[1], 2e-6)


def _np_qkv_attention(qkv, ekv, heads, legacy):
    """OpenAI's QKVAttention(Legacy) (+ GLIDE's encoder_kv) in float64, by explicit channel slices."""
    qkv = np.asarray(qkv, np.float64)
    c = qkv.shape[-1] // 3
    ch = c // heads

    def part(a, n, h, j):  # head h's j-th part of an n-part projection
        start = h * n * ch + j * ch if legacy else j * c + h * ch
        return a[..., start:start + ch]

    outs = []
    for h in range(heads):
        q, k, v = (part(qkv, 3, h, j) for j in range(3))
        if ekv is not None:
            e = np.asarray(ekv, np.float64)
            k, v = np.concatenate([part(e, 2, h, 0), k], 1), np.concatenate([part(e, 2, h, 1), v], 1)
        logits = np.einsum("btc,bsc->bts", q, k) / np.sqrt(ch)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        outs.append(np.einsum("bts,bsc->btc", w / w.sum(-1, keepdims=True), v))
    return np.concatenate(outs, -1)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("with_text", [False, True])
def test_qkv_attention_matches_openai_layout(form, legacy, with_text):
    kq, ke = jax.random.split(jax.random.key(8))
    qkv = jax.random.normal(kq, (2, 12, 3 * 32))  # [B, T, 3C], 4 heads of 8 channels
    ekv = jax.random.normal(ke, (2, 5, 2 * 32)) if with_text else None  # [B, L, 2C]
    got = layers.qkv_attention(qkv, 4, legacy, ekv, kernels=form)
    _close(got, _np_qkv_attention(qkv, ekv, 4, legacy), 2e-6)


def _agreement_case(case, key):
    """(fn(*args, form), args) for one kernel on random inputs."""
    ks = jax.random.split(key, 2)
    if case == "group_norm":
        x = 2 * jax.random.normal(ks[0], (2, 6, 6, 64)) + 1
        args = (x, 1 + jax.random.normal(ks[1], (64,)), jax.random.normal(ks[1], (64,)) - 1)
        return lambda x, s, b, form: kernels.group_norm(x, s, b, 32, 1e-5, kernels=form), args
    if case == "upsample":
        args = (jax.random.normal(ks[0], (2, 5, 4, 16)), 0.2 * jax.random.normal(ks[1], (3, 3, 16, 8)))
        return lambda x, w, form: kernels.upsample_conv3x3(x, w, kernels=form), args
    if case == "conv1x1":
        args = (jax.random.normal(ks[0], (2, 5, 4, 16)), 0.2 * jax.random.normal(ks[1], (1, 1, 16, 8)))
        return lambda x, w, form: kernels.conv1x1(x, w, kernels=form), args
    legacy = case.endswith("legacy")
    qkv = 2 * jax.random.normal(ks[0], (2, 16, 3 * 32))
    if "encoder_kv" in case:
        args = (qkv, 2 * jax.random.normal(ks[1], (2, 6, 2 * 32)))
        return lambda qkv, ekv, form: layers.qkv_attention(qkv, 4, legacy, ekv, kernels=form), args
    return lambda qkv, form: layers.qkv_attention(qkv, 4, legacy, kernels=form), (qkv,)


@pytest.mark.parametrize("case", ["group_norm", "upsample", "conv1x1", "attention_legacy", "attention_new",
                                  "attention_encoder_kv_legacy", "attention_encoder_kv_new"])
def test_cpu_and_xla_agree(case):
    """The two forms give the same values and gradients (the same parameters serve both)."""
    fn, args = _agreement_case(case, jax.random.key(9))
    argnums = tuple(range(len(args)))
    outs = {f: jax.jit(lambda *a, f=f: fn(*a, f))(*args) for f in FORMS}
    _close(outs["cpu"], outs["xla"], 2e-6)
    ct = jax.random.normal(jax.random.key(10), outs["cpu"].shape)
    grads = {f: jax.jit(jax.grad(lambda *a, f=f: jnp.sum(fn(*a, f) * ct), argnums=argnums))(*args) for f in FORMS}
    _close(grads["cpu"], grads["xla"], 1e-5)


def test_resolve_kernels(monkeypatch):
    assert kernels.resolve_kernels("cpu") == "cpu" and kernels.resolve_kernels("xla") == "xla"
    assert kernels.resolve_kernels("auto") == ("cpu" if jax.default_backend() == "cpu" else "xla")
    for backend, want in (("cpu", "cpu"), ("gpu", "xla"), ("tpu", "xla")):
        monkeypatch.setattr(kernels.jax, "default_backend", lambda b=backend: b)
        assert kernels.resolve_kernels("auto") == want
    with pytest.raises(ValueError, match=r"\('auto', 'cpu', 'xla'\).*'cuda'"):
        kernels.resolve_kernels("cuda")


def _networks():
    """One small network of each class with example inputs: {kind: (module, args, kwargs)}."""
    from diffusion_jax import models

    x, low = jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), jax.random.normal(jax.random.key(2), (2, 4, 4, 3))
    t, y = jnp.array([3, 500], jnp.int32), jnp.array([0, 2], jnp.int32)
    small = {"image_size": 8, "model_channels": 32, "num_res_blocks": 1, "channel_mult": (1, 2),
             "attention_resolutions": (1, 2), "num_head_channels": 16}
    tokens = jnp.array([[1, 2, 3, 0], [4, 5, 0, 0]], jnp.int32)
    glide = {"text_ctx": 4, "xf_width": 32, "xf_layers": 1, "xf_heads": 2, "n_vocab": 8}
    return {
        "unet": (models.UNet(out_channels=6, num_classes=3, use_scale_shift_norm=True, **small), (x, t, y), {}),
        "super_res": (models.SuperResUNet(in_channels=6, resblock_updown=True, **small), (x, t, low), {}),
        "classifier": (models.EncoderUNet(out_channels=5, pool="attention", **small), (x, t), {}),
        "glide_upsample": (models.SuperResText2ImUNet(**small, **glide), (x, t),
                           {"tokens": tokens, "mask": tokens > 0, "low_res": low}),
    }


@pytest.mark.parametrize("kind", ["unet", "super_res", "classifier", "glide_upsample"])
def test_networks_same_params_and_outputs(kind):
    """``kernels`` changes how, never what: the same parameter tree and init, the same outputs."""
    module, args, kw = _networks()[kind]
    inits = [jax.jit(module.clone(kernels=f).init)(jax.random.key(0), *args, **kw)["params"] for f in FORMS]
    jax.tree.map(np.testing.assert_array_equal, *inits)  # names, shapes, values
    leaves, tree = jax.tree.flatten(inits[0])
    rs = np.random.RandomState(3)  # every layer live (no zero-initialised outputs)
    params = jax.tree.unflatten(tree, [p + 0.1 * rs.randn(*p.shape).astype(np.float32) for p in leaves])
    outs = [jax.jit(module.clone(kernels=f).apply)({"params": params}, *args, **kw) for f in FORMS]
    _close(outs[0], outs[1], 2e-5)


@pytest.mark.parametrize("kind", ["unet", "super_res", "classifier", "glide_upsample"])
def test_networks_refuse_unknown_kernels(kind):
    module, args, kw = _networks()[kind]
    with pytest.raises(ValueError, match=r"\('auto', 'cpu', 'xla'\).*'gpu'"):
        jax.eval_shape(module.clone(kernels="gpu").init, jax.random.key(0), *args, **kw)
