"""The bound of a guided chain (evaluate.py --metric=nll --cfg_scale / --classifier_workdir).

The classifier-shifted mean in the bound is p_sample's mean; classifier scale 0
is the unguided bound; CFG scale 1 is the conditional bound and scale 0 the
null-label model's eps; the sharded runner agrees with a direct computation;
bad guidance options fail before any work.
"""

import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from diffusion_jax import convert, gaussian, guidance, likelihood, sampling, schedules
from diffusion_jax.convert import kinds
from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import nll, nll_guidance, run

jax.config.update("jax_disable_most_optimizations", True)  # tiny shapes: compile time dominates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET = {"image_size": 8, "in_channels": 1, "model_channels": 32, "out_channels": 2, "num_res_blocks": 1,
        "channel_mult": (1,), "num_heads": 1, "use_scale_shift_norm": True, "num_classes": 10, "null_label": True}
CLASSIFIER = {"image_size": 8, "in_channels": 1, "model_channels": 32, "out_channels": 10, "num_res_blocks": 1,
              "channel_mult": (1,), "pool": "adaptive"}
DIFFUSION = {"noise_schedule": "cosine", "diffusion_steps": 10, "timestep_respacing": "", "rescale_timesteps": False,
             "mean_type": "epsilon", "var_type": "learned_range", "loss_type": "mse"}
KW = dict(mean_type="epsilon", var_type="learned_range", clip_denoised=True)


def _save(directory, kind, model):
    """A converted checkpoint with random params (every layer live, the zero-initialised ones too)."""
    module = kinds.build(kind, **model)
    x, t = jnp.zeros((1, model["image_size"], model["image_size"], 1)), jnp.zeros((1,), jnp.int32)
    inputs = (x, t) if kind == "classifier" else (x, t, None if model.get("num_classes") is None else t)
    shapes = jax.eval_shape(lambda k: module.init(k, *inputs), jax.random.key(0))["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1].key == "kernel":
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        if path[-1].key == "embedding":  # nn.Embed's scale: labels must matter
            return noise
        return (1.0 if path[-1].key == "scale" else 0.0) + 0.05 * noise

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    convert.save_converted(directory, {"kind": kind, "model": model, "diffusion": dict(DIFFUSION)}, params,
                           {"test": True})


def _options(workdir, out, **kw):
    o = dict(workdir=workdir, data="digits", data_dir=None, split="test", num_samples=8, batch_size=8, t_chunk=4,
             start=0, stop=None, seed=0, timestep_respacing="", clip_denoised=True, allow_resize=False,
             ema_rate=None, out=out, cfg_scale=None, classifier_workdir=None, classifier_scale=None)
    return dict(o, **kw)


class ShiftedMeanTest(absltest.TestCase):
    """The math hook: `likelihood.vb_terms_bpd(..., cond_fn, y)` against `sampling.p_sample`."""

    def test_bound_uses_p_sample_mean_and_scale_zero_is_unguided(self):
        s = schedules.make_schedule("linear", 1000, "10")
        k = jax.random.split(jax.random.key(0), 4)
        x_start = jnp.round(jax.random.uniform(k[0], (4, 4, 4, 3), minval=-1, maxval=1) * 127.5) / 127.5
        x_t = jax.random.normal(k[1], x_start.shape)
        t = jnp.array([0, 3, 5, 9], jnp.int32)
        y = jnp.array([0, 2, 1, 2], jnp.int32)
        w = jax.random.normal(k[2], (3, 3)) * 3.0  # toy classifier: linear in the channel means

        def model_fn(x, ts, yy):  # eps and learned-range values, label dependent
            return jnp.concatenate([0.5 * x + 0.1 * yy[:, None, None, None], jnp.tanh(x)], -1)

        def cond(scale):
            return guidance.classifier_cond_fn(lambda x, ts: jnp.mean(x, (1, 2)) @ w, scale)

        out = model_fn(x_t, s.model_timesteps(t), y)

        @jax.jit
        def terms(scale):
            cond_fn = None if scale is None else cond(scale)
            vb, _ = likelihood.vb_terms_bpd(s, out, x_start, x_t, t, cond_fn=cond_fn, y=y, **KW)
            # p_sample with zero noise returns the mean it would sample around (at t = 0 it always does).
            mean, _ = sampling.p_sample(s, model_fn, x_t, t, jnp.zeros_like(x_t), cond_fn=cond_fn, y=y, **KW)
            pmv = gaussian.p_mean_variance(s, out, x_t, t, **KW)
            q = gaussian.q_posterior(s, x_start, x_t, t)
            decoder = likelihood.discretized_gaussian_log_likelihood(
                x_start, means=mean, log_scales=0.5 * pmv.log_variance)
            return vb, mean, pmv.log_variance, q.mean, q.log_variance, decoder

        vb, mean, logvar, q_mean, q_logvar, decoder = (np.asarray(a, np.float64) for a in terms(2.5))
        # Float64 KL(q || N(p_sample's mean, Sigma)) for t > 0, the decoder NLL at p_sample's mean for t = 0.
        kl = 0.5 * (-1.0 + logvar - q_logvar + np.exp(q_logvar - logvar) + (q_mean - mean) ** 2 * np.exp(-logvar))
        want = np.where(np.asarray(t) == 0, -decoder.mean((1, 2, 3)), kl.mean((1, 2, 3))) / np.log(2.0)
        np.testing.assert_allclose(vb, want, rtol=1e-5, atol=1e-6)
        unguided = np.asarray(terms(None)[0])
        self.assertGreater(np.abs(vb - unguided).min(), 2e-5)  # the shift matters at every t, t = 0 included
        np.testing.assert_allclose(terms(0.0)[0], unguided, rtol=1e-6, atol=1e-7)


class GuidedNllTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.cond_dir, cls.plain_dir, cls.cls_dir = (os.path.join(cls.tmp, n) for n in ("cond", "plain", "clf"))
        _save(cls.cond_dir, "unet", UNET)
        _save(cls.plain_dir, "unet", dict(UNET, null_label=False))
        _save(cls.cls_dir, "classifier", CLASSIFIER)
        cls.module, cls.params, _ = run.load_model(cls.cond_dir)
        source = pipeline.make_source("digits", "test")
        batch = next(iter(pipeline.make_eval_iterator(source, batch_size=8, image_size=8, channels=1, stop=8,
                                                      process_index=0, process_count=1)))
        cls.x, cls.y = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
        cls.index = jnp.asarray(batch["index"], jnp.int32)
        cls.schedule = schedules.make_schedule("cosine", 10)

    def _model_fn(self, x, ts, y):
        return self.module.apply({"params": self.params}, x, ts, y)

    def test_cfg_identities(self):
        """S = 1 is the conditional bound; S = 0 the null label's eps (Sigma from the conditional half)."""
        s, null = self.schedule, jnp.full_like(self.y, 10)

        def bound(model_fn, y, var_type="learned_range"):  # 4 examples, one chunk of all 10 timesteps
            return nll.chain_terms(model_fn, s, self.x[:4], y[:4], self.index[:4], jax.random.key(1), t_chunk=10,
                                   **dict(KW, var_type=var_type)).total

        def eps_only(x, ts, y):  # the same network read as a fixed-variance model
            return self._model_fn(x, ts, y)[..., :1]

        def null_eps_cond_sigma(x, ts, y):
            return jnp.concatenate([self._model_fn(x, ts, jnp.full_like(y, 10))[..., :1],
                                    self._model_fn(x, ts, y)[..., 1:]], -1)

        @jax.jit
        def all_bounds():
            cfg = lambda fn, scale: guidance.classifier_free(fn, scale, null_label=10)
            return (bound(self._model_fn, self.y), bound(cfg(self._model_fn, 1.0), self.y),
                    bound(null_eps_cond_sigma, self.y), bound(cfg(self._model_fn, 0.0), self.y),
                    bound(eps_only, null, "fixed_large"), bound(cfg(eps_only, 0.0), self.y, "fixed_large"))

        cond, cfg1, null_learned, cfg0, null_fixed, cfg0_fixed = (np.asarray(b) for b in all_bounds())
        np.testing.assert_allclose(cfg1, cond, rtol=1e-5)
        np.testing.assert_allclose(cfg0, null_learned, rtol=1e-5)
        np.testing.assert_allclose(cfg0_fixed, null_fixed, rtol=1e-5)
        self.assertGreater(np.abs(null_learned - cond).min(), 1e-3)  # the label matters: the checks can fail

    def test_sharded_runner_equals_direct_chain(self):
        """evaluate_nll with both guidances (8 devices, chunked t) == one direct chain_terms; resume refused."""
        out = os.path.join(self.tmp, "eval", "guided.json")
        o = _options(self.cond_dir, out, cfg_scale=2.0, classifier_workdir=self.cls_dir, classifier_scale=3.0)
        report = run.evaluate_nll(o)
        classifier, cls_params, _ = run.load_model(self.cls_dir)
        model_fn = guidance.classifier_free(self._model_fn, 2.0, null_label=10)
        cond_fn = guidance.classifier_cond_fn(lambda x, ts: classifier.apply({"params": cls_params}, x, ts), 3.0)
        want = jax.jit(lambda: nll.chain_terms(model_fn, self.schedule, self.x, self.y, self.index,
                                               jax.random.key(0), t_chunk=10, cond_fn=cond_fn, **KW).total)()
        with np.load(os.path.splitext(out)[0] + "_terms.npz") as f:
            np.testing.assert_allclose(f["total_bpd"], want, rtol=1e-5)
        np.testing.assert_allclose(report["bits_per_dim"], np.mean(want), rtol=1e-5)
        self.assertEqual(report["settings"]["cfg_scale"], 2.0)
        self.assertEqual(report["settings"]["classifier_scale"], 3.0)
        self.assertEqual(report["settings"]["classifier_workdir"], os.path.abspath(self.cls_dir))
        with open(out) as f:
            self.assertEqual(json.load(f)["settings"]["classifier_scale"], 3.0)
        with self.assertRaisesRegex(run.ResumeError, r"cfg_scale: stored 2.0, now 1.0"):
            run.evaluate_nll(dict(o, cfg_scale=1.0))
        with self.assertRaisesRegex(run.ResumeError, r"classifier_workdir: stored .*, now None"):
            run.evaluate_nll(dict(o, classifier_workdir=None, classifier_scale=None))

    def test_bad_guidance_options(self):
        out = os.path.join(self.tmp, "bad", "nll.json")
        bad_size = os.path.join(self.tmp, "clf16")
        bad_classes = os.path.join(self.tmp, "clf3")
        _save(bad_size, "classifier", dict(CLASSIFIER, image_size=16))
        _save(bad_classes, "classifier", dict(CLASSIFIER, out_channels=3))
        cases = [
            (dict(workdir=self.plain_dir, cfg_scale=2.0), r"--cfg_scale needs .* null label, but .*plain has .*"
             r"null_label=False: drop --cfg_scale, or .*null_label=True"),
            (dict(classifier_scale=2.0), r"--classifier_scale=2.0 needs --classifier_workdir"),
            (dict(classifier_workdir=bad_size), r"classifier takes 16px images"),
            (dict(classifier_workdir=bad_classes), r"classifier has 3 classes but the model is conditioned on 10"),
        ]
        for kw, msg in cases:
            with self.assertRaisesRegex(ValueError, msg):
                run.evaluate_nll(_options(kw.pop("workdir", self.cond_dir), out, **kw))
        guide = nll_guidance.Guidance(1.0, None, None, None, None, None)
        with self.assertRaisesRegex(ValueError, r"'faces' split 'test' has no labels \(keys: \['image'\]\)"):
            nll_guidance.check_labels(guide, [{"image": np.zeros((8, 8, 1), np.uint8)}], "faces", "test")
        nll_guidance.check_labels(guide._replace(cfg_scale=None), [{"image": 0}], "faces", "test")  # unguided: fine
        self.assertFalse(os.path.exists(os.path.dirname(out)))  # nothing written

    def test_cli_classifier_scale_without_classifier(self):
        out = os.path.join(self.tmp, "cli", "nll.json")
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), f"--workdir={self.cond_dir}",
                               "--metric=nll", "--data=digits", "--classifier_scale=1", f"--out={out}"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        self.assertEqual(proc.returncode, 2, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        self.assertLen(lines, 1, proc.stderr)
        self.assertIn("--classifier_scale=1.0 needs --classifier_workdir", lines[0])
        self.assertFalse(os.path.exists(os.path.dirname(out)))


if __name__ == "__main__":
    absltest.main()
