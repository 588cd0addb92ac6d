"""Streaming FID (evaluation.streaming / fid_run) and sample.py's shards: equal to the all-at-once results,
resumable after an interruption, independent of the device count, strict about changed settings."""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from diffusion_jax.evaluation import fid_run, inception, metrics, streaming
from diffusion_jax.generation import program, unet
from diffusion_jax.runtime import cli, parallel, resume
from diffusion_jax.runtime.checkpoints import load_for_inference
from tests.metrics_test import _random_state_dict
from tests.sample_cli_test import UNET, _save

jax.config.update("jax_disable_most_optimizations", True)  # tiny shapes: compile time dominates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = 5  # Inception Score splits of 5 samples, so splits straddle the 8-sample batches
DIMS = (6, 5, 4)  # stand-in pool / spatial / logits sizes


def _features(params, images):
    """A deterministic stand-in for Inception: projections of the pixels (any features_fn works)."""
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 127.5 - 1.0
    dot = lambda w: jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    return dot(params["pool"]), jnp.tanh(dot(params["spatial"])), 3.0 * dot(params["logits"])


def _stand_in_params():
    rng = np.random.default_rng(0)
    return {name: (rng.standard_normal((192, d)) / np.sqrt(192)).astype(np.float32)
            for name, d in zip(("pool", "spatial", "logits"), DIMS)}


class StreamingFidTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.workdir = os.path.join(cls.tmp, "cond")
        _save(cls.workdir, "unet", UNET)
        cls.module, cls.params, cls.cfg = load_for_inference(cls.workdir)
        cls.opts = program.SampleOptions(num_samples=20, batch_size=8, timestep_respacing="2", labels="random",
                                         cfg_scale=2.0, seed=3, progress=False)
        cls.plan = unet.make_plan(cls.cfg, cls.opts)
        cls.fparams = _stand_in_params()
        cls.images, _ = unet.generate(cls.module, cls.params, cls.plan, cls.opts, log=None)

    def _run(self, partial_file=None, settings=None, mesh=None, fail_after=None, sample=False):
        """Stream the test images (sample=True: sample them again through the engine) into stand-in sums."""
        mesh = mesh or parallel.make_mesh()

        def batches(start):
            source = (unet.stream(self.module, self.params, self.plan, self.opts, start=start, mesh=mesh, log=None)
                      if sample else fid_run.array_batches(self.images, 8, mesh, start))
            for k, b in enumerate(source):
                if fail_after is not None and k == fail_after:
                    raise RuntimeError("preempted")
                yield b

        return fid_run.run_streaming(batches, _features, self.fparams, num_samples=len(self.images),
                                     names=("fid", "sfid", "is"), settings=settings or {"seed": self.opts.seed},
                                     mesh=mesh, partial_file=partial_file, dims=DIMS, split_size=SPLIT,
                                     progress=False)

    def test_streaming_equals_all_features_at_once(self):
        sums = self._run(sample=True)  # straight from the sampler: the same images as engine.generate's
        pool, spatial, logits = (np.asarray(f, np.float64) for f in jax.jit(_features)(self.fparams, self.images))
        self.assertEqual(int(sums.count), 20)
        for (s, q), f in (((sums.pool_sum, sums.pool_outer), pool), ((sums.spatial_sum, sums.spatial_outer), spatial)):
            got, want = streaming.stats(s, q, sums.count), metrics.feature_stats(f)
            np.testing.assert_allclose(got.mu, want.mu, rtol=1e-5, atol=1e-6)  # float32 features
            np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(sums.split_count, [5, 5, 5, 5])
        self.assertAlmostEqual(streaming.inception_score(sums),
                               metrics.inception_score(metrics.softmax(logits), SPLIT), places=6)

    def test_interrupted_and_resumed_equals_straight_and_other_settings_are_refused(self):
        path = os.path.join(self.tmp, "resume", "fid.partial.npz")
        straight = self._run()
        with self.assertRaisesRegex(RuntimeError, "preempted"):
            self._run(partial_file=path, fail_after=1)  # one batch of 8 done and saved
        with np.load(path) as f:
            self.assertEqual(int(f["count"]), 8)
            self.assertEqual(json.loads(str(f["settings"])), {"seed": 3})
        resumed = self._run(partial_file=path)
        for name, a, b in zip(streaming.Sums._fields, resumed, straight):
            np.testing.assert_array_equal(a, b, err_msg=name)
        with self.assertRaisesRegex(resume.ResumeError, r"refusing to resume:\n  seed: stored 3, now 4"):
            self._run(partial_file=path, settings={"seed": 4})
        # batch_size does not change the samples: resuming with another one is allowed.
        self._run(partial_file=path, settings={"seed": 3, "batch_size": 16})

    def test_one_and_four_devices_agree(self):
        """The same images on 1 and 4 devices (the sampler itself may flip a rare uint8 rounding between
        device counts: XLA:CPU's float results depend on the per-device batch)."""
        one, four = self._run(mesh=parallel.make_mesh(1)), self._run(mesh=parallel.make_mesh(4))
        for s, q, d in (("pool_sum", "pool_outer", DIMS[0]), ("spatial_sum", "spatial_outer", DIMS[1])):
            ref = metrics.Stats(np.zeros(d), np.eye(d))
            fid = [metrics.frechet_distance(ref, streaming.stats(getattr(x, s), getattr(x, q), x.count))
                   for x in (one, four)]
            np.testing.assert_allclose(fid[0], fid[1], rtol=1e-5)
        np.testing.assert_allclose(one.pool_outer, four.pool_outer, rtol=1e-5, atol=1e-6)
        self.assertAlmostEqual(streaming.inception_score(one), streaming.inception_score(four), places=5)

    def test_choose_metrics(self):
        ref = {"stats": metrics.Stats(np.zeros(3), np.eye(3)), "images": None}
        self.assertEqual(fid_run.choose_metrics(None, 2023, ref), ("fid", "is", "sfid"))
        self.assertEqual(fid_run.choose_metrics(None, 3000, {"stats": ref["stats"]}), ("fid", "is"))
        self.assertEqual(fid_run.choose_metrics(None, 2022, ref), ("fid", "is"))
        self.assertEqual(fid_run.choose_metrics(["IS"], 10, {}), ("is",))
        with self.assertRaisesRegex(ValueError, r"--num_samples=100 is smaller than the 2023-dimensional"):
            fid_run.choose_metrics(["fid", "sfid"], 100, ref)
        with self.assertRaisesRegex(ValueError, "unknown.*precision"):
            fid_run.choose_metrics(["precision"], 100, ref)
        with self.assertRaisesRegex(ValueError, "neither mu_s/sigma_s"):
            fid_run.choose_metrics(["sfid"], 3000, {"stats": ref["stats"]})

    def test_grayscale_reaches_inception_as_rgb(self):
        class Echo:
            def apply(self, variables, images):
                return (images,)

        (rgb,) = fid_run.inception_features(Echo())({}, jnp.arange(4, dtype=jnp.uint8).reshape(1, 2, 2, 1))
        np.testing.assert_array_equal(rgb, np.repeat(np.arange(4).reshape(1, 2, 2, 1), 3, axis=-1))

    def test_bad_input_is_a_usage_error_and_writes_nothing(self):
        ref = os.path.join(self.tmp, "ref_imgs.npz")
        np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
        empty_ref = os.path.join(self.tmp, "ref_empty.npz")
        np.savez(empty_ref, other=np.zeros(3))
        weights = os.path.join(self.tmp, "fake.pth")
        open(weights, "w").close()
        out = os.path.join(self.tmp, "bad", "fid.json")
        base = dict(workdir=self.workdir, num_samples=100, ref=ref, inception_path=weights, out=out, metrics=None,
                    batch_size=8, metric="fid")
        for change, pattern in (({"metrics": ["sfid"]}, "smaller than the 2023"),
                                ({"ref": empty_ref}, "neither arr_0 images nor mu/sigma"),
                                ({"inception_path": weights + ".missing"}, "no such file"),
                                ({"num_samples": None}, "needs --num_samples")):
            with self.assertRaisesRegex((ValueError, FileNotFoundError), pattern) as e:
                fid_run.evaluate_fid(dict(base, **change))
            self.assertEqual(cli.exit_status(e.exception), 2)
            self.assertFalse(os.path.exists(os.path.dirname(out)))


class SampleShardsTest(absltest.TestCase):

    def test_shards_resume_and_match_the_in_memory_npz(self):
        tmp = tempfile.mkdtemp()
        workdir = os.path.join(tmp, "cond")
        _save(workdir, "unet", UNET)
        opts = program.SampleOptions(num_samples=19, batch_size=8, timestep_respacing="2", labels="0,2", seed=1,
                                     progress=False, out=os.path.join(tmp, "plain"), write_shards=False)
        plain, _ = program.run(workdir, opts, log=lambda s: None)
        sharded_opts = dataclasses.replace(opts, out=os.path.join(tmp, "sharded"), write_shards=True)
        real_stream = program.stream

        def preempted_stream(*args, **kwargs):
            for k, b in enumerate(real_stream(*args, **kwargs)):
                if k == 1:
                    raise RuntimeError("preempted")
                yield b

        with mock.patch.object(program, "stream", preempted_stream), self.assertRaisesRegex(RuntimeError, "preempt"):
            program.run(workdir, sharded_opts, log=lambda s: None)
        shard_dir = os.path.join(tmp, "sharded", "samples_19x8x8x3.shards")
        self.assertEqual(sorted(os.listdir(shard_dir)), ["000000000.npz", "settings.json"])
        with self.assertRaisesRegex(resume.ResumeError, "seed: stored 1, now 2"):
            program.run(workdir, dataclasses.replace(sharded_opts, seed=2), log=lambda s: None)
        logs = []
        sharded, png = program.run(workdir, sharded_opts, log=logs.append)
        self.assertIn("resuming from 8 samples", logs[0])
        self.assertFalse(os.path.exists(shard_dir))
        self.assertTrue(os.path.isfile(png))
        with np.load(plain) as a, np.load(sharded) as b:
            self.assertEqual(a.files, b.files)
            for k in a.files:
                self.assertEqual(a[k].dtype, b[k].dtype)
                np.testing.assert_array_equal(a[k], b[k])


class EndToEndCliTest(absltest.TestCase):

    def test_cli_through_flax_inception(self):
        """evaluate.py --metric=fid --workdir on 3 samples, random pytorch-fid-format Inception weights, 1 device."""
        import torch

        tmp = tempfile.mkdtemp()
        workdir = os.path.join(tmp, "cond")
        _save(workdir, "unet", UNET)
        shapes = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                                jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))["params"]
        weights = os.path.join(tmp, "pt_inception.pth")
        state_dict = _random_state_dict({k: v for k, v in shapes.items() if k != "fc"}, 0)
        g = torch.Generator().manual_seed(1)
        state_dict.update({"fc.weight": torch.randn(1008, 2048, generator=g) * 0.05, "fc.bias": torch.zeros(1008)})
        torch.save(state_dict, weights)
        ref = os.path.join(tmp, "ref.npz")
        np.savez(ref, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
        out = os.path.join(tmp, "eval", "fid.json")
        env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
        cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--metric=fid", f"--workdir={workdir}",
               "--num_samples=3", "--batch_size=3", "--timestep_respacing=2", "--labels=1", "--cfg_scale=2",
               f"--ref={ref}", f"--inception_path={weights}", "--metrics=is", f"--out={out}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        with open(out) as f:
            report = json.load(f)
        self.assertEqual(report["num_samples"], 3)
        self.assertTrue(np.isfinite(report["inception_score"]) and report["inception_score"] >= 1.0)
        self.assertEqual(report["settings"]["cfg_scale"], 2.0)
        with np.load(os.path.join(tmp, "eval", "fid.partial.npz")) as f:
            self.assertEqual(int(f["count"]), 3)
            self.assertEqual(f["split_p"].shape, (1, 1008))


if __name__ == "__main__":
    absltest.main()
