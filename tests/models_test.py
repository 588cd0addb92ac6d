"""Tests for diffusion_jax.models: parity with OpenAI's PyTorch networks and invariants."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax import convert, models
from diffusion_jax.convert import kinds
from diffusion_jax.models import layers, unet

jax.config.update("jax_disable_most_optimizations", True)

DATA = os.path.join(os.path.dirname(__file__), "data", "parity")
NETS = ("idiff_pub", "gdiff_unet_pub", "gdiff_cls_pub")
KERNELS = ("cpu", "xla")  # both forms of GroupNorm / attention / upsample meet the same tolerances
_OPENAI_ONLY = ("conv_resample", "dims", "use_fp16")

try:
    import torch
except ImportError:  # torch is optional (diffusion_jax[torch]).
    torch = None


@functools.cache
def fixture_model(name: str):
    """(kind, model kwargs, module) built from the fixture's exact constructor kwargs."""
    with open(os.path.join(DATA, f"unet_{name}.json")) as f:
        meta = json.load(f)
    kw = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in meta["constructor_kwargs"].items()
    }
    for k in _OPENAI_ONLY:
        kw.pop(k, None)
    kw["image_size"] = meta["input_image_size"]
    kind = "classifier" if meta["class"].endswith("EncoderUNetModel") else "unet"
    return kind, kw, kinds.build(kind, **kw)


@functools.cache
def fixture_params(name: str, source: str):
    kind, kw, module = fixture_model(name)
    path = os.path.join(
        DATA, f"unet_{name}_weights.npz" if source == "npz" else f"unet_{name}.pt"
    )
    return convert.params_from_state_dict(
        module, kind, kw, convert.load_state_dict(path)
    )


@functools.cache
def jitted_apply(name: str, kernels: str = "auto"):
    return jax.jit(fixture_model(name)[2].clone(kernels=kernels).apply)


def fixture_io(name: str):
    io = np.load(os.path.join(DATA, f"unet_{name}_io.npz"))
    return {
        k: io[k]
        for k in io.files
        if not k.startswith(("loop", "features", "train_step"))
    }


def nchw(a):
    a = np.asarray(a)
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


class TimestepEmbeddingTest(parameterized.TestCase):
    @parameterized.parameters(
        ("dim32_maxp10000", 32, 10000),
        ("dim33_maxp10000", 33, 10000),
        ("dim128_maxp10000", 128, 10000),
        ("dim16_maxp100", 16, 100),
    )
    def test_matches_openai(self, key, dim, max_period):
        m = np.load(os.path.join(DATA, "math.npz"))
        fn = jax.jit(layers.timestep_embedding, static_argnums=(1, 2))
        got = fn(m["timestep_embedding/timesteps"], dim, max_period)
        self.assertEqual(got.dtype, jnp.float32)
        np.testing.assert_allclose(
            got, m[f"timestep_embedding/{key}"], atol=1e-4, rtol=0
        )

    def test_int_timesteps(self):
        m = np.load(os.path.join(DATA, "math.npz"))
        t = m["timestep_embedding/timesteps_int"].astype(np.int32)
        got = layers.timestep_embedding(t, 32)
        np.testing.assert_allclose(
            got, m["timestep_embedding/int_dim32_maxp10000"], atol=1e-4, rtol=0
        )


class ParityTest(parameterized.TestCase):
    """Forward outputs against OpenAI's PyTorch networks (random weights, every layer live)."""

    @parameterized.product(name=NETS, source=("npz", "pt"), kernels=KERNELS)
    def test_forward(self, name, source, kernels):
        # One call per network: the int timesteps (0, 417, 999; exact in float32)
        # and the float ones (0.25, 250.5, 999.75) stacked into a batch of 6, so
        # each network compiles once (the .pt case reuses the executable).
        if source == "pt" and torch is None:
            self.skipTest("torch not installed")
        kind, _, _ = fixture_model(name)
        params = fixture_params(name, source)
        io = fixture_io(name)
        x = np.concatenate([io["inputs/x"]] * 2).transpose(0, 2, 3, 1)
        t = np.concatenate(
            [
                io["inputs/timesteps_int"].astype(np.float32),
                io["inputs/timesteps_float"],
            ]
        )
        y = np.concatenate([io["inputs/y"]] * 2).astype(np.int32)
        args = (x, t) if kind == "classifier" else (x, t, y)
        out = jitted_apply(name, kernels)({"params": params}, *args)
        self.assertEqual(out.dtype, jnp.float32)
        want = np.concatenate(
            [io["outputs/out_timesteps_int"], io["outputs/out_timesteps_float"]]
        )
        np.testing.assert_allclose(nchw(out), want, atol=1e-4, rtol=1e-4)

    def test_pt_and_npz_params_identical(self):
        if torch is None:
            self.skipTest("torch not installed")
        for name in NETS:
            a, b = fixture_params(name, "npz"), fixture_params(name, "pt")
            jax.tree.map(np.testing.assert_array_equal, a, b)

    @parameterized.parameters(*KERNELS)
    def test_classifier_input_gradient(self, kernels):
        name = "gdiff_cls_pub"
        module = fixture_model(name)[2].clone(kernels=kernels)
        params = fixture_params(name, "npz")
        io = fixture_io(name)
        x = io["inputs/x"].transpose(0, 2, 3, 1)
        t, y = (
            io["inputs/timesteps_int"].astype(np.int32),
            io["inputs/y"].astype(np.int32),
        )

        def log_p(xx):
            logits = module.apply({"params": params}, xx, t)
            return jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])

        g = jax.jit(jax.grad(log_p))(x)
        want = io["outputs/grad_log_softmax_y_wrt_x"]
        np.testing.assert_allclose(
            nchw(g), want, atol=1e-4 * np.abs(want).max(), rtol=1e-4
        )


def tiny_unet(**kw):
    base = {
        "image_size": 8,
        "model_channels": 32,
        "out_channels": 6,
        "num_res_blocks": 1,
        "attention_resolutions": (2,),
        "channel_mult": (1, 2),
        "num_heads": 2,
        "use_scale_shift_norm": True,
        "num_classes": 3,
    }
    return models.UNet(**dict(base, **kw))


def shapes(module, *args):
    """Param shapes without running anything (errors raised at trace time surface here)."""
    return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


X8 = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
T8 = jnp.array([3, 500], jnp.int32)
Y8 = jnp.array([0, 2], jnp.int32)


@functools.cache
def tiny_params(**kw):
    """Random params for tiny_unet(**kw) with every layer live (no zero-init outputs)."""
    leaves, tree = jax.tree.flatten(shapes(tiny_unet(**kw), X8, T8, Y8))
    rs = np.random.RandomState(7)
    return jax.tree.unflatten(
        tree, [jnp.asarray(0.2 * rs.randn(*p.shape), jnp.float32) for p in leaves]
    )


class UNetBehaviourTest(parameterized.TestCase):
    def test_bf16_close_to_float32(self):
        # Measured on the three parity networks (32 px): relative L2 error
        # 0.6-1.7%, max abs error 2.2% of max |out|. Bound: 3% relative L2.
        name = "gdiff_unet_pub"
        kind, kw, _module = fixture_model(name)
        params = fixture_params(name, "npz")
        io = fixture_io(name)
        args = (
            io["inputs/x"].transpose(0, 2, 3, 1),
            io["inputs/timesteps_int"].astype(np.int32),
            io["inputs/y"].astype(np.int32),
        )
        ref = io["outputs/out_timesteps_int"].transpose(0, 2, 3, 1)
        out = jax.jit(kinds.build(kind, **kw, dtype="bfloat16").apply)(
            {"params": params}, *args
        )
        self.assertEqual(out.dtype, jnp.float32)
        rel = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
        self.assertLess(rel, 3e-2)

    def test_bf16_params_stay_float32(self):
        params = shapes(tiny_unet(dtype="bfloat16"), X8, T8, Y8)
        self.assertTrue(all(p.dtype == jnp.float32 for p in jax.tree.leaves(params)))

    def test_remat_identical(self):
        # use_checkpoint gives the same outputs and gradients (dropout off: its
        # threefry graph doubles compile time on CPU; see test_dropout_only_in_train).
        small = {
            "channel_mult": (1,),
            "attention_resolutions": (1,),
        }  # keeps compiles short
        m, mr = tiny_unet(**small), tiny_unet(use_checkpoint=True, **small)
        params = tiny_params(**small)
        self.assertEqual(
            jax.tree.structure(params), jax.tree.structure(shapes(mr, X8, T8, Y8))
        )

        def run(mod):
            def loss(p):
                out = mod.apply({"params": p}, X8, T8, Y8, train=True)
                return jnp.sum(out**2), out

            return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

        (_, o1), g1 = run(m)
        (_, o2), g2 = run(mr)
        # remat only moves XLA fusion boundaries: equal up to float32 reordering.
        np.testing.assert_allclose(o1, o2, atol=1e-5, rtol=1e-5)
        scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(g1))
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0)

    @parameterized.parameters(False, True)
    def test_dropout_only_in_train(self, use_checkpoint):
        class Wrap(nn.Module):  # remat'd blocks are always children (as in the U-Net)
            @nn.compact
            def __call__(self, x, emb, train):
                cls = (
                    nn.remat(layers.ResBlock, static_argnums=(3,))
                    if use_checkpoint
                    else layers.ResBlock
                )
                return cls(out_channels=32, dropout=0.5)(x, emb, train)

        block = Wrap()
        x, emb = jnp.ones((1, 4, 4, 32)), jnp.ones((1, 8))
        shp = jax.eval_shape(lambda k: block.init(k, x, emb, False), jax.random.key(0))[
            "params"
        ]
        params = jax.tree.map(lambda s: jnp.full(s.shape, 0.1), shp)
        rngs = {"dropout": jax.random.key(0)}
        ev = block.apply({"params": params}, x, emb, False, rngs=rngs)
        tr = block.apply({"params": params}, x, emb, True, rngs=rngs)
        self.assertGreater(float(jnp.abs(tr - ev).max()), 1e-3)
        np.testing.assert_array_equal(
            tr, block.apply({"params": params}, x, emb, True, rngs=rngs)
        )

    def test_null_label_row(self):
        params = shapes(tiny_unet(null_label=True), X8, T8, Y8)
        self.assertEqual(params["label_emb"]["embedding"].shape, (4, 128))

    def test_zero_init_output_layers(self):
        m = tiny_unet(num_res_blocks=0, channel_mult=(1,), attention_resolutions=(1,))
        params = jax.jit(m.init)(jax.random.key(0), X8, T8, Y8)["params"]
        zero = [
            params["out_2"],
            params["middle_block_0"]["out_layers_3"],
            params["middle_block_1"]["proj_out"],
        ]
        for leaf in jax.tree.leaves(zero):
            np.testing.assert_array_equal(leaf, 0.0)

    def test_float_channel_mult_and_updown(self):
        m = models.UNet(
            image_size=8,
            model_channels=64,
            channel_mult=(0.5, 1),
            num_res_blocks=1,
            resblock_updown=True,
            num_head_channels=32,
            attention_resolutions=(1, 2),
        )
        params = shapes(m, X8, T8)
        self.assertEqual(params["input_blocks_0_0"]["kernel"].shape, (3, 3, 3, 32))
        self.assertIn("in_layers_2", params["input_blocks_2_0"])  # the down ResBlock
        self.assertIn("in_layers_2", params["output_blocks_1_2"])  # the up ResBlock
        self.assertEqual(
            jax.eval_shape(m.apply, {"params": params}, X8, T8).shape, (2, 8, 8, 3)
        )

    def test_errors(self):
        m, params = tiny_unet(), tiny_params()

        def apply(*args):
            return jax.eval_shape(m.apply, {"params": params}, *args)

        with self.assertRaisesRegex(ValueError, "NHWC"):
            apply(jnp.zeros((2, 16, 16, 3)), T8, Y8)
        with self.assertRaisesRegex(ValueError, "NHWC"):
            apply(jnp.zeros((2, 8, 8, 4)), T8, Y8)
        with self.assertRaisesRegex(ValueError, "class-conditional"):
            apply(X8, T8)
        with self.assertRaisesRegex(ValueError, "timesteps"):
            apply(X8, T8[:1], Y8)
        with self.assertRaisesRegex(ValueError, "unconditional"):
            shapes(tiny_unet(num_classes=None), X8, T8, Y8)
        with self.assertRaisesRegex(ValueError, "num_heads"):
            shapes(tiny_unet(num_heads=3), X8, T8, Y8)
        with self.assertRaisesRegex(ValueError, "accepted"):
            kinds.build("glide_nope", image_size=8)


def torch_bilinear_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """NumPy version of torch F.interpolate(mode='bilinear', align_corners=False), NHWC, float64."""

    def coords(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)  # torch clamps negative source coordinates to 0
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = coords(x.shape[1], out_h)
    x0, x1, wx = coords(x.shape[2], out_w)
    x = x.astype(np.float64)
    top = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
    return (
        top[:, :, x0] * (1 - wx)[None, None, :, None]
        + top[:, :, x1] * wx[None, None, :, None]
    )


class SuperResTest(parameterized.TestCase):
    @parameterized.parameters((4, 16), (8, 16), (5, 12), (3, 8))
    def test_bilinear_matches_torch_formula(self, n_in, n_out):
        x = np.random.RandomState(0).randn(2, n_in, n_in, 3).astype(np.float32)
        got = unet.bilinear_resize(jnp.asarray(x), n_out, n_out)
        np.testing.assert_allclose(
            got, torch_bilinear_reference(x, n_out, n_out), atol=1e-6
        )
        if torch is not None:
            ref = torch.nn.functional.interpolate(
                torch.from_numpy(x.transpose(0, 3, 1, 2)),
                (n_out, n_out),
                mode="bilinear",
                align_corners=False,
            )
            np.testing.assert_allclose(
                got, ref.numpy().transpose(0, 2, 3, 1), atol=1e-6
            )

    def test_forward_concatenates_after_x(self):
        m = models.SuperResUNet(
            image_size=8,
            in_channels=6,
            model_channels=32,
            out_channels=3,
            channel_mult=(1, 2),
            num_res_blocks=1,
        )
        x = jnp.ones((2, 8, 8, 3))
        low = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
        t = jnp.zeros((2,), jnp.int32)
        params = shapes(m, x, t, low)
        # The stem conv sees [x, up(low_res)]: its kernel's input axis splits 3 + 3.
        stem = params["input_blocks_0_0"]["kernel"]
        self.assertEqual(stem.shape, (3, 3, 6, 32))
        self.assertEqual(
            jax.eval_shape(m.apply, {"params": params}, x, t, low).shape, (2, 8, 8, 3)
        )
        with self.assertRaisesRegex(ValueError, "NHWC"):
            jax.eval_shape(m.apply, {"params": params}, x, t, jnp.zeros((2, 4, 4, 1)))


class ClassifierPoolTest(parameterized.TestCase):
    @parameterized.parameters("adaptive", "attention", "spatial", "spatial_v2")
    def test_pools(self, pool):
        m = models.EncoderUNet(
            image_size=8,
            model_channels=32,
            out_channels=5,
            num_res_blocks=1,
            channel_mult=(1, 2),
            attention_resolutions=(2,),
            num_head_channels=32,
            use_scale_shift_norm=True,
            resblock_updown=True,
            pool=pool,
        )
        x, t = jnp.ones((2, 8, 8, 3)), jnp.array([1, 2])
        params = shapes(m, x, t)
        out = jax.eval_shape(m.apply, {"params": params}, x, t)
        self.assertEqual(out.shape, (2, 5))
        self.assertEqual(out.dtype, jnp.float32)


if __name__ == "__main__":
    absltest.main()
