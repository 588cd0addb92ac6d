"""KLs, the discretized decoder and calc_bpd_loop terms against OpenAI's outputs."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from diffusion_jax import gaussian, likelihood, schedules
from tests import parity

RTOL, ATOL = 1e-5, 1e-6
# The decoder NLL (t = 0) of OpenAI's float32 run is off its own float64 maths
# by up to 1.5e-4 relative (tanh-form cancellation in the tail bins); ours
# matches the float64 maths to ~1e-7 (checked in `test_decoder_against_float64`).
DECODER_RTOL = 2e-4


def _assert_vb_close(got, want, t, what=""):
    got, want, t = np.asarray(got), np.asarray(want), np.asarray(t)
    kl = t != 0
    np.testing.assert_allclose(got[kl], want[kl], rtol=RTOL, atol=ATOL, err_msg=what)
    np.testing.assert_allclose(got[~kl], want[~kl], rtol=DECODER_RTOL, err_msg=what)


def _decoder_nll_bpd_float64(x, mean, log_variance):
    """OpenAI's decoder NLL in float64 NumPy (tanh CDF form), bits/dim [B]."""
    x, mean, log_scales = (np.asarray(a, np.float64) for a in (x, mean, 0.5 * np.asarray(log_variance)))
    cdf = lambda z: 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))
    inv = np.exp(-log_scales)
    cdf_plus = cdf(inv * (x - mean + 1 / 255))
    cdf_min = cdf(inv * (x - mean - 1 / 255))
    logp = np.where(x < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                    np.where(x > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)),
                             np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
    return -logp.mean(axis=(1, 2, 3)) / np.log(2.0)


class MathParityTest(parameterized.TestCase):

    def test_normal_kl(self):
        ref = parity.load("math.npz")
        args = [ref[f"normal_kl/{k}"].astype(np.float32) for k in ("mean1", "logvar1", "mean2", "logvar2")]
        np.testing.assert_allclose(likelihood.normal_kl(*args), ref["normal_kl/out_float32"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(jax.jit(likelihood.normal_kl)(*args), ref["normal_kl/out_float32"],
                                   rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(likelihood.normal_kl(args[0], args[1], 0.0, 0.0),
                                   ref["normal_kl/out_vs_standard_float32"], rtol=RTOL, atol=ATOL)

    def test_approx_standard_normal_cdf(self):
        ref = parity.load("math.npz")
        x = ref["approx_standard_normal_cdf/x"].astype(np.float32)
        for fn in (likelihood.approx_standard_normal_cdf, jax.jit(likelihood.approx_standard_normal_cdf)):
            np.testing.assert_allclose(fn(x), ref["approx_standard_normal_cdf/out_float32"], rtol=RTOL, atol=ATOL)

    def test_discretized_gaussian_log_likelihood(self):
        ref = parity.load("math.npz")
        x, means, log_scales = (ref[f"discretized_gaussian_log_likelihood/{k}"].astype(np.float32)
                                for k in ("x", "means", "log_scales"))
        want32 = ref["discretized_gaussian_log_likelihood/out_float32"]
        want64 = ref["discretized_gaussian_log_likelihood/out_float64"]
        # A bin mass is a difference of two CDF values; OpenAI's float32 tanh
        # form cancels in the tails (its float32 run is up to 9 nats off its
        # float64 run there).  Ours is cancellation-free: it must match the
        # float64 reference to float32 precision everywhere, and OpenAI's
        # float32 output wherever that one resolves the bin (p > 1e-3).
        for fn in (likelihood.discretized_gaussian_log_likelihood,
                   jax.jit(likelihood.discretized_gaussian_log_likelihood)):
            got = np.asarray(fn(x, means, log_scales), np.float64)
            np.testing.assert_allclose(got, want64, rtol=1e-5, atol=1e-4)
            well_resolved = np.exp(want64) > 1e-3
            self.assertGreater(well_resolved.sum(), 100)
            np.testing.assert_allclose(got[well_resolved], want32[well_resolved], rtol=RTOL, atol=ATOL)


class VbTermsParityTest(parameterized.TestCase):

    @parameterized.product(case=list(parity.CASES), clip=[True, False])
    def test_vb_terms_bpd(self, case, clip):
        ref = parity.load("losses.npz")
        s = schedules.make_schedule(**parity.CASES[case])
        get = lambda k: parity.nhwc(ref[f"{case}/inputs/{k}"])
        t = ref[f"{case}/inputs/t"].astype(np.int32)
        out, pred = likelihood.vb_terms_bpd(s, get("model_output"), get("x_start"), get("x_t"), t,
                                            mean_type="epsilon", var_type="learned_range", clip_denoised=clip)
        tag = f"{case}/vb_terms_bpd/clip_{str(clip).lower()}"
        _assert_vb_close(out, ref[f"{tag}/output"], t, tag)
        np.testing.assert_allclose(pred, parity.nhwc(ref[f"{tag}/pred_xstart"]), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(likelihood.prior_bpd(s, get("x_start")), ref[f"{case}/prior_bpd"],
                                   rtol=RTOL, atol=ATOL)

    def test_calc_bpd_loop_terms(self):
        ref = parity.load("losses.npz")
        case = "calc_bpd_linear1000_r20"
        s = schedules.make_schedule("linear", 1000, "20")
        x0 = parity.nhwc(ref[f"{case}/inputs/x_start"])
        mo = parity.nhwc(ref[f"{case}/inputs/model_output"])
        noise = parity.nhwc(ref[f"{case}/inputs/noise"])
        order = ref[f"{case}/inputs/timesteps_in_loop_order"]
        np.testing.assert_array_equal(np.asarray(s.model_timesteps(order)), ref[f"{case}/inputs/model_timesteps"][:, 0])

        # Evaluate every t at once (column k is t = K-1-k), as the fast runner will.
        def one(t_scalar, n):
            t = jnp.full((x0.shape[0],), t_scalar, jnp.int32)
            x_t = gaussian.q_sample(s, x0, t, n)
            return likelihood.bpd_terms(s, mo, x0, x_t, t, n, mean_type="epsilon", var_type="learned_range")

        terms = jax.jit(jax.vmap(one))(jnp.asarray(order, jnp.int32), noise)
        t_cols = np.broadcast_to(order, (x0.shape[0], len(order)))
        _assert_vb_close(terms.vb.T, ref[f"{case}/vb"], t_cols, "vb")
        for field in ("xstart_mse", "mse"):
            np.testing.assert_allclose(getattr(terms, field).T, ref[f"{case}/{field}"], rtol=RTOL, atol=1e-5,
                                       err_msg=field)
        prior = likelihood.prior_bpd(s, x0)
        np.testing.assert_allclose(prior, ref[f"{case}/prior_bpd"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(likelihood.total_bpd(terms.vb.T, prior), ref[f"{case}/total_bpd"],
                                   rtol=DECODER_RTOL)

    @parameterized.product(case=list(parity.CASES), clip=[True, False])
    def test_decoder_against_float64(self, case, clip):
        ref = parity.load("losses.npz")
        s = schedules.make_schedule(**parity.CASES[case])
        get = lambda k: parity.nhwc(ref[f"{case}/inputs/{k}"])
        t = np.zeros(6, np.int32)
        x0, x_t, mo = get("x_start"), get("x_t"), get("model_output")
        out, _ = likelihood.vb_terms_bpd(s, mo, x0, x_t, t, mean_type="epsilon", var_type="learned_range",
                                         clip_denoised=clip)
        p = gaussian.p_mean_variance(s, mo, x_t, t, mean_type="epsilon", var_type="learned_range",
                                     clip_denoised=clip)
        np.testing.assert_allclose(out, _decoder_nll_bpd_float64(x0, p.mean, p.log_variance), rtol=2e-6)


class LikelihoodPropertiesTest(parameterized.TestCase):

    def test_kl_of_identical_gaussians_is_zero(self):
        m = jax.random.normal(jax.random.key(0), (64,))
        lv = jax.random.normal(jax.random.key(1), (64,))
        np.testing.assert_allclose(likelihood.normal_kl(m, lv, m, lv), 0.0, atol=1e-7)
        self.assertTrue(bool(jnp.all(likelihood.normal_kl(m, lv, m + 0.1, lv) > 0)))

    @parameterized.parameters((0.0, -1.0), (0.3, -3.0), (-0.97, -2.0), (0.999, -6.0), (0.2, 1.0))
    def test_decoder_bins_sum_to_one(self, mean, log_scale):
        x = (jnp.arange(256, dtype=jnp.float32) / 127.5) - 1.0
        logp = likelihood.discretized_gaussian_log_likelihood(x, jnp.full_like(x, mean), jnp.full_like(x, log_scale))
        np.testing.assert_allclose(float(jnp.sum(jnp.exp(logp))), 1.0, rtol=1e-5)

    def test_cdf_matches_erf_closely(self):
        # The tanh approximation is what OpenAI uses; it is within 2e-4 of Phi.
        x = jnp.linspace(-6, 6, 1001)
        exact = jax.scipy.stats.norm.cdf(x)
        np.testing.assert_allclose(likelihood.approx_standard_normal_cdf(x), exact, atol=2e-4)
