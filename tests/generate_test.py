"""The generation engine (padding, trimming, per-row conditioning) and the sampler table."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax import sampling, schedules
from diffusion_jax.generation import engine, images, samplers
from diffusion_jax.runtime import parallel

SHAPE = (4, 4, 3)
SCHEDULE = schedules.make_schedule("linear", 100, "4")
KW = {"mean_type": "epsilon", "var_type": "fixed_small"}


def _model_fn(x, t, y):
    """A cheap stand-in network: depends on x, the timestep and (if given) the label."""
    out = 0.3 * x + 1e-3 * t.astype(jnp.float32)[:, None, None, None]
    return out if y is None else out + 0.05 * y.astype(jnp.float32)[:, None, None, None]


def _loop_sample_fn(loop):
    def sample_fn(_, rng, ids, y):
        return loop(rng, _model_fn, SCHEDULE, (ids.shape[0],) + SHAPE, sample_ids=ids, y=y, **KW)

    return sample_fn


def _as_pixels(v):
    """Integer values 0..255 -> floats that `to_uint8` maps back to exactly v."""
    return jnp.asarray(v, jnp.float32) / 127.5 - 1.0


def _echo_fn(_, rng, ids, cond):
    """Writes each row's conditioning into its pixels: [label, id, masked token sum, low-res upsampled]."""
    del rng
    b = ids.shape[0]
    fill = lambda v: jnp.broadcast_to(_as_pixels(v)[:, None, None], (b, 4, 4))
    tokens = jnp.sum(cond["text"]["tokens"] * cond["text"]["mask"], axis=1)
    low = jnp.repeat(jnp.repeat(cond["low_res"][..., 0], 2, axis=1), 2, axis=2)
    return jnp.stack([fill(cond["label"]), fill(ids % 256), fill(tokens), _as_pixels(low)], axis=-1)


def _conditioning(n):
    rng = np.random.default_rng(n)
    return {"label": rng.integers(0, 10, n).astype(np.int32),
            "text": {"tokens": rng.integers(0, 20, (n, 5)).astype(np.int32), "mask": rng.random((n, 5)) < 0.7},
            "low_res": rng.integers(0, 256, (n, 2, 2, 1)).astype(np.uint8)}


def _expected_echo(cond, n):
    label = np.broadcast_to(cond["label"][:, None, None], (n, 4, 4))
    ids = np.broadcast_to((np.arange(n) % 256)[:, None, None], (n, 4, 4))
    tok = (cond["text"]["tokens"] * cond["text"]["mask"]).sum(1)
    tok = np.broadcast_to(tok[:, None, None], (n, 4, 4))
    low = cond["low_res"][..., 0].repeat(2, 1).repeat(2, 2)
    return np.stack([label, ids, tok, low], -1).astype(np.uint8)


# (num_samples, batch_size, devices): N not a multiple of the batch, batch not a multiple of the devices.
CASES = (("one_padded_batch", 5, 3, 8), ("two_batches", 13, 8, 8), ("three_devices", 7, 2, 3),
         ("one_device", 3, 2, 1))


class EngineTest(parameterized.TestCase):

    @parameterized.named_parameters(*CASES)
    def test_equals_a_direct_loop_on_the_same_ids(self, n, batch, devices):
        labels = np.arange(n, dtype=np.int32) % 3
        rng = jax.random.key(4)
        out = engine.generate(_loop_sample_fn(sampling.p_sample_loop), n, batch_size=batch, rng=rng,
                              conditioning=labels, mesh=parallel.make_mesh(devices), log=None)
        direct = jax.jit(lambda: images.to_uint8(sampling.p_sample_loop(
            rng, _model_fn, SCHEDULE, (n,) + SHAPE, sample_ids=jnp.arange(n), y=jnp.asarray(labels), **KW)))()
        self.assertEqual(out.images.shape, (n,) + SHAPE)
        self.assertEqual(out.images.dtype, np.uint8)
        np.testing.assert_array_equal(out.images, np.asarray(direct))
        np.testing.assert_array_equal(out.conditioning, labels)
        self.assertGreater(len(np.unique(out.images)), 20)

    @parameterized.named_parameters(*CASES)
    def test_each_row_gets_its_own_conditioning(self, n, batch, devices):
        cond = _conditioning(n)
        mesh = parallel.make_mesh(devices)
        out = engine.generate(_echo_fn, n, batch_size=batch, rng=jax.random.key(0), conditioning=cond, mesh=mesh,
                              log=None)
        np.testing.assert_array_equal(out.images, _expected_echo(cond, n))
        jax.tree.map(np.testing.assert_array_equal, out.conditioning, cond)
        # The same conditioning as a function of the global sample ids.
        as_fn = lambda ids: jax.tree.map(lambda a: a[ids], cond)
        out_fn = engine.generate(_echo_fn, n, batch_size=batch, rng=jax.random.key(0), conditioning=as_fn,
                                 mesh=mesh, log=None)
        np.testing.assert_array_equal(out_fn.images, out.images)

    def test_batch_rounding_is_logged_and_args_reach_the_function(self):
        lines = []
        fn = lambda scale, rng, ids, cond: jnp.zeros((ids.shape[0], 2, 2, 1)) + scale
        out = engine.generate(fn, 3, batch_size=3, rng=jax.random.key(0), args=jnp.float32(0.5), log=lines.append)
        self.assertIn("rounded up to 8", lines[0])
        self.assertEqual(lines[-1], "batch 1/1: 3 samples")
        np.testing.assert_array_equal(out.images, np.full((3, 2, 2, 1), 191, np.uint8))  # round(1.5 * 127.5)
        self.assertIsNone(out.conditioning)

    def test_bad_inputs(self):
        with self.assertRaisesRegex(ValueError, r"\[N=4"):
            engine.generate(_echo_fn, 4, batch_size=2, rng=jax.random.key(0), conditioning=_conditioning(3), log=None)
        with self.assertRaisesRegex(ValueError, ">= 1"):
            engine.generate(_echo_fn, 0, batch_size=2, rng=jax.random.key(0), log=None)

    def test_local_rows_and_round_up(self):
        mesh = parallel.make_mesh(8)
        self.assertEqual(engine.round_up_batch(9, mesh), 16)
        self.assertEqual(engine.round_up_batch(8, mesh), 8)
        self.assertEqual(engine.local_rows(parallel.data_sharded(mesh), 16), (0, 16))  # one process: every row


class ImagesTest(absltest.TestCase):

    def test_to_uint8_matches_numpy(self):
        x = np.linspace(-1.2, 1.2, 1001, dtype=np.float32)
        want = np.clip(np.round((x.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(images.to_uint8(x)), want)

    def test_grid_layout(self):
        imgs = np.arange(5 * 2 * 3 * 1, dtype=np.uint8).reshape(5, 2, 3, 1)
        grid = images.image_grid(imgs, nrow=3, upscale=1)
        self.assertEqual(grid.shape, (2 * 3 + 1, 3 * 4 + 1, 1))
        np.testing.assert_array_equal(grid[1:3, 1:4], imgs[0])
        np.testing.assert_array_equal(grid[4:6, 5:8], imgs[4])  # row 1, column 1
        self.assertTrue((grid[0] == 255).all() and (grid[:, 4] == 255).all() and (grid[4:6, 9:12] == 255).all())
        big = images.image_grid(imgs, nrow=3, upscale=3)
        np.testing.assert_array_equal(big[::3, ::3], grid)
        np.testing.assert_array_equal(big[1::3, 2::3], grid)
        self.assertEqual(images.image_grid(np.zeros((4, 8, 8, 1), np.uint8)).shape, (4 * 19, 4 * 19, 1))  # 2x2, x4


class SamplerTableTest(parameterized.TestCase):

    @parameterized.parameters(*samplers.SAMPLERS)
    def test_table_entry_is_its_loop(self, name):
        row = samplers.SAMPLERS[name]
        choice = samplers.choose(name)
        self.assertEqual(choice.clip_denoised, row.clip_denoised)
        rng, shape = jax.random.key(1), (3,) + SHAPE
        got = jax.jit(lambda: samplers.make_loop(choice)(rng, _model_fn, SCHEDULE, shape, **KW))()
        want = jax.jit(lambda: sampling.named_sampler(name)(rng, _model_fn, SCHEDULE, shape,
                                                            clip_denoised=row.clip_denoised, **KW))()
        np.testing.assert_array_equal(got, want)
        self.assertTrue(np.all(np.isfinite(got)))

    def test_defaults_and_names(self):
        # One table: every math-layer name has exactly one row here.
        self.assertEqual(tuple(samplers.SAMPLERS), sampling.SAMPLER_NAMES)
        self.assertEqual(set(samplers.SAMPLERS), {"ancestral", "ddim", "dpm++2m", "dpm++3m", "dpm2s", "dpm++2m-sde",
                                                  "edm"})
        self.assertTrue(samplers.SAMPLERS["ancestral"].clip_denoised and samplers.SAMPLERS["ddim"].clip_denoised)
        for name in ("dpm++2m", "dpm++3m", "dpm2s"):  # data prediction thresholds x0; noise prediction does not
            self.assertEqual(samplers.SAMPLERS[name].clip_denoised, name != "dpm2s")
            self.assertIs(samplers.SAMPLERS[name].loop.func, sampling.dpm_solver_sample_loop)
        self.assertEqual(samplers.SAMPLERS["dpm++3m"].loop.keywords,
                         {"order": 3, "method": "multistep", "algorithm": "dpmsolver++"})
        self.assertEqual(samplers.SAMPLERS["dpm2s"].loop.keywords,
                         {"order": 2, "method": "singlestep", "algorithm": "dpmsolver"})
        self.assertIs(samplers.SAMPLERS["ancestral"].loop.func, sampling.p_sample_loop)
        self.assertIs(samplers.SAMPLERS["ddim"].loop.func, sampling.ddim_sample_loop)
        self.assertEqual(samplers.choose().name, "ancestral")
        self.assertEqual(samplers.choose(use_ddim=True, eta=0.5), samplers.Choice("ddim", True, 0.5))
        self.assertFalse(samplers.choose("ddim", clip_denoised=False).clip_denoised)
        self.assertFalse(samplers.choose("dpm++2m", clip_denoised=False).clip_denoised)

    def test_ddim_eta_reaches_the_loop(self):
        rng, shape = jax.random.key(2), (2,) + SHAPE
        run = lambda c: jax.jit(lambda: samplers.make_loop(c)(rng, _model_fn, SCHEDULE, shape, **KW))()
        got = run(samplers.choose("ddim", eta=0.7))
        want = jax.jit(lambda: sampling.ddim_sample_loop(rng, _model_fn, SCHEDULE, shape, eta=0.7, **KW))()
        np.testing.assert_array_equal(got, want)
        self.assertGreater(float(jnp.max(jnp.abs(got - run(samplers.choose("ddim"))))), 1e-3)

    @parameterized.named_parameters(
        ("unknown", {"sampler": "euler"}, "not a sampler"),
        ("alias_conflict", {"sampler": "dpm++2m", "use_ddim": True}, "alias"),
        ("eta_without_ddim", {"sampler": "ancestral", "eta": 0.3}, "use_ddim"),
        ("eta_with_dpm", {"sampler": "dpm2s", "eta": 0.3}, "sampler=ddim"),
        ("negative_eta", {"sampler": "ddim", "eta": -1.0}, ">= 0"),
    )
    def test_errors(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            samplers.choose(**kwargs)


if __name__ == "__main__":
    absltest.main()
