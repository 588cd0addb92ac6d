"""Training losses against OpenAI's outputs; timestep samplers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffusion_jax import gaussian, objectives, schedules
from tests import parity
from tests.likelihood_test import _decoder_nll_bpd_float64

MEANS = {"EPSILON": "epsilon", "START_X": "start_x", "PREVIOUS_X": "previous_x"}
VARS = {"FIXED_SMALL": "fixed_small", "FIXED_LARGE": "fixed_large", "LEARNED": "learned",
        "LEARNED_RANGE": "learned_range"}
LOSSES = {"MSE": "mse", "RESCALED_MSE": "rescaled_mse", "KL": "kl", "RESCALED_KL": "rescaled_kl"}
LOSS_CONFIGS = [("EPSILON", "LEARNED_RANGE", "MSE"), ("EPSILON", "LEARNED_RANGE", "RESCALED_MSE"),
                ("EPSILON", "LEARNED_RANGE", "KL"), ("EPSILON", "LEARNED_RANGE", "RESCALED_KL"),
                ("EPSILON", "LEARNED", "RESCALED_MSE"), ("START_X", "FIXED_LARGE", "MSE"),
                ("PREVIOUS_X", "FIXED_SMALL", "MSE"), ("START_X", "LEARNED_RANGE", "RESCALED_KL")]


class TrainingLossesParityTest(parameterized.TestCase):

    @parameterized.product(case=list(parity.CASES), config=LOSS_CONFIGS)
    def test_training_losses(self, case, config):
        m, v, lt = config
        ref = parity.load("losses.npz")
        s = schedules.make_schedule(**parity.CASES[case])
        get = lambda k: parity.nhwc(ref[f"{case}/inputs/{k}"])
        t = ref[f"{case}/inputs/t"].astype(np.int32)
        mo = get("model_output")
        if VARS[v] not in ("learned", "learned_range"):
            mo = mo[..., :3]
        terms = objectives.training_losses(s, mo, get("x_start"), get("x_t"), t, get("noise"), mean_type=MEANS[m],
                                           var_type=VARS[v], loss_type=LOSSES[lt])
        prefix = f"{case}/training_losses/{m}/{v}/{lt}"
        for field in ("loss", "mse", "vb"):
            key = f"{prefix}/{field}"
            if key in ref:
                got, want = np.asarray(getattr(terms, field)), ref[key]
                kl = t != 0
                np.testing.assert_allclose(got[kl], want[kl], rtol=1e-5, atol=1e-6, err_msg=key)
                # t = 0 holds the decoder NLL, whose float32 value in OpenAI's run
                # is off its float64 maths (likelihood_test.DECODER_RTOL); check
                # it against the float64 maths instead.
                if (~kl).any() and field in ("loss", "vb") and VARS[v] == "learned_range":
                    p = gaussian.p_mean_variance(s, mo, get("x_t"), t, mean_type=MEANS[m], var_type=VARS[v],
                                                 clip_denoised=False)
                    truth = _decoder_nll_bpd_float64(get("x_start"), p.mean, p.log_variance)
                    vb_truth = truth * objectives.vb_weight(LOSSES[lt], s.num_timesteps)
                    if field == "loss" and lt in ("MSE", "RESCALED_MSE"):
                        vb_truth = vb_truth + np.asarray(terms.mse)
                    np.testing.assert_allclose(got[~kl], vb_truth[~kl], rtol=2e-6, err_msg=key)
            elif field != "loss" and lt in ("MSE", "RESCALED_MSE"):
                np.testing.assert_array_equal(getattr(terms, field), 0.0)


class TrainingLossesPropertiesTest(parameterized.TestCase):

    def _inputs(self, c=3):
        k = jax.random.split(jax.random.key(0), 4)
        x0 = jnp.clip(jax.random.normal(k[0], (4, 8, 8, c)), -1, 1)
        noise = jax.random.normal(k[1], x0.shape)
        mo = jax.random.normal(k[2], (4, 8, 8, 2 * c)) * 0.5
        t = jnp.array([0, 3, 17, 49], jnp.int32)
        return x0, noise, mo, t

    @parameterized.parameters("mse", "rescaled_mse")
    def test_vb_sends_no_gradient_into_mean_channels(self, loss_type):
        s = schedules.make_schedule("cosine", 50)
        x0, noise, mo, t = self._inputs()
        from diffusion_jax import gaussian
        x_t = gaussian.q_sample(s, x0, t, noise)

        def vb_sum(out):
            return jnp.sum(objectives.training_losses(s, out, x0, x_t, t, noise, mean_type="epsilon",
                                                      var_type="learned_range", loss_type=loss_type).vb)

        g = jax.grad(vb_sum)(mo)
        np.testing.assert_array_equal(g[..., :3], 0.0)
        self.assertGreater(float(jnp.abs(g[..., 3:]).sum()), 0.0)

    def test_lambda_mapping(self):
        self.assertAlmostEqual(objectives.hybrid_lambda("rescaled_mse", 4000), 1e-3)
        self.assertAlmostEqual(objectives.hybrid_lambda("mse", 4000), 1 / 4000)
        self.assertAlmostEqual(objectives.hybrid_lambda("rescaled_kl", 50), 1.0)
        s = schedules.make_schedule("cosine", 50)
        x0, noise, mo, t = self._inputs()
        from diffusion_jax import gaussian
        x_t = gaussian.q_sample(s, x0, t, noise)
        kw = dict(mean_type="epsilon", var_type="learned_range")
        base = objectives.training_losses(s, mo, x0, x_t, t, noise, loss_type="mse", **kw)
        resc = objectives.training_losses(s, mo, x0, x_t, t, noise, loss_type="rescaled_mse", **kw)
        explicit = objectives.training_losses(s, mo, x0, x_t, t, noise, loss_type="mse", vb_scale=50 / 1000, **kw)
        np.testing.assert_allclose(resc.vb, base.vb * 50 / 1000, rtol=1e-6)
        np.testing.assert_allclose(explicit.loss, resc.loss, rtol=1e-6)

    def test_bad_loss_type(self):
        s = schedules.make_schedule("cosine", 50)
        x0, noise, mo, t = self._inputs()
        with pytest.raises(ValueError, match="unknown loss_type 'l2'.*mse, rescaled_mse, kl, rescaled_kl"):
            objectives.training_losses(s, mo, x0, x0, t, noise, mean_type="epsilon", var_type="learned_range",
                                       loss_type="l2")


def _openai_update(hist, counts, ts, losses, h):
    """OpenAI's LossSecondMomentResampler.update_with_all_losses, in NumPy."""
    hist, counts = hist.copy(), counts.copy()
    for t, loss in zip(ts, losses):
        if counts[t] == h:
            hist[t, :-1] = hist[t, 1:]
            hist[t, -1] = loss
        else:
            hist[t, counts[t]] = loss
            counts[t] += 1
    return hist, counts


class TimestepSamplerTest(parameterized.TestCase):

    def test_update_matches_openai_loop_with_repeats(self):
        sampler = objectives.LossSecondMomentSampler(num_timesteps=5, history_per_term=3)
        state = sampler.init()
        hist, counts = np.zeros((5, 3), np.float32), np.zeros(5, np.int64)
        rng = np.random.RandomState(0)
        update = jax.jit(sampler.update)
        for _ in range(8):
            ts = rng.randint(0, 5, size=6)  # repeats inside a batch on purpose
            losses = rng.rand(6).astype(np.float32)
            state = update(state, jnp.asarray(ts), jnp.asarray(losses))
            hist, counts = _openai_update(hist, counts, ts, losses, 3)
            np.testing.assert_array_equal(state.loss_history, hist)
            np.testing.assert_array_equal(state.loss_counts, counts)

    def test_uniform_until_warm_then_second_moment(self):
        sampler = objectives.LossSecondMomentSampler(num_timesteps=4, history_per_term=2)
        state = sampler.init()
        np.testing.assert_array_equal(sampler.weights(state), 1.0)
        state = sampler.update(state, jnp.array([0, 0, 1, 1, 2, 2, 3]), jnp.array([1., 1., 2., 2., 3., 3., 4.]))
        np.testing.assert_array_equal(sampler.weights(state), 1.0)  # t = 3 has one loss only
        state = sampler.update(state, jnp.array([3]), jnp.array([4.0]))
        w = np.asarray(sampler.weights(state))
        want = np.array([1., 2., 3., 4.]) / 10 * 0.999 + 0.001 / 4
        np.testing.assert_allclose(w, want, rtol=1e-6)

    def test_importance_weights_make_estimator_unbiased(self):
        # A known per-t loss table; E_t~p[w(t) L(t)] must equal mean_t L(t).
        k = 50
        loss_table = jnp.linspace(0.1, 5.0, k) ** 2
        sampler = objectives.LossSecondMomentSampler(num_timesteps=k)
        state = sampler.init()
        ts = jnp.repeat(jnp.arange(k), 10)
        state = sampler.update(state, ts, loss_table[ts] * (1 + 0.1 * jnp.sin(ts.astype(jnp.float32))))
        self.assertTrue(bool(sampler.warmed_up(state)))
        p = sampler.weights(state) / jnp.sum(sampler.weights(state))
        # Exact expectation under p:
        t_all = jnp.arange(k)
        w_all = 1.0 / (k * p[t_all])
        np.testing.assert_allclose(float(jnp.sum(p * w_all * loss_table)), float(jnp.mean(loss_table)), rtol=1e-5)
        # And a Monte Carlo check of the sampler's own draws.
        t, w = jax.jit(sampler.sample, static_argnums=2)(state, jax.random.key(0), 200_000)
        est = float(jnp.mean(w * loss_table[t]))
        np.testing.assert_allclose(est, float(jnp.mean(loss_table)), rtol=1e-2)
        # Importance sampling must favour large losses.
        self.assertGreater(float(p[-1]), float(p[0]) * 5)

    def test_uniform_sampler(self):
        sampler = objectives.make_timestep_sampler("uniform", 10)
        t, w = sampler.sample(sampler.init(), jax.random.key(3), 10_000)
        np.testing.assert_array_equal(w, 1.0)
        counts = np.bincount(np.asarray(t), minlength=10)
        self.assertTrue((counts > 800).all())
        with pytest.raises(ValueError, match="unknown schedule sampler 'lsm'"):
            objectives.make_timestep_sampler("lsm", 10)


class VAndMinSnrTest(parameterized.TestCase):
    """v-prediction loss and min-SNR-gamma weights against float64 NumPy formulas."""

    def _setup(self, c=3):
        s = schedules.make_schedule("cosine", 100, "40")
        abar = np.cumprod(1 - schedules.respace_betas(schedules.get_named_beta_schedule("cosine", 100),
                                                      schedules.space_timesteps(100, "40"))[0])
        k = jax.random.split(jax.random.key(2), 3)
        x0 = jnp.clip(jax.random.normal(k[0], (4, 4, 4, c)), -1, 1)
        noise = jax.random.normal(k[1], x0.shape)
        mo = 0.5 * jax.random.normal(k[2], (4, 4, 4, 2 * c))
        t = jnp.array([0, 5, 21, 39], jnp.int32)
        x_t = gaussian.q_sample(s, x0, t, noise)
        return s, abar, x0, noise, mo, t, x_t

    def test_min_snr_weight_formulas(self):
        snr = np.exp(np.random.RandomState(0).uniform(-12, 12, size=64))
        for gamma in (0.5, 5.0, 40.0):
            clamp = np.minimum(snr, gamma)
            want = {"epsilon": clamp / snr, "start_x": clamp, "v": clamp / (snr + 1)}
            for mean_type, w in want.items():
                got = objectives.min_snr_weight(jnp.asarray(snr, jnp.float32), gamma, mean_type)
                np.testing.assert_allclose(got, w, rtol=2e-6)
        np.testing.assert_array_equal(objectives.min_snr_weight(jnp.asarray(snr, jnp.float32), 0.0, "v"), 1.0)

    @parameterized.product(mean_type=["epsilon", "start_x", "v"], gamma=[0.0, 5.0])
    def test_weighted_mse_and_unweighted_vb(self, mean_type, gamma):
        s, abar, x0, noise, mo, t, x_t = self._setup()
        kw = dict(mean_type=mean_type, var_type="learned_range", loss_type="rescaled_mse")
        got = objectives.training_losses(s, mo, x0, x_t, t, noise, snr_gamma=gamma, **kw)
        plain = objectives.training_losses(s, mo, x0, x_t, t, noise, **kw)
        a = abar[np.asarray(t)].reshape(-1, 1, 1, 1)
        x0_, n_ = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
        target = {"epsilon": n_, "start_x": x0_, "v": np.sqrt(a) * n_ - np.sqrt(1 - a) * x0_}[mean_type]
        mse = np.mean((target - np.asarray(mo[..., :3], np.float64)) ** 2, axis=(1, 2, 3))
        snr = abar[np.asarray(t)] / (1 - abar[np.asarray(t)])
        clamp = np.minimum(snr, gamma)
        w = 1.0 if gamma == 0 else {"epsilon": clamp / snr, "start_x": clamp, "v": clamp / (snr + 1)}[mean_type]
        np.testing.assert_allclose(got.mse, w * mse, rtol=1e-5)
        np.testing.assert_allclose(got.vb, plain.vb, rtol=1e-6)  # the VLB term is not reweighted
        np.testing.assert_allclose(got.loss, got.mse + got.vb, rtol=1e-6)
        np.testing.assert_allclose(objectives.snr(s, t), snr, rtol=1e-5)

    def test_v_vb_term_uses_detached_mean_and_matches_eps(self):
        s, abar, x0, noise, mo, t, x_t = self._setup()

        def vb_sum(out):
            return jnp.sum(objectives.training_losses(s, out, x0, x_t, t, noise, mean_type="v",
                                                      var_type="learned_range", loss_type="rescaled_mse").vb)

        g = jax.grad(vb_sum)(mo)
        np.testing.assert_array_equal(g[..., :3], 0.0)
        self.assertGreater(float(jnp.abs(g[..., 3:]).sum()), 0.0)
        # The same prediction as eps and as v gives the same vb term.
        a = jnp.asarray(abar[np.asarray(t)].reshape(-1, 1, 1, 1), jnp.float32)
        eps_hat = mo[..., :3]
        x0_hat = (x_t - jnp.sqrt(1 - a) * eps_hat) / jnp.sqrt(a)
        v_out = jnp.concatenate([jnp.sqrt(a) * eps_hat - jnp.sqrt(1 - a) * x0_hat, mo[..., 3:]], -1)
        kw = dict(var_type="learned_range", loss_type="rescaled_kl")
        vb_eps = objectives.training_losses(s, mo, x0, x_t, t, noise, mean_type="epsilon", **kw).vb
        vb_v = objectives.training_losses(s, v_out, x0, x_t, t, noise, mean_type="v", **kw).vb
        np.testing.assert_allclose(vb_v[1:], vb_eps[1:], rtol=2e-3)

    def test_bad_snr_gamma(self):
        s, _, x0, noise, mo, t, x_t = self._setup()
        kw = dict(var_type="learned_range", loss_type="mse")
        with pytest.raises(ValueError, match="snr_gamma must be >= 0.*0 turns min-SNR weighting off"):
            objectives.training_losses(s, mo, x0, x_t, t, noise, mean_type="epsilon", snr_gamma=-1.0, **kw)
        with pytest.raises(ValueError, match="not 'previous_x'; set snr_gamma=0"):
            objectives.training_losses(s, mo, x0, x_t, t, noise, mean_type="previous_x", snr_gamma=5.0, **kw)
        with pytest.raises(ValueError, match="snr_gamma must be >= 0"):
            objectives.min_snr_weight(jnp.ones(3), -0.1, "v")
