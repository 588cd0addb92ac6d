"""GLIDE's noised CLIP: encoders, tokenizer, import and guidance vs glide-text2im's own outputs.

Fixtures: tests/data/parity/glide/clip_* (README §g): a small config with seeded
random weights run through glide-text2im's ``ImageEncoder``/``TextEncoder`` and
``CLIPModel.cond_fn`` on CPU in float32, NCHW.

Tolerances (float32 throughout; measured errors in brackets):
* embeddings, raw and normalised: atol 2e-5 on values of size ~1-3 [~1e-6];
* the guidance gradient: rtol 1e-4 with atol 1e-5 * max|grad| [abs 1.5e-5 of
  max 30]: entries near zero are differences of terms as large as the largest
  entry, so their error is float32 rounding of those terms, not of the entry;
* tokenizer ids: exact.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax import convert, gaussian, guidance, sampling, schedules, text
from diffusion_jax.convert import clip as convert_clip
from diffusion_jax.models import clip as clip_models

jax.config.update("jax_disable_most_optimizations", True)  # tiny shapes: compile time dominates

DATA = os.path.join(os.path.dirname(__file__), "data", "parity", "glide")
WEIGHTS = {"clip_image": "clip_pub_image", "clip_text": "clip_pub_text"}
EMB_ATOL = 2e-5


@functools.cache
def _flags() -> dict:
    with open(os.path.join(DATA, "clip_pub.json")) as f:
        return json.load(f)


@functools.cache
def _io() -> dict:
    with np.load(os.path.join(DATA, "clip_pub_io.npz")) as z:
        return {k: z[k] for k in z.files}


@functools.cache
def _model(kind: str):
    return convert.from_openai(os.path.join(DATA, WEIGHTS[kind] + "_weights.npz"), {"kind": kind, **_flags()["flags"]})


def _x() -> jax.Array:
    return jnp.asarray(np.moveaxis(_io()["inputs/x"], 1, -1))  # NCHW -> NHWC


def _image_raw(x=None, kernels="auto"):
    module, params = _model("clip_image")
    return module.clone(kernels=kernels).apply({"params": params}, _x() if x is None else x,
                                              jnp.asarray(_io()["inputs/timesteps"], jnp.int32))


def _text_raw(tokens=None):
    module, params = _model("clip_text")
    io = _io()
    tokens = io["inputs/tokens"] if tokens is None else tokens
    return module.apply({"params": params}, jnp.asarray(tokens, jnp.int32), jnp.asarray(io["inputs/lens"], jnp.int32))


def _normalise(z):
    z = np.asarray(z, np.float64)
    return z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-12)


@functools.cache
def _image_fn():
    """(x, t) -> raw image embedding; built outside any trace (the caches must not hold tracers)."""
    module, params = _model("clip_image")
    return jax.jit(lambda x, t: module.apply({"params": params}, x, t))


class EncoderParityTest(parameterized.TestCase):

    @parameterized.parameters("auto", "cpu", "xla")
    def test_image_embedding(self, kernels):
        got = _image_raw(kernels=kernels)
        np.testing.assert_allclose(got, _io()["outputs/image_raw"], atol=EMB_ATOL, rtol=0)
        np.testing.assert_allclose(_normalise(got), _io()["outputs/image_emb"], atol=EMB_ATOL, rtol=0)

    def test_text_embedding(self):
        got = _text_raw()
        np.testing.assert_allclose(got, _io()["outputs/text_raw"], atol=EMB_ATOL, rtol=0)
        np.testing.assert_allclose(_normalise(got), _io()["outputs/text_emb"], atol=EMB_ATOL, rtol=0)

    def test_text_ignores_tokens_after_len(self):
        io = _io()
        tokens = np.array(io["inputs/tokens"])
        after = np.arange(tokens.shape[1])[None] >= io["inputs/lens"][:, None]
        self.assertTrue(after.any())
        tokens[after] = 7  # causal attention: nothing after the end token reaches position len - 1
        np.testing.assert_allclose(_text_raw(tokens), _text_raw(), atol=1e-6, rtol=0)

    def test_image_depends_on_timestep(self):
        t = jnp.asarray(_io()["inputs/timesteps"], jnp.int32)
        a = _image_fn()(_x(), t)
        b = _image_fn()(_x(), t.astype(jnp.float32))  # GLIDE's integer timesteps as floats
        c = _image_fn()(_x(), (t + 1) % 1000)
        np.testing.assert_array_equal(a, b)
        self.assertGreater(float(jnp.abs(a - c).max()), 1e-3)

    def test_bad_kernels_rejected(self):
        with self.assertRaisesRegex(ValueError, "kernels"):
            _image_raw(kernels="cuda")


class GuidanceTest(absltest.TestCase):

    def _cond_fn(self):
        return guidance.clip_cond_fn(_image_fn(), _text_raw(), float(_io()["inputs/grad_scale"]))

    def test_cond_grad_matches_reference(self):
        io = _io()
        got = self._cond_fn()(_x(), jnp.asarray(io["inputs/timesteps"], jnp.int32))
        want = np.moveaxis(io["outputs/cond_grad"], 1, -1)
        self.assertEqual(got.dtype, jnp.float32)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

    def test_cond_grad_is_scale_times_gradient_of_logits(self):
        # Independent of the fixture: the gradient of 100 * sum <text, image> by finite differences (float64 sums).
        io = _io()
        t = jnp.asarray(io["inputs/timesteps"], jnp.int32)
        text_emb = _normalise(_text_raw())
        x = np.asarray(_x(), np.float64)
        direction = np.random.default_rng(0).standard_normal(x.shape)
        eps = 1e-2

        def logits(xx):
            return 100.0 * np.sum(text_emb * _normalise(_image_fn()(jnp.asarray(xx, jnp.float32), t)))

        fd = (logits(x + eps * direction) - logits(x - eps * direction)) / (2 * eps)
        grad = np.asarray(guidance.clip_cond_fn(_image_fn(), _text_raw(), 1.0)(_x(), t), np.float64)
        np.testing.assert_allclose(np.sum(grad * direction), fd, rtol=2e-2)

    def test_composes_with_p_sample(self):
        # A sampler hands cond_fn schedule.model_timesteps(t): the original timesteps for GLIDE's schedule.
        io = _io()
        sched = schedules.make_schedule("cosine", 1000)
        t = jnp.asarray(io["inputs/timesteps"], jnp.int32)
        x = _x()
        noise = jax.random.normal(jax.random.key(0), x.shape)
        kw = dict(mean_type="epsilon", var_type="fixed_small", clip_denoised=True)

        def model_fn(xx, ts, y):
            return 0.1 * xx

        step = jax.jit(functools.partial(sampling.p_sample, sched, model_fn, cond_fn=self._cond_fn(), **kw))
        got, _ = step(x, t, noise)
        out = gaussian.p_mean_variance(sched, model_fn(x, t, None), x, t, **kw)
        mask = (np.asarray(t) != 0)[:, None, None, None]
        want = (out.mean + out.variance * np.moveaxis(io["outputs/cond_grad"], 1, -1)
                + mask * np.exp(0.5 * np.asarray(out.log_variance)) * noise)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


class TokenizerTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tok = text.load_clip_tokenizer(os.path.join(DATA, "bpe_simple_vocab_16e6.txt.gz"))
        with open(os.path.join(DATA, "clip_tokenizer_captions.json")) as f:
            cls.spec = json.load(f)

    def test_reproduces_reference_ids(self):
        with np.load(os.path.join(DATA, "clip_tokenizer.npz")) as z:
            want_tokens, want_lens = z["tokens"], z["lens"]
        tokens, lens = self.tok.tokenize_batch(self.spec["captions"], self.spec["text_ctx"])
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(lens, want_lens)
        for caption, row, n in zip(self.spec["captions"], want_tokens, want_lens):
            self.assertEqual(self.tok.padded_tokens_and_len(self.tok.encode(caption), 77), (row.tolist(), n))

    def test_vocabulary_and_framing(self):
        self.assertEqual(self.tok.n_vocab, 49408)
        self.assertEqual((self.tok.start_token, self.tok.end_token), (49406, 49407))
        ids = self.tok.encode("a handwritten zero " * 40)
        tokens, n = self.tok.padded_tokens_and_len(ids, 12)
        self.assertEqual((len(tokens), n), (12, 12))
        self.assertEqual((tokens[0], tokens[-1]), (49406, 49407))
        self.assertEqual(tokens[1:-1], ids[:10])
        self.assertEqual(self.tok.padded_tokens_and_len([], 5), ([49406, 49407, 0, 0, 0], 2))

    def test_non_ascii_captions_go_through_ftfy(self):
        ids = self.tok.encode("naïve café")
        self.assertEqual(self.tok.decode(ids), "naïve café ")
        self.assertEqual(self.tok.encode("naÃ¯ve cafÃ©"), ids)  # ftfy repairs mojibake, as CLIP's tokenizer does

    def test_clean_and_decode(self):
        self.assertEqual(self.tok.encode("  A   Handwritten\tZERO "), self.tok.encode("a handwritten zero"))
        ids = self.tok.encode("an oil painting of a corgi")
        self.assertEqual(self.tok.decode(ids), "an oil painting of a corgi ")


class ConvertTest(absltest.TestCase):

    def _state_dict(self, kind):
        with np.load(os.path.join(DATA, WEIGHTS[kind] + "_weights.npz")) as z:
            return {k: z[k] for k in z.files}

    def test_pt_and_npz_agree(self):
        for kind in WEIGHTS:
            _, from_npz = _model(kind)
            _, from_pt = convert.from_openai(os.path.join(DATA, WEIGHTS[kind] + ".pt"), {"kind": kind, **_flags()["flags"]})
            jax.tree.map(np.testing.assert_array_equal, from_pt, from_npz)

    def test_state_dict_keys_are_the_reference_ones(self):
        for kind, name in (("clip_image", "image"), ("clip_text", "text")):
            module = convert_clip.clip_module(kind, _flags()["flags"])
            keys = {convert_clip.clip_torch_key(p) for p in convert_clip.clip_param_shapes(module)}
            self.assertEqual(keys, set(_flags()[f"{name}_state_dict_keys"]))

    def test_strict_errors_list_every_bad_key(self):
        sd = self._state_dict("clip_image")
        del sd["blocks.block_1.f_mlp.f_2.b"]
        sd["blocks.block_0.f_attn.f_k.b"] = np.zeros(8, np.float32)
        sd["blocks.input.w_pos"] = np.zeros((3, 8), np.float32)
        sd["blocks.output.f.w"] = sd["blocks.output.f.w"][:, :-1]
        module = convert_clip.clip_module("clip_image", _flags()["flags"])
        with self.assertRaises(ValueError) as ctx:
            convert_clip.clip_params(sd, module, _flags()["flags"])
        msg = str(ctx.exception)
        for key in ("blocks.block_1.f_mlp.f_2.b", "blocks.block_0.f_attn.f_k.b", "blocks.input.w_pos",
                    "blocks.output.f.w"):
            self.assertIn(key, msg)
        self.assertIn("missing keys (1)", msg)
        self.assertIn("unexpected keys (1)", msg)
        self.assertIn("mis-shaped keys (2)", msg)
        self.assertIn("expected (17, 16)", msg)  # torch layout: 1 + (8/2)^2 positions x n_state

    def test_flags(self):
        module = convert_clip.clip_module("clip_image", {})  # config.yaml: the released noised CLIP
        self.assertEqual((module.image_size, module.patch_size, module.n_head, module.n_timestep), (64, 4, 12, 1000))
        self.assertIsInstance(convert_clip.clip_module("clip_text", {"n_vocab": "300"}), clip_models.TextEncoder)
        cfg = convert_clip.clip_config({"kind": "clip_text", **_flags()["flags"]})
        self.assertEqual(clip_models.TextEncoder(**cfg["model"]), _model("clip_text")[0])
        with self.assertRaisesRegex(ValueError, "n_heads"):
            convert_clip.clip_module("clip_image", {"n_heads": 4})


if __name__ == "__main__":
    absltest.main()
