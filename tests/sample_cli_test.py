"""sample.py / generation.program end to end on tiny converted checkpoints, and its input checks."""

import dataclasses
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image

from diffusion_jax import convert
from diffusion_jax.convert import kinds
from diffusion_jax.generation import images, program

jax.config.update("jax_disable_most_optimizations", True)  # tiny shapes: compile time dominates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET = {"image_size": 8, "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
            "attention_resolutions": (2,), "channel_mult": (1, 2), "num_heads": 2, "use_scale_shift_norm": True,
            "num_classes": 3, "null_label": True}
CLASSIFIER = {"image_size": 8, "in_channels": 3, "model_channels": 32, "out_channels": 3, "num_res_blocks": 1,
                  "attention_resolutions": (2,), "channel_mult": (1, 2), "num_head_channels": 16,
                  "use_scale_shift_norm": True, "resblock_updown": True, "pool": "attention"}
DIFFUSION = {"noise_schedule": "linear", "diffusion_steps": 100, "timestep_respacing": "", "rescale_timesteps": False,
                 "mean_type": "epsilon", "var_type": "learned_range", "loss_type": "mse"}


def _random_params(module, *inputs):
    """Random params at the module's shapes (no init compile), every layer live.

    Kernels ~ N(0, 1/fan_in), norm scales ~ 1, everything else small, so the
    zero-initialised output layers matter too.
    """
    shapes = jax.eval_shape(lambda k: module.init(k, *inputs), jax.random.key(0))["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        noise = rng.standard_normal(shape).astype(np.float32)
        if name == "kernel":
            return noise / np.sqrt(np.prod(shape[:-1]))
        return (1.0 if name == "scale" else 0.0) + 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _cfg(kind, model, diffusion=DIFFUSION):
    return {"kind": kind, "model": model, "diffusion": dict(diffusion)}


def _save(directory, kind, model):
    module = kinds.build(kind, **model)
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    inputs = (x, t) if kind == "classifier" else (x, t, None if model.get("num_classes") is None else t)
    convert.save_converted(directory, _cfg(kind, model), _random_params(module, *inputs), {"test": True})


class SampleEndToEndTest(parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.cond_dir = os.path.join(cls.tmp, "cond")
        cls.uncond_dir = os.path.join(cls.tmp, "uncond")
        cls.cls_dir = os.path.join(cls.tmp, "classifier")
        _save(cls.cond_dir, "unet", UNET)
        _save(cls.uncond_dir, "unet", dict(UNET, num_classes=None, null_label=False))
        _save(cls.cls_dir, "classifier", CLASSIFIER)

    def test_writes_npz_and_png_with_cfg(self):
        out = os.path.join(self.tmp, "out_cfg")
        opts = program.SampleOptions(num_samples=5, batch_size=4, timestep_respacing="3", labels="0,2",
                                        cfg_scale=2.0, seed=1, out=out, progress=False)
        npz_path, png_path = program.run(self.cond_dir, opts, log=lambda s: None)
        self.assertEqual(npz_path, os.path.join(out, "samples_5x8x8x3.npz"))
        with np.load(npz_path) as z:
            images, labels = z["arr_0"], z["arr_1"]
        self.assertEqual(images.shape, (5, 8, 8, 3))
        self.assertEqual(images.dtype, np.uint8)
        np.testing.assert_array_equal(labels, [0, 2, 0, 2, 0])
        self.assertGreater(len(np.unique(images)), 10)
        with Image.open(png_path) as im:  # 3 columns x 2 rows of 8 px images, 1 px lines, upscaled x4
            self.assertEqual(im.size, (4 * (3 * 9 + 1), 4 * (2 * 9 + 1)))
        # Sample i depends only on (seed, i): a different batch size (and padding) agrees.
        opts2 = dataclasses.replace(opts, num_samples=3, batch_size=16, out=os.path.join(self.tmp, "out_cfg2"))
        npz2, _ = program.run(self.cond_dir, opts2, log=lambda s: None)
        with np.load(npz2) as z:
            np.testing.assert_array_equal(z["arr_0"], images[:3])

    def test_samplers_from_the_table(self):
        """--sampler=ddim is --use_ddim; a DPM solver keeps sample i a function of (seed, i)."""
        base = dict(num_samples=3, timestep_respacing="4", labels="1,2", progress=False)
        outs = {}
        for name, kw in (("alias", {"use_ddim": True}), ("ddim", {"sampler": "ddim"}),
                         ("dpm", {"sampler": "dpm++2m", "batch_size": 2}),
                         ("dpm_big", {"sampler": "dpm++2m", "batch_size": 8})):
            opts = program.SampleOptions(**base, **kw, out=os.path.join(self.tmp, f"out_{name}"))
            with np.load(program.run(self.cond_dir, opts, log=lambda s: None)[0]) as z:
                outs[name] = z["arr_0"]
        np.testing.assert_array_equal(outs["alias"], outs["ddim"])
        np.testing.assert_array_equal(outs["dpm"], outs["dpm_big"])
        self.assertGreater(np.abs(outs["dpm"].astype(int) - outs["ddim"]).max(), 0)

    def test_cli_classifier_guided_ddim(self):
        """The real entry point: unconditional model + classifier, DDIM, on one CPU device."""
        out = os.path.join(self.tmp, "out_cli")
        env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                   JAX_DISABLE_MOST_OPTIMIZATIONS="1")
        cmd = [sys.executable, os.path.join(ROOT, "sample.py"), f"--workdir={self.uncond_dir}",
               "--num_samples=3", "--batch_size=2", "--timestep_respacing=ddim4", "--use_ddim", "--eta=0.5",
               f"--classifier_workdir={self.cls_dir}", "--classifier_scale=3", "--labels=random",
               f"--out={out}", "--noprogress"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        npz_path = os.path.join(out, "samples_3x8x8x3.npz")
        self.assertIn(f"wrote {npz_path}", proc.stdout)
        self.assertTrue(os.path.isfile(os.path.join(out, "samples_3x8x8x3.png")))
        with np.load(npz_path) as z:
            self.assertEqual(z["arr_0"].shape, (3, 8, 8, 3))
            self.assertTrue(np.all((z["arr_1"] >= 0) & (z["arr_1"] < 3)))

    def test_loader_rejects_non_checkpoints(self):
        with self.assertRaises((FileNotFoundError, ValueError)):
            program.load_for_inference(os.path.join(self.tmp, "nowhere"))


class PlanValidationTest(parameterized.TestCase):
    """Bad input fails before anything is compiled, with a message naming the problem."""

    def _plan(self, model=UNET, classifier=None, **opts):
        return program.make_plan(_cfg("unet", model), program.SampleOptions(**opts),
                                    None if classifier is None else _cfg("classifier", classifier))

    def test_valid_plans(self):
        plan = self._plan(labels="2,0", timestep_respacing="ddim5", cfg_scale=3.0)
        self.assertEqual(plan.schedule.num_timesteps, 5)
        self.assertEqual(plan.null_index, 3)
        np.testing.assert_array_equal(program.labels_for(plan, 0, np.arange(5)), [2, 0, 2, 0, 2])
        plan = self._plan(labels="random")
        a = program.labels_for(plan, 7, np.arange(10))
        np.testing.assert_array_equal(program.labels_for(plan, 7, np.arange(4, 6)), a[4:6])
        self.assertTrue(np.all((a >= 0) & (a < 3)))
        null = self._plan(labels="null")
        np.testing.assert_array_equal(program.labels_for(null, 0, np.arange(3)), [3, 3, 3])
        uncond = self._plan(model=dict(UNET, num_classes=None, null_label=False))
        self.assertIsNone(program.labels_for(uncond, 0, np.arange(3)))

    @parameterized.named_parameters(
        ("label_out_of_range", {"labels": "0,3"}, "out of range"),
        ("negative_label", {"labels": "-1"}, "out of range"),
        ("label_not_int", {"labels": "cat"}, "comma list"),
        ("labels_for_uncond", {"model": dict(UNET, num_classes=None, null_label=False), "labels": "1"},
         "unconditional"),
        ("cfg_without_null", {"model": dict(UNET, null_label=False), "cfg_scale": 2.0}, "null label"),
        ("cfg_on_uncond", {"model": dict(UNET, num_classes=None, null_label=False), "cfg_scale": 2.0}, "null label"),
        ("null_without_null", {"model": dict(UNET, null_label=False), "labels": "null"}, "null label"),
        ("classifier_classes", {"classifier": dict(CLASSIFIER, out_channels=5)}, "5 classes"),
        ("classifier_size", {"classifier": dict(CLASSIFIER, image_size=16)}, "16px"),
        ("bad_respacing", {"timestep_respacing": "ddim1"}, "timestep_respacing"),
        ("too_many_steps", {"timestep_respacing": "500"}, "timestep_respacing"),
        ("eta_without_ddim", {"eta": 0.5}, "use_ddim"),
        ("eta_with_dpm", {"eta": 0.5, "sampler": "dpm++3m"}, "sampler=ddim"),
        ("unknown_sampler", {"sampler": "heun"}, "not a sampler"),
        ("ddim_alias_conflict", {"use_ddim": True, "sampler": "dpm2s"}, "alias"),
        ("no_samples", {"num_samples": 0}, "num_samples"),
    )
    def test_errors(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            self._plan(**kwargs)

    def test_rejects_non_unet(self):
        with self.assertRaisesRegex(ValueError, "unet"):
            program.make_plan(_cfg("classifier", CLASSIFIER), program.SampleOptions())

    def test_plan_sampler(self):
        self.assertEqual(self._plan().sampler, program.samplers.Choice("ancestral", True))
        self.assertEqual(self._plan(sampler="dpm++2m").sampler.clip_denoised, True)
        self.assertEqual(self._plan(sampler="dpm2s").sampler.clip_denoised, False)
        self.assertEqual(self._plan(use_ddim=True, eta=0.5, clip_denoised=False).sampler,
                         program.samplers.Choice("ddim", False, 0.5))

    def test_grid(self):
        imgs = np.arange(5 * 2 * 2 * 1, dtype=np.uint8).reshape(5, 2, 2, 1)
        grid = images.image_grid(imgs, upscale=1)  # ceil(sqrt(5)) = 3 columns, 2 rows, 1 px white lines
        self.assertEqual(grid.shape, (2 * 3 + 1, 3 * 3 + 1, 1))
        np.testing.assert_array_equal(grid[4:6, 1:3], imgs[3])
        self.assertTrue((grid[0] == 255).all() and (grid[:, 3] == 255).all())


if __name__ == "__main__":
    absltest.main()
