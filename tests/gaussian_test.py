"""q/p functions against OpenAI's outputs, plus Monte Carlo properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffusion_jax import gaussian, schedules
from tests import parity

MEANS = {"EPSILON": "epsilon", "START_X": "start_x", "PREVIOUS_X": "previous_x"}
VARS = {"FIXED_SMALL": "fixed_small", "FIXED_LARGE": "fixed_large", "LEARNED": "learned",
        "LEARNED_RANGE": "learned_range"}
RTOL, ATOL = 1e-5, 1e-6
# Under jax.jit, XLA:CPU contracts a*x - b into one fused multiply-add.  That
# is more exact, but where the subtraction cancels (t = 0, where
# sqrt(1/abar - 1) ~ 0.01) it moves results by a few 1e-6 from PyTorch's
# separately rounded ops.  Op-by-op (eager) evaluation is checked at the
# strict tolerance; the jitted path at JIT_ATOL.
JIT_ATOL = 1e-5


def _schedule(case):
    return schedules.make_schedule(**parity.CASES[case])


def _close(got, want, what, atol=ATOL):
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol, err_msg=what)




class QFunctionsParityTest(parameterized.TestCase):

    @parameterized.product(case=list(parity.CASES), jit=[False, True])
    def test_q_functions(self, case, jit):
        wrap = jax.jit if jit else (lambda f: f)
        atol = JIT_ATOL if jit else ATOL
        ref = parity.load("q_functions.npz")
        s = _schedule(case)
        get = lambda k: parity.nhwc(ref[f"{case}/{k}"])
        x0, noise, mo = get("inputs/x_start"), get("inputs/noise"), get("inputs/model_output")
        t = ref[f"{case}/inputs/t"].astype(np.int32)
        x_t = wrap(gaussian.q_sample)(s, x0, t, noise)
        _close(x_t, get("q_sample"), "q_sample", atol)
        q = wrap(gaussian.q_mean_variance)(s, x0, t)
        _close(q.mean, get("q_mean_variance/mean"), "q mean", atol)
        _close(q.variance, get("q_mean_variance/variance"), "q var", atol)
        _close(q.log_variance, get("q_mean_variance/log_variance"), "q logvar", atol)
        post = wrap(gaussian.q_posterior)(s, x0, get("q_sample"), t)
        _close(post.mean, get("q_posterior/mean"), "posterior mean", atol)
        _close(post.variance, get("q_posterior/variance"), "posterior var", atol)
        _close(post.log_variance, get("q_posterior/log_variance_clipped"), "posterior logvar", atol)
        eps = mo[..., :3]
        _close(wrap(gaussian.predict_xstart_from_eps)(s, get("q_sample"), t, eps),
               get("predict_xstart_from_eps"), "xstart_from_eps", atol)
        _close(wrap(gaussian.predict_eps_from_xstart)(s, get("q_sample"), t, x0),
               get("predict_eps_from_xstart"), "eps_from_xstart", atol)
        _close(wrap(gaussian.predict_xstart_from_xprev)(s, get("q_sample"), t, eps),
               get("predict_xstart_from_xprev"), "xstart_from_xprev", atol)


def _pmv_cases():
    return [(c, m, v, clip) for c in parity.CASES for m in MEANS for v in VARS for clip in (True, False)]


class PMeanVarianceParityTest(parameterized.TestCase):

    @parameterized.parameters(*_pmv_cases())
    def test_p_mean_variance(self, case, m, v, clip):
        for jit in (False, True):
            self._check(case, m, v, clip, jit)

    def _check(self, case, m, v, clip, jit):
        ref = parity.load("p_mean_variance.npz")
        s = _schedule(case)
        x_t = parity.nhwc(ref[f"{case}/inputs/x_t"])
        t = ref[f"{case}/inputs/t"].astype(np.int32)
        mo = parity.nhwc(ref[f"{case}/inputs/model_output"])
        if VARS[v] not in gaussian.LEARNED_VAR_TYPES:
            mo = mo[..., :3]
        fn = gaussian.p_mean_variance
        if jit:
            fn = jax.jit(fn, static_argnames=("mean_type", "var_type", "clip_denoised"))
        out = fn(s, mo, x_t, t, mean_type=MEANS[m], var_type=VARS[v], clip_denoised=clip)
        prefix = f"{case}/{m}/{v}/clip_{str(clip).lower()}"
        for field in out._fields:
            want = parity.nhwc(ref[f"{prefix}/{field}"])
            # Unclipped pred_xstart reaches ~6e4 at t = K-1: compare relatively.
            _close(out._asdict()[field], want, f"{prefix}/{field} jit={jit}", JIT_ATOL if jit else ATOL)


class GaussianPropertiesTest(parameterized.TestCase):

    def test_q_posterior_is_bayes_rule_by_monte_carlo(self):
        # Sample x_{t-1} ~ q(x_{t-1}|x_0), then x_t ~ q(x_t|x_{t-1}); among the
        # draws, E[x_{t-1} | x_t] is linear in x_t with the posterior coefficients.
        s = schedules.make_schedule("linear", 100)
        t = 40
        n = 400_000
        k1, k2 = jax.random.split(jax.random.key(0))
        x0 = 0.3
        abar_prev = float(s.alphas_cumprod_prev[t])
        beta = float(s.betas[t])
        x_prev = np.sqrt(abar_prev) * x0 + np.sqrt(1 - abar_prev) * np.asarray(jax.random.normal(k1, (n,)))
        x_t = np.sqrt(1 - beta) * x_prev + np.sqrt(beta) * np.asarray(jax.random.normal(k2, (n,)))
        # Regress x_prev on x_t: slope and intercept give coef2 and coef1 * x0.
        slope, intercept = np.polyfit(x_t, x_prev, 1)
        resid_var = np.var(x_prev - (slope * x_t + intercept))
        np.testing.assert_allclose(slope, float(s.posterior_mean_coef2[t]), rtol=1e-2)
        np.testing.assert_allclose(intercept, float(s.posterior_mean_coef1[t]) * x0, atol=3e-3)
        np.testing.assert_allclose(resid_var, float(s.posterior_variance[t]), rtol=1e-2)
        post = gaussian.q_posterior(s, jnp.full((1, 1), x0), jnp.full((1, 1), 0.7), jnp.array([t]))
        np.testing.assert_allclose(float(post.mean[0, 0]), slope * 0.7 + intercept, atol=5e-3)

    def test_eps_xstart_round_trip(self):
        s = schedules.make_schedule("cosine", 200)
        x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
        eps = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
        t = jnp.array([0, 10, 100, 199])
        x0 = gaussian.predict_xstart_from_eps(s, x, t, eps)
        np.testing.assert_allclose(gaussian.predict_eps_from_xstart(s, x, t, x0), eps, rtol=2e-3, atol=2e-3)

    def test_bad_names_and_shapes(self):
        s = schedules.make_schedule("linear", 100)
        x = jnp.zeros((2, 4, 4, 3))
        t = jnp.array([0, 1])
        with pytest.raises(ValueError, match="unknown mean_type 'eps'.*epsilon, start_x, previous_x"):
            gaussian.p_mean_variance(s, x, x, t, mean_type="eps", var_type="fixed_small")
        with pytest.raises(ValueError, match="unknown var_type 'small'.*fixed_small"):
            gaussian.p_mean_variance(s, x, x, t, mean_type="epsilon", var_type="small")
        with pytest.raises(ValueError, match="needs 6 output channels"):
            gaussian.p_mean_variance(s, x, x, t, mean_type="epsilon", var_type="learned_range")
        with pytest.raises(ValueError, match="needs 3 output channels"):
            gaussian.p_mean_variance(s, jnp.zeros((2, 4, 4, 6)), x, t, mean_type="epsilon", var_type="fixed_large")
        with pytest.raises(ValueError, match="must match"):
            gaussian.q_sample(s, x, t, jnp.zeros((2, 4, 4, 1)))


class VPredictionTest(parameterized.TestCase):
    """mean_type="v" (Salimans & Ho 2022) against float64 NumPy formulas."""

    def _inputs(self):
        s = schedules.make_schedule("cosine", 200, "50")
        abar = np.cumprod(1 - schedules.respace_betas(schedules.get_named_beta_schedule("cosine", 200),
                                                      schedules.space_timesteps(200, "50"))[0])
        k = jax.random.split(jax.random.key(5), 3)
        x0 = np.asarray(jnp.clip(jax.random.normal(k[0], (4, 4, 4, 3)), -1, 1), np.float64)
        noise = np.asarray(jax.random.normal(k[1], x0.shape), np.float64)
        v = np.asarray(jax.random.normal(k[2], x0.shape), np.float64)
        t = np.array([0, 7, 30, 49], np.int32)
        a = abar[t].reshape(-1, 1, 1, 1)
        return s, abar, x0, noise, v, t, a

    def test_conversions(self):
        s, _, x0, noise, v, t, a = self._inputs()
        x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
        f32 = lambda z: jnp.asarray(z, jnp.float32)
        v_true = np.sqrt(a) * noise - np.sqrt(1 - a) * x0
        np.testing.assert_allclose(gaussian.predict_v(s, f32(x0), t, f32(noise)), v_true, atol=2e-6)
        np.testing.assert_allclose(gaussian.predict_xstart_from_v(s, f32(x_t), t, f32(v_true)), x0, atol=2e-6)
        np.testing.assert_allclose(gaussian.predict_eps_from_v(s, f32(x_t), t, f32(v_true)), noise, atol=2e-6)
        np.testing.assert_allclose(gaussian.predict_xstart_from_v(s, f32(x_t), t, f32(v)),
                                   np.sqrt(a) * x_t - np.sqrt(1 - a) * v, atol=2e-6)

    @parameterized.product(var_type=["fixed_small", "learned_range"], clip=[True, False])
    def test_p_mean_variance(self, var_type, clip):
        s, abar, x0, noise, v, t, a = self._inputs()
        x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
        out = v if var_type == "fixed_small" else np.concatenate([v, np.tanh(v)], axis=-1)
        got = jax.jit(lambda o, x: gaussian.p_mean_variance(s, o, x, jnp.asarray(t), mean_type="v",
                                                            var_type=var_type, clip_denoised=clip))(
            jnp.asarray(out, jnp.float32), jnp.asarray(x_t, jnp.float32))
        pred = np.sqrt(a) * x_t - np.sqrt(1 - a) * v
        pred = np.clip(pred, -1, 1) if clip else pred
        abar_prev = np.append(1.0, abar[:-1])[t].reshape(-1, 1, 1, 1)
        beta = 1 - a / abar_prev
        mean = (beta * np.sqrt(abar_prev) * pred + (1 - abar_prev) * np.sqrt(1 - beta) * x_t) / (1 - a)
        np.testing.assert_allclose(got.pred_xstart, pred, atol=1e-5)
        np.testing.assert_allclose(got.mean, mean, atol=1e-5)
        eps_model = gaussian.p_mean_variance(
            s, jnp.asarray(np.concatenate([noise, np.tanh(v)], -1)[..., :out.shape[-1]], jnp.float32),
            jnp.asarray(x_t, jnp.float32), jnp.asarray(t), mean_type="epsilon", var_type=var_type, clip_denoised=clip)
        v_model = gaussian.p_mean_variance(
            s, jnp.asarray(np.concatenate([np.sqrt(a) * noise - np.sqrt(1 - a) * x0, np.tanh(v)], -1)[
                ..., :out.shape[-1]], jnp.float32),
            jnp.asarray(x_t, jnp.float32), jnp.asarray(t), mean_type="v", var_type=var_type, clip_denoised=clip)
        # The same prediction in both parameterisations.  eps -> x0 scales float32
        # rounding by 1 / sqrt(abar) (~1e3 at t = 49, the last example), v -> x0
        # does not, so the comparison leaves that example out.
        for a_, b_ in zip(eps_model, v_model):
            np.testing.assert_allclose(a_[:3], b_[:3], atol=3e-5, rtol=1e-5)
