"""The contrastive CLIP pair: its loss, training kind "clip", and `sample.py --clip_workdir` (CLIP guidance)."""

import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from configs import digits_clip, glide_digits
from diffusion_jax import guidance, objectives, schedules
from diffusion_jax.generation import clip_guidance
from diffusion_jax.generation import program as sample_lib
from diffusion_jax.models.clip_pair import ClipPair
from diffusion_jax.runtime import checkpoints
from diffusion_jax.training import loop as train_lib

jax.config.update("jax_disable_most_optimizations", True)  # tiny shapes: compile time dominates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTX = 24
T = 10
PROMPTS = ("the digit 3", "a handwritten five")


def _override(c, overrides):
    for dotted, value in overrides.items():
        group, key = dotted.split(".")
        c[group][key] = value
    return c


def tiny_clip_config(**overrides):
    c = digits_clip.get_config()
    c.model.update(n_embd=16, n_head_image=2, n_head_text=2, n_head_state=8, n_xf_blocks_image=1,
                   n_xf_blocks_text=1, n_timestep=T, text_ctx=CTX)
    c.text.update(text_ctx=CTX)
    c.diffusion.update(diffusion_steps=T)
    c.optim.update(warmup_steps=0)
    c.train.update(batch_size=8, num_steps=2, log_every=1, checkpoint_every=2)
    return _override(c, overrides)


def tiny_glide_config():
    c = glide_digits.get_config()
    c.model.update(model_channels=32, num_res_blocks=1, xf_width=32, xf_layers=1, xf_heads=2, text_ctx=CTX)
    c.text.update(text_ctx=CTX, grid_prompts=PROMPTS)
    c.diffusion.update(diffusion_steps=T)
    c.train.update(batch_size=8, num_steps=1, log_every=1, checkpoint_every=1, sample_every=0, p_uncond=0.25)
    c.sample.update(num_per_class=1, timestep_respacing="")
    return c


def numpy_clip_loss(image, text, scale):
    """Float64 reference: symmetric InfoNCE on L2-normalised embeddings (CLIP, Fig. 3)."""
    f = image / (np.linalg.norm(image, axis=-1, keepdims=True) + 1e-12)
    g = text / (np.linalg.norm(text, axis=-1, keepdims=True) + 1e-12)
    logits = scale * f @ g.T
    log_rows = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    log_cols = logits - np.log(np.exp(logits - logits.max(0, keepdims=True)).sum(0, keepdims=True)) \
        - logits.max(0, keepdims=True)
    i = np.arange(len(logits))
    image_loss, text_loss = -log_rows[i, i].mean(), -log_cols[i, i].mean()
    return (image_loss + text_loss) / 2, image_loss, text_loss, (logits.argmax(1) == i).mean()


class LossTest(absltest.TestCase):

    def test_matches_float64_numpy(self):
        rng = np.random.default_rng(0)
        for b, d, scale in ((4, 8, 14.3), (3, 5, 100.0), (1, 4, 1.0)):
            image, text = rng.standard_normal((2, b, d))
            text[0] = image[0] + 0.1 * text[0]  # one well-aligned pair
            got = objectives.clip_contrastive_loss(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32),
                                                   scale)
            want = numpy_clip_loss(image, text, scale)
            np.testing.assert_allclose([float(v) for v in got], want, rtol=2e-5, atol=2e-5)

    def test_symmetric_and_scale_invariant_in_norms(self):
        rng = np.random.default_rng(1)
        image, text = jnp.asarray(rng.standard_normal((2, 4, 6)), jnp.float32)
        a = objectives.clip_contrastive_loss(image, text, 10.0)
        b = objectives.clip_contrastive_loss(text, image * 7.0, 10.0)  # swapped towers, rescaled rows
        np.testing.assert_allclose([a.image_loss, a.text_loss], [b.text_loss, b.image_loss], rtol=1e-5)

    def test_shape_mismatch(self):
        with self.assertRaisesRegex(ValueError, r"\(4, 6\).*\(3, 6\)"):
            objectives.clip_contrastive_loss(jnp.zeros((4, 6)), jnp.zeros((3, 6)), 1.0)


class GuidanceShapeTest(absltest.TestCase):

    def test_wrong_number_of_prompts_names_shapes_and_fix(self):
        pair = ClipPair(image_size=8, patch_size=4, image_channels=1, n_embd=8, n_head_image=1, n_xf_blocks_image=1,
                        n_head_text=1, n_xf_blocks_text=1, n_head_state=8, n_timestep=T, text_ctx=CTX)
        x = jnp.zeros((2, 8, 8, 1))
        params = pair.init(jax.random.key(0), x, jnp.zeros((2,), jnp.int32), jnp.zeros((2, CTX), jnp.int32),
                           jnp.ones((2,), jnp.int32))["params"]
        image_fn = lambda x, t: pair.apply({"params": params}, x, t, method="encode_image")
        cond_fn = guidance.clip_cond_fn(image_fn, jnp.ones((3, 8)), 1.0)
        with self.assertRaisesRegex(ValueError, r"3 text embeddings \(3, 8\) for a batch of 2.*one prompt per image"):
            cond_fn(x, jnp.zeros((2,), jnp.int32))
        for rows in (1, 2):  # one prompt for all, or one per image
            self.assertEqual(guidance.clip_cond_fn(image_fn, jnp.ones((rows, 8)), 1.0)(
                x, jnp.zeros((2,), jnp.int32)).shape, x.shape)

    def test_respaced_model_timesteps_are_original_indices(self):
        """GLIDE/digits schedules do not rescale: the cond_fn sees the CLIP table's original indices."""
        s = schedules.make_schedule("cosine", 1000, "50", rescale_timesteps=False)
        t = jnp.arange(s.num_timesteps)
        np.testing.assert_array_equal(s.model_timesteps(t), s.timestep_map[t])
        self.assertEqual(int(s.model_timesteps(t)[-1]), 999)

    def test_compatibility_errors(self):
        clip_cfg = {"kind": "clip", "model": dict(image_size=8, image_channels=1, n_timestep=T),
                    "diffusion": {"noise_schedule": "cosine", "diffusion_steps": T}}
        model_cfg = {"diffusion": {"noise_schedule": "cosine", "diffusion_steps": T}}
        clip_guidance.check_compatible(clip_cfg, model_cfg, (8, 8, 1))
        with self.assertRaisesRegex(ValueError, "8x8x1 images but the model samples 8x8x3"):
            clip_guidance.check_compatible(clip_cfg, model_cfg, (8, 8, 3))
        longer = {"diffusion": {"noise_schedule": "cosine", "diffusion_steps": 4 * T}}
        with self.assertRaisesRegex(ValueError, f"{T} rows but the model's diffusion has {4 * T} steps"):
            clip_guidance.check_compatible(clip_cfg, longer, (8, 8, 1))
        linear = {"diffusion": {"noise_schedule": "linear", "diffusion_steps": T}}
        with self.assertRaisesRegex(ValueError, "noise_schedule='cosine' but the model uses 'linear'"):
            clip_guidance.check_compatible(clip_cfg, linear, (8, 8, 1))
        with self.assertRaisesRegex(ValueError, "must hold a CLIP pair"):
            clip_guidance.check_compatible(dict(clip_cfg, kind="glide"), model_cfg, (8, 8, 1))
        with self.assertRaisesRegex(ValueError, "3 prompts for 2 samples.*--num_samples=3"):
            clip_guidance.check_prompts(("a", "b", "c"), 2)


class ClipTrainAndGuideTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="clip_train_test_")
        cls.clip_dir = os.path.join(cls.tmp, "clip")
        cls.glide_dir = os.path.join(cls.tmp, "glide")
        cls.metrics = train_lib.train_and_evaluate(tiny_clip_config(), cls.clip_dir)
        train_lib.train_and_evaluate(tiny_glide_config(), cls.glide_dir)

    def test_trains_and_loads_for_inference(self):
        for key in ("loss", "image_loss", "text_loss", "acc", "acc_q0", "logit_scale", "grad_norm"):
            self.assertIn(key, self.metrics)
        self.assertTrue(np.isfinite(self.metrics["loss"]))
        module, params, cfg = checkpoints.load_for_inference(self.clip_dir)
        self.assertIsInstance(module, ClipPair)
        self.assertEqual((cfg["kind"], cfg["checkpoint_step"]), ("clip", 2))
        self.assertEqual(set(params), {"image", "text", "logit_scale"})

    def test_bad_configs(self):
        for overrides, pattern in (({"model.n_timestep": T - 1}, "does not cover"),
                                   ({"train.microbatches": 2}, "microbatches must be 1"),
                                   ({"model.image_channels": 3}, "image_channels=3 but config.data.channels=1")):
            with self.assertRaisesRegex(ValueError, pattern):
                train_lib.validate_config(tiny_clip_config(**overrides))

    def _run(self, name, **kw):
        opts = sample_lib.SampleOptions(**dict(dict(num_samples=3, batch_size=4, timestep_respacing="4",
                                                    prompts=PROMPTS, progress=False, out=os.path.join(self.tmp, name)),
                                               **kw))
        path, _ = sample_lib.run(self.glide_dir, opts, log=lambda s: None)
        with np.load(path) as z:
            return z["arr_0"].astype(int)

    def test_clip_guidance_in_process(self):
        plain = self._run("plain")
        zero = self._run("zero", clip_workdir=self.clip_dir, clip_scale=0.0)
        strong = self._run("strong", clip_workdir=self.clip_dir, clip_scale=1e4)
        np.testing.assert_array_equal(zero, plain)  # scale 0: the unguided conditional samples
        self.assertGreater(np.abs(strong - plain).max(), 0)

    def test_clip_option_errors(self):
        with self.assertRaisesRegex(ValueError, "drop --cfg_scale"):
            self._run("e1", clip_workdir=self.clip_dir, cfg_scale=3.0)
        with self.assertRaisesRegex(ValueError, "3 prompts for 2 samples"):
            self._run("e2", clip_workdir=self.clip_dir, num_samples=2, prompts=PROMPTS + ("a",))
        with self.assertRaisesRegex(ValueError, "must hold a CLIP pair"):
            self._run("e3", clip_workdir=self.glide_dir)
        with self.assertRaisesRegex(ValueError, "--clip_scale given without --clip_workdir"):
            self._run("e4", clip_scale=2.0)

    def test_sample_cli(self):
        out = os.path.join(self.tmp, "cli")
        cmd = [sys.executable, os.path.join(ROOT, "sample.py"), f"--workdir={self.glide_dir}", "--prompt=the digit 3",
               f"--clip_workdir={self.clip_dir}", "--clip_scale=2", "--num_samples=2", "--batch_size=8",
               "--timestep_respacing=3", f"--out={out}", "--noprogress"]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        with np.load(os.path.join(out, "samples_2x8x8x1.npz")) as z:
            self.assertEqual(z["arr_0"].shape, (2, 8, 8, 1))


if __name__ == "__main__":
    absltest.main()
