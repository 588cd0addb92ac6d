"""Super-resolution: area downsampling, the SR stage against the plain ADM loop, base-sample checks,
the cascade, and a few training steps of configs/digits_sr.py."""

import dataclasses
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import digits_sr
from diffusion_jax import convert, sampling
from diffusion_jax.convert import kinds
from diffusion_jax.data import conditioning
from diffusion_jax.generation import images, program, superres
from diffusion_jax.training import loop as train_lib

jax.config.update("jax_disable_most_optimizations", True)  # tiny shapes: compile time dominates

DIFFUSION = {"noise_schedule": "cosine", "diffusion_steps": 20, "timestep_respacing": "", "rescale_timesteps": False,
             "mean_type": "epsilon", "var_type": "learned_range", "loss_type": "mse"}
SR_MODEL = {"image_size": 8, "in_channels": 2, "model_channels": 32, "out_channels": 2, "num_res_blocks": 1,
            "attention_resolutions": (), "channel_mult": (1, 2), "num_classes": 10}
BASE_MODEL = dict(SR_MODEL, image_size=4, in_channels=1, num_classes=10, null_label=True)


def _area_reference(x, h, w):
    """float64 adaptive average pooling, one output pixel at a time (PyTorch's windows)."""
    b, hh, ww, c = x.shape
    out = np.zeros((b, h, w, c))
    for i in range(h):
        for j in range(w):
            r0, r1 = (i * hh) // h, -(-((i + 1) * hh) // h)
            c0, c1 = (j * ww) // w, -(-((j + 1) * ww) // w)
            out[:, i, j] = x[:, r0:r1, c0:c1].astype(np.float64).mean(axis=(1, 2))
    return out


class AreaDownsampleTest(parameterized.TestCase):

    @parameterized.parameters((8, 4), (8, 3), (6, 6), (7, 2))
    def test_matches_float64_windows(self, size, small):
        x = np.random.default_rng(size * small).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
        want = _area_reference(x, small, small)
        np.testing.assert_allclose(conditioning.area_downsample(x, small), want, rtol=1e-5, atol=1e-6)
        got = jax.jit(lambda a: conditioning.area_downsample(a, small))(jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)

    def test_integer_factor_is_block_mean(self):
        x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
        got = conditioning.area_downsample(x, 4)
        np.testing.assert_allclose(got, x.reshape(2, 4, 2, 4, 2, 1).mean(axis=(2, 4)), rtol=1e-6)

    def test_rejects_upsampling(self):
        with self.assertRaisesRegex(ValueError, "out_size <= in_size"):
            conditioning.area_downsample(np.zeros((1, 4, 4, 1), np.float32), 8)


class StandIn:
    """A stand-in SR network: elementwise in x, low_res (nearest-upsampled), t and y, so its numbers do not
    depend on the batch it is run in. Output: eps then learned-range values."""

    def apply(self, variables, x, t, low_res, y=None):
        a = variables["params"]["a"]
        up = jnp.repeat(jnp.repeat(low_res, x.shape[1] // low_res.shape[1], 1), x.shape[2] // low_res.shape[2], 2)
        h = a * x + 0.5 * up + (t[:, None, None, None] / 20.0) + (0.0 if y is None else 0.03 * y[:, None, None, None])
        return jnp.concatenate([jnp.tanh(h), jnp.sin(h)], axis=-1)


def _opts(**kw):
    return program.SampleOptions(**dict(dict(num_samples=5, batch_size=2, progress=False), **kw))


def _sr_cfg(model=SR_MODEL, small=4):
    return {"kind": "super_res", "model": model, "diffusion": dict(DIFFUSION), "source": {
        "flags": f"--large_size {model['image_size']} --small_size {small}"}}


class SuperResStageTest(parameterized.TestCase):

    @parameterized.parameters("ancestral", "ddim")
    def test_engine_equals_adm_loop_with_low_res(self, sampler):
        plan = superres.make_sr_plan(_sr_cfg(), _opts(sampler=sampler), "--workdir")
        rng = np.random.default_rng(0)
        low = rng.integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
        labels = rng.integers(0, 10, 5).astype(np.int32)
        params = {"a": jnp.float32(0.7)}
        got = superres.upsample(StandIn(), params, plan, low, labels, _opts(sampler=sampler, seed=3), log=None)
        lr = jnp.asarray(low, jnp.float32) / 127.5 - 1.0
        loop = sampling.ddim_sample_loop if sampler == "ddim" else sampling.p_sample_loop
        want = loop(jax.random.fold_in(jax.random.key(3), superres.SR_STAGE),
                    lambda x, t, y: StandIn().apply({"params": params}, x, t, lr, y), plan.schedule, (5, 8, 8, 1),
                    mean_type="epsilon", var_type="learned_range", y=jnp.asarray(labels))
        np.testing.assert_array_equal(got, np.asarray(images.to_uint8(want)))

    def test_low_res_size_of_converted_and_trained(self):
        self.assertEqual(superres.low_res_size(_sr_cfg(small=4)), 4)
        self.assertEqual(superres.low_res_size({"kind": "super_res", "super_res": {"small_size": 2}}), 2)
        self.assertEqual(superres.low_res_size({"kind": "super_res", "source": {"preset": "x"}}), 64)


class BaseSamplesTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp()
        self.plan = superres.make_sr_plan(_sr_cfg(), _opts(), "--workdir")

    def _file(self, images_, labels=None):
        path = os.path.join(self.dir, "base.npz")
        np.savez(path, **({"arr_0": images_} if labels is None else {"arr_0": images_, "arr_1": labels}))
        return path

    def test_reads_images_and_labels(self):
        x = np.zeros((3, 4, 4, 1), np.uint8)
        got, labels = superres.load_base_samples(self._file(x, np.arange(3)), self.plan)
        self.assertEqual(got.shape, (3, 4, 4, 1))
        np.testing.assert_array_equal(labels, [0, 1, 2])

    @parameterized.named_parameters(
        ("size", np.zeros((2, 8, 8, 1), np.uint8), r"\(2, 8, 8, 1\).*\[N, 4, 4, 1\].*sample the base model at 4x4"),
        ("channels", np.zeros((2, 4, 4, 3), np.uint8), r"\(2, 4, 4, 3\).*\[N, 4, 4, 1\]"),
        ("dtype", np.zeros((2, 4, 4, 1), np.float32), "arr_0 is float32, expected uint8"),
    )
    def test_bad_images(self, x, message):
        path = self._file(x, np.zeros(len(x), np.int32))
        with self.assertRaisesRegex(ValueError, "--base_samples=" + path + ".*" + message):
            superres.load_base_samples(path, self.plan)

    def test_needs_labels_for_class_conditional(self):
        path = self._file(np.zeros((2, 4, 4, 1), np.uint8))
        with self.assertRaisesRegex(ValueError, "no arr_1 labels but the upsampler is class-conditional"):
            superres.load_base_samples(path, self.plan)

    def test_missing_file(self):
        with self.assertRaisesRegex(FileNotFoundError, "nope.npz"):
            superres.load_base_samples(os.path.join(self.dir, "nope.npz"), self.plan)

    def test_rejects_guidance_and_other_kinds(self):
        with self.assertRaisesRegex(ValueError, "do not apply to the super-resolution"):
            superres.make_sr_plan(_sr_cfg(), _opts(cfg_scale=3.0), "--workdir")
        with self.assertRaisesRegex(ValueError, "--upsampler_workdir must hold a 'super_res' model"):
            superres.make_sr_plan(dict(_sr_cfg(), kind="unet"), _opts(), "--upsampler_workdir")


def _save(directory, kind, model, source):
    module = kinds.build(kind, **model)
    x, t = jnp.zeros((1, model["image_size"], model["image_size"], 1)), jnp.zeros((1,), jnp.int32)
    inputs = (x, t, jnp.zeros((1, 4, 4, 1)), t) if kind == "super_res" else (x, t, t)
    shapes = jax.eval_shape(lambda k: module.init(k, *inputs), jax.random.key(0))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    convert.save_converted(directory, {"kind": kind, "model": model, "diffusion": dict(DIFFUSION)}, params, source)


class CascadeTest(absltest.TestCase):

    def test_cascade_equals_base_samples_run(self):
        tmp = tempfile.mkdtemp()
        base_dir, sr_dir = os.path.join(tmp, "base"), os.path.join(tmp, "sr")
        _save(base_dir, "unet", BASE_MODEL, {"test": True})
        _save(sr_dir, "super_res", SR_MODEL, {"flags": "--large_size 8 --small_size 4"})
        opts = _opts(timestep_respacing="4", labels="1,2,3")
        npz, png = program.run(base_dir, dataclasses.replace(opts, upsampler_workdir=sr_dir,
                                                             out=os.path.join(tmp, "cascade")), log=lambda s: None)
        with np.load(npz) as f:
            cascade, labels = f["arr_0"], f["arr_1"]
        self.assertEqual(cascade.shape, (5, 8, 8, 1))
        np.testing.assert_array_equal(labels, [1, 2, 3, 1, 2])
        base_npz = os.path.join(tmp, "cascade", "base", "samples_5x4x4x1.npz")
        self.assertTrue(os.path.isfile(os.path.join(tmp, "cascade", "pairs.png")))
        npz2, _ = program.run(sr_dir, dataclasses.replace(opts, labels=None, base_samples=base_npz,
                                                          out=os.path.join(tmp, "direct")), log=lambda s: None)
        with np.load(npz2) as f:
            np.testing.assert_array_equal(f["arr_0"], cascade)
        with self.assertRaisesRegex(ValueError, "needs a 'super_res' model as --workdir"):
            program.run(base_dir, dataclasses.replace(opts, base_samples=base_npz), log=lambda s: None)
        with self.assertRaisesRegex(ValueError, "pass --base_samples"):
            program.run(sr_dir, opts, log=lambda s: None)
        with self.assertRaisesRegex(ValueError, "--labels does not apply with --base_samples.*arr_1"):
            program.run(sr_dir, dataclasses.replace(opts, base_samples=base_npz), log=lambda s: None)


class TrainTest(absltest.TestCase):

    def test_digits_sr_trains_two_steps(self):
        c = digits_sr.get_config()
        c.train.update(num_steps=2, batch_size=8, log_every=1, checkpoint_every=2)
        c.diffusion.update(diffusion_steps=20)
        workdir = tempfile.mkdtemp()
        train_lib.train_and_evaluate(c, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual([m["step"] for m in lines], [1, 2])
        self.assertTrue(all(np.isfinite(m["loss"]) for m in lines))

    def test_base_variant_and_validation(self):
        self.assertEqual(digits_sr.get_config("base").model.image_size, 4)
        c = digits_sr.get_config()
        c.super_res.small_size = 8
        with self.assertRaisesRegex(ValueError, "small_size=8 must be smaller"):
            train_lib.validate_config(c)
        c = digits_sr.get_config()
        c.model.in_channels = 1
        with self.assertRaisesRegex(ValueError, "'super_res' model on config.data.channels=1 channels needs 2"):
            train_lib.validate_config(c)


if __name__ == "__main__":
    absltest.main()
