"""CLIP guidance of ADM U-Nets (`sample.py --workdir=<unet> --clip_workdir=D --prompt=...`) and CLIP pair directories.

Tiny random models: the 8x8 RGB U-Nets of tests/sample_cli_test.py (linear
schedule, T = 100) and OpenAI-layout noised-CLIP towers (8x8 images, width 16,
CLIP's real BPE vocabulary from tests/data/parity/glide) written as state dicts
and imported with `python -m diffusion_jax.convert --repo=clip`.
"""

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from diffusion_jax.convert import cli as convert_cli
from diffusion_jax.convert import clip as convert_clip
from diffusion_jax.convert import clip_towers
from diffusion_jax.generation import clip_guidance, program, unet
from diffusion_jax.models.clip_pair import ClipPair
from tests import sample_cli_test as sct

jax.config.update("jax_disable_most_optimizations", True)  # tiny shapes: compile time dominates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = os.path.join(ROOT, "tests", "data", "parity", "glide", clip_towers.VOCAB_FILE)
FLAGS = {"image_size": 8, "patch_size": 4, "n_embd": 16, "n_head_image": 2, "n_xf_blocks_image": 1,
         "n_head_state_image": 8, "n_head_text": 2, "n_xf_blocks_text": 1, "n_head_state_text": 8,
         "n_vocab": 49408, "max_text_len": 12, "n_timesteps": 100, "beta_schedule": "linear"}
PROMPTS = ("a red square", "a blue circle")
STRONG = 1e4  # random towers: a large scale makes the shift visible on the uint8 grid after 3 steps


def _torch_state_dict(kind: str) -> dict:
    """Random weights of one tower in glide-text2im's layout (what `clip/*-enc` checkpoints hold)."""
    module = convert_clip.clip_module(kind, FLAGS)
    rng = np.random.default_rng(len(kind))
    out = {}
    for path, leaf in convert_clip.clip_param_shapes(module).items():
        w = (rng.standard_normal(leaf.shape) / np.sqrt(max(leaf.shape[0], 1))).astype(np.float32)
        if path[-1] in ("g",):
            w = 1.0 + 0.1 * w
        if path[-1] == "w" and w.ndim == 2:
            w = w.T  # [in, out] -> torch [out, in]
        elif path[-1] == "patch_proj":
            w = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        out[convert_clip.clip_torch_key(path)] = w
    return out


@functools.cache
def _shared_pair() -> str:
    """One converted pair directory for every test here (conversion is the slow part of the fixtures)."""
    tmp = tempfile.mkdtemp(prefix="clip_pair_")
    _convert(os.path.join(tmp, "pair"), tmp)
    return os.path.join(tmp, "pair")


def _convert(out: str, tmp: str, extra=()) -> None:
    paths = {}
    for kind in ("clip_image", "clip_text"):
        paths[kind] = os.path.join(tmp, f"{kind}.npz")
        np.savez(paths[kind], **_torch_state_dict(kind))
    flags = " ".join(f"--{k} {v}" for k, v in FLAGS.items())
    convert_cli.main([f"--checkpoint={paths['clip_image']}", f"--text_checkpoint={paths['clip_text']}",
                      "--repo=clip", f"--flags={flags}", f"--clip_vocab={VOCAB}", f"--out={out}", *extra])


class ClipPairDirectoryTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="clip_guidance_test_")
        cls.pair = _shared_pair()

    def test_layout_and_round_trip(self):
        self.assertEqual(sorted(os.listdir(self.pair)),
                         sorted([clip_towers.PAIR_FILE, "image", "text", clip_towers.VOCAB_FILE]))
        towers = clip_towers.load_pair(self.pair)
        self.assertEqual((towers.image.n_embd, towers.text.n_embd, towers.flags["logit_scale"]), (16, 16, 100.0))
        sd = _torch_state_dict("clip_image")
        np.testing.assert_array_equal(towers.image_params["input"]["patch_proj"],
                                      sd["blocks.input.patch_proj"].transpose(2, 3, 1, 0))
        guide = clip_guidance.towers_guide(towers)
        tokens = clip_guidance.prompt_tokens(guide, PROMPTS)
        self.assertEqual(tokens["tokens"].shape, (2, FLAGS["max_text_len"]))
        np.testing.assert_array_equal(tokens["lens"], [5, 5])  # start, 3 words, end

    def test_mismatched_widths_refused(self):
        bad = os.path.join(self.tmp, "bad_widths")
        shutil.copytree(self.pair, bad)
        cfg_path = os.path.join(bad, "text", "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["model"]["n_embd"] = 8
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        with self.assertRaisesRegex(ValueError, r"different widths \(image n_embd=16, text n_embd=8\)"):
            clip_towers.load_pair(bad)

    def test_converter_needs_both_towers_and_the_vocabulary(self):
        with self.assertRaisesRegex(ValueError, "--text_checkpoint"):
            convert_cli.main(["--checkpoint=x.npz", "--preset=clip", f"--out={self.tmp}/o1"])
        with self.assertRaisesRegex(ValueError, "--preset=clip"):
            convert_cli.main(["--checkpoint=x.npz", "--preset=64x64_diffusion", "--text_checkpoint=y.npz",
                              f"--out={self.tmp}/o2"])

    def test_compatibility_errors(self):
        towers = clip_towers.load_pair(self.pair)
        model = {"diffusion": dict(sct.DIFFUSION)}
        clip_guidance.check_towers(towers, model, (8, 8, 3))
        with self.assertRaisesRegex(ValueError, "8x8x3 images but the model samples 8x8x1"):
            clip_guidance.check_towers(towers, model, (8, 8, 1))
        with self.assertRaisesRegex(ValueError, "beta_schedule='linear' but the model uses 'squaredcos_cap_v2'"):
            clip_guidance.check_towers(towers, {"diffusion": dict(sct.DIFFUSION, noise_schedule="squaredcos_cap_v2")},
                                       (8, 8, 3))
        with self.assertRaisesRegex(ValueError, "n_timesteps=100 but the model uses 1000"):
            clip_guidance.check_towers(towers, {"diffusion": dict(sct.DIFFUSION, diffusion_steps=1000)}, (8, 8, 3))


class AdmClipGuidanceTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="clip_adm_test_")
        cls.pair = _shared_pair()
        cls.cond_dir, cls.uncond_dir = os.path.join(cls.tmp, "cond"), os.path.join(cls.tmp, "uncond")
        sct._save(cls.cond_dir, "unet", sct.UNET)
        sct._save(cls.uncond_dir, "unet", dict(sct.UNET, num_classes=None, null_label=False))

    def _run(self, workdir, name, **kw):
        opts = program.SampleOptions(**dict(dict(num_samples=3, batch_size=4, timestep_respacing="3", progress=False,
                                                 out=os.path.join(self.tmp, name)), **kw))
        with np.load(program.run(workdir, opts, log=lambda s: None)[0]) as z:
            return {k: z[k] for k in z.files}

    def test_class_conditional(self):
        """The labels stay the model's condition; scale 0 is the unguided sampler, scale > 0 moves the samples."""
        base = dict(labels="0,2", cfg_scale=2.0)
        plain = self._run(self.cond_dir, "plain", **base)
        zero = self._run(self.cond_dir, "zero", clip_workdir=self.pair, clip_scale=0.0, prompts=PROMPTS, **base)
        strong = self._run(self.cond_dir, "strong", clip_workdir=self.pair, clip_scale=STRONG, prompts=PROMPTS,
                           **base)
        np.testing.assert_array_equal(zero["arr_0"], plain["arr_0"])
        self.assertGreater(np.abs(strong["arr_0"].astype(int) - plain["arr_0"]).max(), 0)
        np.testing.assert_array_equal(strong["arr_1"], [0, 2, 0])
        self.assertEqual(list(strong["prompts"]), list(PROMPTS))

    def test_unconditional_ddim(self):
        """An unconditional model; DDIM takes the gradient on its score (eps - sqrt(1 - abar) grad)."""
        kw = dict(sampler="ddim", prompts=PROMPTS[:1], clip_workdir=self.pair)
        zero = self._run(self.uncond_dir, "z_ddim", clip_scale=0.0, **kw)
        strong = self._run(self.uncond_dir, "s_ddim", clip_scale=STRONG, **kw)
        self.assertGreater(np.abs(strong["arr_0"].astype(int) - zero["arr_0"]).max(), 0)
        self.assertNotIn("arr_1", strong)

    def test_trained_pair_null_label_dpm_solver(self):
        """A `ClipPair` (kind "clip") through the same plan, on a null-label model sampled unconditionally
        (--labels=null) with a DPM-Solver++ row of the sampler table; its prompts cycle over the samples."""
        pair = ClipPair(image_size=8, patch_size=4, image_channels=3, n_embd=16, n_head_image=1, n_xf_blocks_image=1,
                        n_head_text=1, n_xf_blocks_text=1, n_head_state=8, n_timestep=100, text_ctx=16)
        params = pair.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32),
                           jnp.zeros((1, 16), jnp.int32), jnp.ones((1,), jnp.int32))["params"]
        from diffusion_jax.text import ByteTokenizer

        guide = clip_guidance.pair_guide(pair, params, ByteTokenizer(), 16, scale=STRONG)
        module, model_params, cfg = program.load_for_inference(self.cond_dir)
        opts = program.SampleOptions(num_samples=3, batch_size=4, timestep_respacing="3", labels="null",
                                     sampler="dpm++2m", progress=False)
        plan = unet.make_plan(cfg, opts)
        plain, _ = unet.generate(module, model_params, plan, opts, log=None)
        guided, _ = unet.generate(module, model_params, dataclasses.replace(plan, clip=guide, prompts=PROMPTS),
                                  opts, log=None)
        self.assertGreater(np.abs(guided.astype(int) - plain).max(), 0)

    def test_option_errors(self):
        with self.assertRaisesRegex(ValueError, "pass --prompt"):
            self._run(self.uncond_dir, "e1", clip_workdir=self.pair)
        with self.assertRaisesRegex(ValueError, r"--prompt, --prompts_file.*need a text \(GLIDE\) model"):
            self._run(self.uncond_dir, "e2", prompts=PROMPTS)
        with self.assertRaisesRegex(ValueError, "must hold a CLIP pair"):
            self._run(self.uncond_dir, "e3", clip_workdir=self.cond_dir, prompts=PROMPTS)

    def test_cli_refuses_mismatched_towers_with_exit_2(self):
        bad = os.path.join(self.tmp, "bad_pair")
        os.makedirs(bad)
        with open(os.path.join(self.pair, clip_towers.PAIR_FILE)) as f:
            pair = json.load(f)
        other = os.path.join(self.tmp, "other_text")  # a text tower of another width, pointed at from elsewhere
        shutil.copytree(os.path.join(self.pair, "text"), other)
        with open(os.path.join(other, "config.json")) as f:
            cfg = json.load(f)
        cfg["model"]["n_embd"] = 32
        with open(os.path.join(other, "config.json"), "w") as f:
            json.dump(cfg, f)
        pair.update(image=os.path.join(self.pair, "image"), text=other, vocab=VOCAB)
        with open(os.path.join(bad, clip_towers.PAIR_FILE), "w") as f:
            json.dump(pair, f)
        cmd = [sys.executable, os.path.join(ROOT, "sample.py"), f"--workdir={self.uncond_dir}", "--prompt=a cat",
               f"--clip_workdir={bad}", "--num_samples=1", f"--out={self.tmp}/cli_out", "--noprogress"]
        env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        self.assertLen(lines, 1, proc.stderr)
        self.assertIn("image n_embd=16, text n_embd=32", lines[0])
        self.assertFalse(os.path.exists(f"{self.tmp}/cli_out"))


if __name__ == "__main__":
    absltest.main()
