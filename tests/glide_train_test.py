"""Text-conditional (GLIDE) training and `sample.py --prompt` on a tiny captioned-digits run."""

import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from PIL import Image

from configs import glide_digits
from diffusion_jax import convert, text
from diffusion_jax.convert import kinds
from diffusion_jax.runtime import checkpoints
from diffusion_jax.generation import program as sample_lib
from diffusion_jax.training import loop as train_lib
from diffusion_jax.training import steps as train_steps
from diffusion_jax.runtime import text_conditioning as tc

jax.config.update("jax_disable_most_optimizations", True)  # tiny shapes: compile time dominates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTX = 24
PROMPTS = ("the digit 3", "a handwritten five")


def tiny_config(**overrides):
    c = glide_digits.get_config()
    c.model.update(model_channels=32, num_res_blocks=1, xf_width=32, xf_layers=1, xf_heads=2, text_ctx=CTX)
    c.text.update(text_ctx=CTX, grid_prompts=PROMPTS)
    c.diffusion.update(diffusion_steps=10)
    c.optim.update(warmup_steps=0)
    c.train.update(batch_size=8, num_steps=2, log_every=1, checkpoint_every=2, sample_every=0, p_uncond=0.25)
    c.sample.update(num_per_class=1, timestep_respacing="", cfg_scale=2.0)
    for dotted, value in overrides.items():
        group, key = dotted.split(".")
        c[group][key] = value
    return c


def _save_converted_glide(directory):
    """A tiny RGB GLIDE model written like `python -m diffusion_jax.convert` does (no tokenizer settings)."""
    model = dict(tiny_config().model.to_dict(), in_channels=3, out_channels=6)
    module = kinds.build("glide", **model)
    shapes = jax.eval_shape(lambda k: module.init(k, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32),
                                                  tokens=jnp.zeros((1, CTX), jnp.int32),
                                                  mask=jnp.ones((1, CTX), bool)), jax.random.key(0))["params"]
    params = jax.tree.map(lambda s: np.full(s.shape, 0.01, np.float32), shapes)
    diffusion = dict(tiny_config().diffusion.to_dict(), loss_type="mse")
    convert.save_converted(directory, {"kind": "glide", "model": model, "diffusion": diffusion}, params, {})


class GlideTrainTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="glide_train_test_")
        cls.workdir = os.path.join(cls.tmp, "run")
        cls.metrics = train_lib.train_and_evaluate(tiny_config(), cls.workdir)

    def test_training_writes_checkpoint_metrics_and_prompt_grid(self):
        self.assertTrue(np.isfinite(self.metrics["loss"]))
        self.assertIn("vb", self.metrics)  # learned sigma + hybrid loss
        self.assertTrue(checkpoints.has_checkpoints(self.workdir))
        self.assertIn("2", os.listdir(os.path.join(self.workdir, "checkpoints")))
        with open(os.path.join(self.workdir, "config.json")) as f:
            stored = json.load(f)
        self.assertEqual(stored["kind"], "glide")
        self.assertEqual(stored["text"]["tokenizer"], "byte")
        grid = np.asarray(Image.open(os.path.join(self.workdir, "samples", "step_0000002.png")))
        self.assertEqual(grid.shape[0], 4 * (2 * 9 + 1))  # two prompt rows of 8 px images, upscaled x4
        module, params, cfg = checkpoints.load_for_inference(self.workdir)
        self.assertEqual(type(module).__name__, "Text2ImUNet")
        self.assertEqual(cfg["checkpoint_step"], 2)

    def test_caption_dropout_gives_the_null_caption_at_the_rate(self):
        config = tiny_config(**{"train.p_uncond": 0.25})
        schedule = train_lib.make_schedule(config)
        spec = train_lib.make_spec(config, schedule)
        tokenizer = text.ByteTokenizer()
        captions = [f"the digit {i % 10}" for i in range(2000)]
        cond = tc.caption_batch(tokenizer, captions, CTX)
        batch = dict(image=jnp.zeros((2000, 8, 8, 1)), tokens=jnp.asarray(cond["tokens"]),
                     mask=jnp.asarray(cond["mask"]))
        state = train_steps.TrainState(step=jnp.zeros((), jnp.int32), params=None, opt_state=None, ema_params=(),
                                       sampler_state=spec.sampler.init(), first_nonfinite=jnp.int32(-1))
        micro, _ = train_steps._diffusion_inputs(state, batch, jax.random.key(0), schedule=schedule, spec=spec,
                                                 mask_rng=jax.random.key(1))
        tokens, mask = np.asarray(micro["y"]["tokens"]), np.asarray(micro["y"]["mask"])
        null = tc.null_caption(tokenizer, CTX)
        is_null = np.all(tokens == null["tokens"], axis=1) & np.all(mask == null["mask"], axis=1)
        self.assertBetween(is_null.mean(), 0.22, 0.28)
        np.testing.assert_array_equal(tokens[~is_null], cond["tokens"][~is_null])
        np.testing.assert_array_equal(mask[~is_null], cond["mask"][~is_null])
        self.assertFalse(null["mask"].any())
        self.assertTrue((null["tokens"] == tokenizer.end_token).all())

    def test_cfg_scale_one_is_the_conditional_model(self):
        module, params, _ = checkpoints.load_for_inference(self.workdir)
        tokenizer = text.ByteTokenizer()
        cond = tc.caption_batch(tokenizer, PROMPTS, CTX)
        null = tc.null_caption(tokenizer, CTX)
        x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
        t = jnp.array([3, 7], jnp.int32)

        @jax.jit
        def outputs(params):
            direct = module.apply({"params": params}, x, t, tokens=cond["tokens"], mask=cond["mask"])
            res = [direct]
            for scale in (None, 1.0, 5.0):
                fn, y = tc.text_model_fn(module, params, cond["tokens"], cond["mask"], null=null, cfg_scale=scale)
                res.append(fn(x, t, y))
            return res

        direct, plain, guided1, guided5 = outputs(params)
        np.testing.assert_allclose(plain, direct, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(guided1, direct, rtol=1e-5, atol=1e-5)
        # A large scale moves eps only; the variance channel stays the conditional one.
        np.testing.assert_allclose(guided5[..., 1:], direct[..., 1:], rtol=1e-5, atol=1e-5)
        self.assertGreater(float(jnp.max(jnp.abs(guided5[..., :1] - direct[..., :1]))), 1e-7)

    def test_sample_cli_with_prompts(self):
        out = os.path.join(self.tmp, "cli_out")
        prompts_file = os.path.join(self.tmp, "prompts.txt")
        with open(prompts_file, "w") as f:
            f.write("a handwritten five\n\n")
        cmd = [sys.executable, os.path.join(ROOT, "sample.py"), f"--workdir={self.workdir}",
               "--prompt=the digit 3", f"--prompts_file={prompts_file}", "--num_samples=3", "--batch_size=4",
               "--timestep_respacing=3", "--cfg_scale=3", f"--out={out}", "--noprogress"]
        env = dict(os.environ, JAX_PLATFORMS="cpu")  # conftest's 8 CPU devices, as the run was trained on
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        npz = os.path.join(out, "samples_3x8x8x1.npz")
        self.assertIn(f"wrote {npz}", proc.stdout)
        with np.load(npz) as z:
            self.assertEqual(z["arr_0"].shape, (3, 8, 8, 1))
            self.assertEqual(z["arr_0"].dtype, np.uint8)
            np.testing.assert_array_equal(z["arr_1"], [0, 1, 0])
            self.assertEqual(list(z["prompts"]), ["the digit 3", "a handwritten five"])
        self.assertEqual(np.asarray(Image.open(npz[:-4] + ".png")).shape, (4 * 19, 4 * 19))  # 2x2 grid, x4
        # In process with another batch size: the same samples (a function of (seed, i)).
        opts = sample_lib.SampleOptions(num_samples=3, batch_size=16, timestep_respacing="3", cfg_scale=3.0,
                                        prompts=PROMPTS, out=os.path.join(self.tmp, "in_process"), progress=False)
        path, _ = sample_lib.run(self.workdir, opts, log=lambda s: None)
        with np.load(path) as a, np.load(npz) as b:
            np.testing.assert_allclose(a["arr_0"].astype(int), b["arr_0"].astype(int), atol=1)

    def test_missing_captions_is_a_clear_error(self):
        folder = os.path.join(self.tmp, "images")
        os.makedirs(folder, exist_ok=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(os.path.join(folder, f"c{i}_{i}.png"))
        config = tiny_config(**{"data.name": f"folder:{folder}", "data.channels": 3, "model.in_channels": 3,
                                "model.out_channels": 6})
        with self.assertRaisesRegex(ValueError, "text-conditional.*has no captions"):
            train_lib.train_and_evaluate(config, os.path.join(self.tmp, "nocaptions"))

    def test_missing_tokenizer_files_are_clear_errors(self):
        # Training with the GLIDE tokenizer and no files.
        config = tiny_config(**{"text.tokenizer": "glide", "text.encoder_json": "/nonexistent/encoder.json",
                                "text.vocab_bpe": "/nonexistent/vocab.bpe", "model.n_vocab": 50257})
        with self.assertRaisesRegex(FileNotFoundError, "encoder.json.*vocab.bpe.*glide-text2im"):
            train_lib.validate_config(config)
        # A converted GLIDE checkpoint stores no tokenizer: --tokenizer_dir is required ...
        converted = os.path.join(self.tmp, "converted")
        _save_converted_glide(converted)
        opts = sample_lib.SampleOptions(num_samples=1, prompts=PROMPTS, progress=False)
        with self.assertRaisesRegex(FileNotFoundError, "--tokenizer_dir.*encoder.json and vocab.bpe"):
            sample_lib.run(converted, opts, log=lambda s: None)
        # ... and must hold both files.
        empty = os.path.join(self.tmp, "empty_tokenizer")
        os.makedirs(empty, exist_ok=True)
        with open(os.path.join(empty, "encoder.json"), "w") as f:
            f.write("{}")
        with self.assertRaisesRegex(FileNotFoundError, "lacks vocab.bpe"):
            sample_lib.run(converted, sample_lib.SampleOptions(num_samples=1, prompts=PROMPTS,
                                                               tokenizer_dir=empty, progress=False))

    def test_prompt_option_errors(self):
        with self.assertRaisesRegex(ValueError, "--prompt"):
            sample_lib.run(self.workdir, sample_lib.SampleOptions(num_samples=1, progress=False))
        with self.assertRaisesRegex(ValueError, "class-conditional models, not text models"):
            sample_lib.run(self.workdir, sample_lib.SampleOptions(num_samples=1, prompts=PROMPTS, labels="1"))


if __name__ == "__main__":
    absltest.main()
