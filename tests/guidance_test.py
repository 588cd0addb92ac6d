"""Guidance transforms: classifier-free guidance and the classifier gradient."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from diffusion_jax import guidance, sampling, schedules

jax.config.update("jax_disable_most_optimizations", True)  # tiny shapes: compile time dominates

NUM_CLASSES = 4  # labels 0..3, null label 4


def toy_model(x, t, y):
    """Class-dependent stand-in network [B,H,W,C] -> [B,H,W,2C]; records batch sizes."""
    toy_model.batches.append(x.shape[0])
    scale = 1.0 + 0.25 * jnp.asarray(y, jnp.float32).reshape((-1, 1, 1, 1))
    eps = jnp.tanh(x * scale + 1e-3 * jnp.asarray(t, jnp.float32).reshape((-1, 1, 1, 1)))
    var = jnp.sin(x + scale)
    return jnp.concatenate([eps, var], axis=-1)


toy_model.batches = []


def text_model(x, t, y):
    """GLIDE-like stand-in: labels {"tokens": [B, L], "mask": [B, L]}."""
    feat = jnp.sum(jnp.where(y["mask"], y["tokens"], 0), axis=1).astype(jnp.float32)
    eps = jnp.cos(x + 0.01 * feat.reshape((-1, 1, 1, 1)))
    return jnp.concatenate([eps, x * 0.5], axis=-1)


class ClassifierFreeTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.x = jax.random.normal(jax.random.key(0), (3, 4, 4, 3))
        self.t = jnp.array([0, 5, 9], jnp.int32)
        self.y = jnp.array([0, 3, 1], jnp.int32)
        self.null = jnp.full((3,), NUM_CLASSES, jnp.int32)

    def test_scale_one_is_conditional_and_zero_unconditional(self):
        cond = toy_model(self.x, self.t, self.y)
        uncond = toy_model(self.x, self.t, self.null)
        for scale, want in ((1.0, cond), (0.0, uncond)):
            got = jax.jit(guidance.classifier_free(toy_model, scale, null_label=NUM_CLASSES))(self.x, self.t, self.y)
            np.testing.assert_allclose(got[..., :3], want[..., :3], rtol=1e-6, atol=1e-6)
            # Learned-variance channels always come from the conditional pass.
            np.testing.assert_array_equal(got[..., 3:], cond[..., 3:])

    def test_mixes_eps_in_one_doubled_pass(self):
        toy_model.batches.clear()
        s = 3.0
        got = guidance.classifier_free(toy_model, s, null_label=NUM_CLASSES)(self.x, self.t, self.y)
        self.assertEqual(toy_model.batches, [6])  # one forward pass on 2B
        cond = np.asarray(toy_model(self.x, self.t, self.y), np.float64)
        uncond = np.asarray(toy_model(self.x, self.t, self.null), np.float64)
        want = uncond[..., :3] + s * (cond[..., :3] - uncond[..., :3])
        np.testing.assert_allclose(got[..., :3], want, rtol=1e-5, atol=1e-6)
        self.assertEqual(got.shape, (3, 4, 4, 6))

    def test_explicit_eps_channels_and_errors(self):
        got = guidance.classifier_free(toy_model, 2.0, null_label=NUM_CLASSES, eps_channels=1)(
            self.x, self.t, self.y)
        cond = toy_model(self.x, self.t, self.y)
        np.testing.assert_array_equal(got[..., 1:], cond[..., 1:])
        odd = lambda x, t, y: jnp.zeros(x.shape[:-1] + (5,))
        with self.assertRaisesRegex(ValueError, "eps_channels"):
            guidance.classifier_free(odd, 2.0, null_label=0)(self.x, self.t, self.y)
        with self.assertRaisesRegex(ValueError, "needs labels"):
            guidance.classifier_free(toy_model, 2.0, null_label=0)(self.x, self.t, None)

    def test_pytree_labels_glide_style(self):
        tokens = jnp.array([[5, 7, 9, 50256], [3, 50256, 50256, 50256]], jnp.int32)
        mask = tokens != 50256
        y = {"tokens": tokens, "mask": mask}
        empty = {"tokens": jnp.full((4,), 50256, jnp.int32), "mask": jnp.zeros((4,), bool)}
        x, t = self.x[:2], self.t[:2]
        got = jax.jit(guidance.classifier_free(text_model, 3.0, null_label=empty))(x, t, y)
        cond = text_model(x, t, y)
        uncond = text_model(x, t, guidance.null_labels(empty, 2))
        np.testing.assert_allclose(got[..., :3], uncond[..., :3] + 3.0 * (cond[..., :3] - uncond[..., :3]),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got[..., 3:], cond[..., 3:])

    def test_unconditional_helper_feeds_null_label(self):
        got = guidance.unconditional(toy_model, null_label=NUM_CLASSES)(self.x, self.t, None)
        np.testing.assert_array_equal(got, toy_model(self.x, self.t, self.null))

    def test_drop_labels(self):
        labels = jnp.arange(8) % NUM_CLASSES
        np.testing.assert_array_equal(guidance.drop_labels(jax.random.key(0), labels, 0.0, null_label=4), labels)
        np.testing.assert_array_equal(guidance.drop_labels(jax.random.key(0), labels, 1.0, null_label=4), 4)


def linear_classifier(w):
    """logits = flatten(x) @ w + 0.01 t; w: [H*W*C, K]."""
    def fn(x, t):
        return x.reshape((x.shape[0], -1)) @ w + 0.01 * jnp.asarray(t, jnp.float32)[:, None]
    return fn


class ClassifierGuidanceTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        k1, k2 = jax.random.split(jax.random.key(1))
        self.w = jax.random.normal(k1, (48, NUM_CLASSES)) * 0.3
        self.x = jax.random.normal(k2, (3, 4, 4, 3))
        self.t = jnp.array([1, 4, 7], jnp.int32)
        self.y = jnp.array([2, 0, 3], jnp.int32)

    def test_gradient_matches_float64_formula(self):
        scale = 2.5
        got = jax.jit(guidance.classifier_cond_fn(linear_classifier(self.w), scale))(self.x, self.t, self.y)
        w = np.asarray(self.w, np.float64)
        xf = np.asarray(self.x, np.float64).reshape(3, -1)
        logits = xf @ w + 0.01 * np.asarray(self.t, np.float64)[:, None]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        # d/dx log softmax(xW)[y] = W[:, y] - W p
        want = scale * (w[:, np.asarray(self.y)].T - p @ w.T)
        np.testing.assert_allclose(got.reshape(3, -1), want, rtol=1e-5, atol=1e-6)

    def test_scale_zero_is_unguided(self):
        s = schedules.make_schedule("linear", 100, "10")
        cond_fn = guidance.classifier_cond_fn(linear_classifier(self.w), 0.0)
        noise = jax.random.normal(jax.random.key(3), self.x.shape)
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "y": self.y}
        guided, _ = sampling.p_sample(s, toy_model, self.x, self.t, noise, cond_fn=cond_fn, **kw)
        plain, _ = sampling.p_sample(s, toy_model, self.x, self.t, noise, **kw)
        np.testing.assert_array_equal(guided, plain)
        # DDIM re-derives x0 from the (unshifted) eps: equal up to that round trip.
        guided, _ = sampling.ddim_sample(s, toy_model, self.x, self.t, noise, eta=0.5, cond_fn=cond_fn, **kw)
        plain, _ = sampling.ddim_sample(s, toy_model, self.x, self.t, noise, eta=0.5, **kw)
        np.testing.assert_allclose(guided, plain, rtol=1e-5, atol=1e-5)

    def test_guidance_raises_target_class_probability(self):
        s = schedules.make_schedule("linear", 100, "10")
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "y": self.y}
        clf = linear_classifier(self.w)
        logp = lambda x: jax.nn.log_softmax(clf(x, self.t))[jnp.arange(3), self.y]
        noise = jnp.zeros_like(self.x)
        plain, _ = sampling.p_sample(s, toy_model, self.x, self.t, noise, **kw)
        guided, _ = sampling.p_sample(s, toy_model, self.x, self.t, noise,
                                      cond_fn=guidance.classifier_cond_fn(clf, 50.0), **kw)
        self.assertTrue(np.all(logp(guided) > logp(plain)))

    @parameterized.parameters(False, True)
    def test_cfg_and_classifier_compose_in_loops(self, ddim):
        """CFG (scale 1) + classifier (scale 0) == the plain conditional loop."""
        s = schedules.make_schedule("linear", 100, "5")
        labels = jnp.array([1, 2], jnp.int32)

        @jax.jit
        def run(rng, cfg_scale, cls_scale):
            model_fn = guidance.classifier_free(toy_model, cfg_scale, null_label=NUM_CLASSES)
            cond_fn = guidance.classifier_cond_fn(linear_classifier(self.w), cls_scale)
            kw = {"mean_type": "epsilon", "var_type": "learned_range", "y": labels}
            loop = sampling.ddim_sample_loop if ddim else sampling.p_sample_loop
            guided = loop(rng, model_fn, s, (2, 4, 4, 3), cond_fn=cond_fn, **kw)
            plain = loop(rng, toy_model, s, (2, 4, 4, 3), **kw)
            return guided, plain

        guided, plain = run(jax.random.key(0), 1.0, 0.0)
        np.testing.assert_allclose(guided, plain, atol=1e-5)
        strong, _ = run(jax.random.key(0), 4.0, 5.0)
        self.assertTrue(np.all(np.isfinite(strong)))
        self.assertGreater(float(jnp.abs(strong - plain).max()), 1e-2)


if __name__ == "__main__":
    absltest.main()
