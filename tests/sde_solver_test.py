"""Stochastic solvers (DPM-Solver++(2M) SDE, EDM): deterministic twins and their orders, the marginal of
Gaussian data, per-sample randomness, parameterisations, guidance, the sampler table and its options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffusion_jax import guidance, sampling, schedules, sde_solver
from diffusion_jax.generation import samplers
from tests.dpm_solver_test import MU, SD, _float64_schedule, _lambda_uniform_base, cond_fn, gaussian_model, smooth_model

COSINE_ABAR = np.cumprod(1 - schedules.get_named_beta_schedule("cosine", 1000))
EPS = {"mean_type": "epsilon", "var_type": "fixed_small"}


def _run(name, rng, model, schedule, shape, **kw):
    loop = {"sde": sde_solver.dpmpp_2m_sde_sample_loop, "edm": sde_solver.edm_sample_loop}[name]
    return loop(rng, model, schedule, shape, **kw)


class DeterministicTwinTest(parameterized.TestCase):
    """eta = 0 is DPM-Solver++(2M); order 1 at eta = 1 is DDIM eta = 1 with the same draws."""

    def test_twins_with_guidance_and_clipping(self):
        s = schedules.make_schedule("cosine", 1000, "12")
        shape, y = (4, 4, 4, 3), jnp.array([0, 1, 2, 3])
        model = guidance.classifier_free(smooth_model, 2.0, null_label=5)
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "clip_denoised": True, "cond_fn": cond_fn, "y": y}

        @jax.jit
        def run(rng):
            return (sde_solver.dpmpp_2m_sde_sample_loop(rng, model, s, shape, eta=0.0, **kw),
                    sampling.dpm_solver_sample_loop(rng, model, s, shape, order=2, **kw),
                    sde_solver.dpmpp_2m_sde_sample_loop(rng, model, s, shape, order=1, **kw),
                    sampling.ddim_sample_loop(rng, model, s, shape, eta=1.0, **kw))

        sde0, dpm, sde1, ddim1 = run(jax.random.key(5))
        self.assertGreater(float(jnp.std(dpm)), 0.1)
        np.testing.assert_allclose(sde0, dpm, atol=2e-5)
        np.testing.assert_allclose(sde1, ddim1, atol=2e-5)
        self.assertGreater(float(jnp.abs(sde1 - dpm).max()), 0.1)  # the noise is really there


# ----------------------------------------------------------------------------- orders with the noise off
def _solve_error(name, num_steps, exact, **kw):
    """max |x_solver - x_ref| for 6 samples of N(MU, SD^2) data, float64, on the lambda-uniform grid.

    exact="ode": x_ref is the x0 prediction on the exact probability-flow
    trajectory at the grid's last level (`dpm_solver_test._solve_error`);
    exact="drift": the SDE's drift alone (eta = 1, no noise), in s = sigma /
    alpha and xhat = x / alpha dxhat/dlambda = 2 (D - xhat), whose solution for
    Gaussian data is xhat - MU proportional to SD^2 + s^2, so that its x0
    prediction D stays MU + SD^2 (xhat_T - MU) / (SD^2 + s_T^2) all the way.
    """
    betas, abar = _lambda_uniform_base()
    with jax.enable_x64(True):
        s = _float64_schedule(betas, num_steps)
        x_T = jnp.asarray(np.random.RandomState(0).randn(2, 3), jnp.float64)
        out = np.asarray(_run(name, jax.random.key(0), gaussian_model(jnp.asarray(abar), "epsilon"), s, x_T.shape,
                              x_T=x_T, mean_type="epsilon", var_type="fixed_large", **kw))
    tmap = np.asarray(s.timestep_map)
    a_T, a_0 = abar[tmap[-1]], abar[tmap[0]]
    if exact == "drift":
        xhat_T, s2_T = np.asarray(x_T) / np.sqrt(a_T), (1 - a_T) / a_T
        return np.abs(out - (MU + SD**2 * (xhat_T - MU) / (SD**2 + s2_T))).max()
    z = (np.asarray(x_T) - np.sqrt(a_T) * MU) / np.sqrt(a_T * SD**2 + 1 - a_T)
    return np.abs(out - (MU + np.sqrt(a_0) * SD**2 * z / np.sqrt(a_0 * SD**2 + 1 - a_0))).max()


class OrderTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("sde_eta0_midpoint", "sde", "ode", {"eta": 0.0}),
        ("sde_eta0_heun", "sde", "ode", {"eta": 0.0, "solver_type": "heun"}),
        ("edm_churn0", "edm", "ode", {"s_churn": 0.0}),
    )
    def test_observed_order_is_two(self, name, exact, kw):
        """Error ratio between K = 40 and K = 80 steps (h halves) is ~4 (measured: see the report)."""
        e1, e2 = (_solve_error(name, k, exact, **kw) for k in (40, 80))
        observed = np.log(e1 / e2) / np.log(79 / 39)
        self.assertLess(e2, 0.02)
        self.assertGreater(observed, 1.8, (e1, e2))
        self.assertLess(observed, 2.4, (e1, e2))

    @parameterized.parameters("midpoint", "heun")
    def test_drift_alone_is_exact_on_gaussian_data(self, solver_type):
        """With the noise off (eta = 1, s_noise = 0) the drift keeps D constant on Gaussian data (`_solve_error`),
        so the exponential integrator is exact at any K, second-order weight and all."""
        self.assertLess(_solve_error("sde", 7, "drift", s_noise=0.0, solver_type=solver_type), 1e-12)
        self.assertGreater(_solve_error("sde", 7, "drift", s_noise=0.0, eta=0.5), 1e-3)  # eta < 1: not exact


# ----------------------------------------------------------------------------- the marginal with the noise on
class MarginalTest(parameterized.TestCase):
    """Exact Gaussian denoiser: the samples' mean and variance are N(MU, SD^2)'s within 4 standard errors."""

    N = (20_000, 4)

    def _check(self, x, tol_sd=4.0):
        x = np.asarray(x, np.float64)
        se_mean, se_var = SD / np.sqrt(x.size), SD**2 * np.sqrt(2 / x.size)
        self.assertLess(abs(x.mean() - MU), tol_sd * se_mean, x.mean())
        self.assertLess(abs(x.var() - SD**2), tol_sd * se_var, x.var())

    def test_dpmpp_2m_sde(self):
        s = schedules.make_schedule("cosine", 1000, "logsnr100")
        model = gaussian_model(jnp.asarray(COSINE_ABAR, jnp.float32), "epsilon")
        run = lambda s_noise: jax.jit(lambda rng: sde_solver.dpmpp_2m_sde_sample_loop(
            rng, model, s, self.N, s_noise=s_noise, **EPS))(jax.random.key(0))
        self._check(run(1.0))
        self.assertLess(float(jnp.var(run(0.0))), 0.01)  # the drift alone: posterior means

    def test_edm(self):
        # An unrespaced grid: every churned level is a model level (no interpolation between grid levels).
        abar = np.cumprod(1 - schedules.get_named_beta_schedule("cosine", 200))
        s = schedules.make_schedule("cosine", 200, "")
        model = gaussian_model(jnp.asarray(abar, jnp.float32), "epsilon")
        churned, *_ = sde_solver.edm_levels(s, s_churn=80.0, s_tmin=0.05, s_tmax=50.0)
        self.assertGreater(int(churned.sum()), 100)
        x = jax.jit(lambda rng: sde_solver.edm_sample_loop(rng, model, s, self.N, s_noise=1.0, **EPS))(
            jax.random.key(0))
        self._check(x)


# ----------------------------------------------------------------------------- loop conventions
class ConventionsTest(parameterized.TestCase):

    @parameterized.parameters("sde", "edm")
    def test_sample_is_a_function_of_seed_and_index(self, name):
        s = schedules.make_schedule("linear", 100, "6")
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "clip_denoised": True}
        run = jax.jit(lambda rng, ids: _run(name, rng, smooth_model, s, (ids.shape[0], 4, 4, 3), sample_ids=ids,
                                            return_trajectory=True, **kw))
        full = run(jax.random.key(3), jnp.arange(5))
        part = run(jax.random.key(3), jnp.array([4, 1]))
        np.testing.assert_allclose(part.sample, full.sample[jnp.array([4, 1])], atol=1e-6)
        self.assertGreater(float(jnp.abs(full.sample[0] - full.sample[1]).max()), 0.1)
        self.assertEqual(full.samples.shape, (6, 5, 4, 4, 3))
        np.testing.assert_array_equal(full.samples[-1], full.sample)

    @parameterized.parameters(("sde", "cosine", 1000, "20", {}), ("edm", "cosine", 50, "", {}))
    def test_eps_x0_v_models_give_the_same_samples(self, name, sched, steps, respacing, kw):
        abar = np.cumprod(1 - schedules.get_named_beta_schedule(sched, steps))
        s = schedules.make_schedule(sched, steps, respacing)
        outs = {m: jax.jit(lambda rng, m=m: _run(name, rng, gaussian_model(jnp.asarray(abar, jnp.float32), m), s,
                                                 (4, 8), mean_type=m, var_type="fixed_small", **kw))(jax.random.key(1))
                for m in ("epsilon", "start_x", "v")}
        self.assertGreater(float(jnp.std(outs["epsilon"])), 0.3)
        np.testing.assert_allclose(outs["start_x"], outs["epsilon"], atol=2e-4)
        np.testing.assert_allclose(outs["v"], outs["epsilon"], atol=2e-4)

    @parameterized.parameters("sde", "edm")
    def test_guidance(self, name):
        s = schedules.make_schedule("linear", 100, "5")
        shape, y = (3, 4, 4, 3), jnp.array([0, 1, 2])
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "clip_denoised": True, "y": y}
        run = lambda rng, model, **more: _run(name, rng, model, s, shape, **kw, **more)

        @jax.jit
        def all_runs(rng):  # one compile
            return (run(rng, smooth_model), run(rng, lambda x, t, y: smooth_model(x, t, jnp.full_like(y, 5))),
                    run(rng, guidance.classifier_free(smooth_model, 3.0, null_label=5), cond_fn=cond_fn),
                    run(rng, guidance.classifier_free(smooth_model, 0.0, null_label=5)),
                    run(rng, smooth_model, cond_fn=lambda x, t, y: 0.0 * cond_fn(x, t, y)))

        plain, null, guided, cfg0, cond0 = all_runs(jax.random.key(2))
        self.assertTrue(np.all(np.isfinite(guided)))
        self.assertGreater(float(jnp.abs(guided - plain).max()), 1e-2)
        np.testing.assert_allclose(cfg0, null, atol=1e-5)
        np.testing.assert_allclose(cond0, plain, atol=1e-5)  # eps -> x0 -> eps roundings

    def test_network_sees_grid_timesteps_or_churned_ones(self):
        s = schedules.make_schedule("linear", 1000, "10,7", rescale_timesteps=True)
        abar = jnp.asarray(np.cumprod(1 - schedules.get_named_beta_schedule("linear", 1000)), jnp.float32)
        seen = []

        def model(x, timesteps, y):
            jax.debug.callback(lambda ts: seen.append(np.asarray(ts)[0]), timesteps)
            return gaussian_model(abar, "epsilon")(x, jnp.round(timesteps * 1.0).astype(jnp.int32), y)

        grid = np.asarray(s.model_timesteps(jnp.arange(s.num_timesteps)))[::-1]
        jax.block_until_ready(sde_solver.dpmpp_2m_sde_sample_loop(jax.random.key(0), model, s, (2, 3), **EPS))
        np.testing.assert_array_equal(seen, grid)
        seen.clear()
        jax.block_until_ready(sde_solver.edm_sample_loop(jax.random.key(0), model, s, (2, 3), s_churn=0.0, **EPS))
        # Heun (a second call at the next level) except on the first and the last step.
        calls = lambda first: [first[0]] + [t for k in range(1, len(grid) - 1) for t in (first[k], grid[k + 1])] + [
            first[-1]]
        np.testing.assert_array_equal(seen, calls(grid))
        seen.clear()
        jax.block_until_ready(sde_solver.edm_sample_loop(jax.random.key(0), model, s, (2, 3), **EPS))
        churned, _, model_t, *_ = sde_solver.edm_levels(s, s_churn=80.0, s_tmin=0.05, s_tmax=50.0)
        churned, model_t = np.asarray(churned), np.asarray(model_t)
        self.assertTrue(churned.any())
        np.testing.assert_allclose(seen, calls(model_t), rtol=1e-6)
        self.assertTrue(np.all(model_t[churned] > grid[churned]))  # churned up to a (rounded) model timestep
        np.testing.assert_array_equal(model_t[~churned], grid[~churned])


# ----------------------------------------------------------------------------- the sampler table and its options
class TableTest(parameterized.TestCase):

    def test_names_and_options_reach_the_loops(self):
        s = schedules.make_schedule("linear", 100, "6")
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "clip_denoised": True}
        rng, shape = jax.random.key(0), (2, 4, 4, 3)
        for name, loop, opts in (("dpm++2m-sde", sde_solver.dpmpp_2m_sde_sample_loop, {"eta": 0.5}),
                                 ("edm", sde_solver.edm_sample_loop, {"s_churn": 10.0, "s_noise": 1.0})):
            self.assertIs(sampling.named_sampler(name).func, loop)
            self.assertEqual(sampling.named_sampler(name, **opts).keywords, opts)
            choice = samplers.choose(name, sampler_options=",".join(f"{k}={v}" for k, v in opts.items()))
            self.assertTrue(choice.clip_denoised)
            self.assertEqual(samplers.make_loop(choice).keywords, {"clip_denoised": True, **opts})
        self.assertEqual(samplers.choose("dpm++2m-sde", sampler_options="solver_type=heun").options,
                         (("solver_type", "heun"),))
        got = jax.jit(lambda rng: samplers.make_loop(choice)(rng, smooth_model, s, shape, mean_type="epsilon",
                                                             var_type="learned_range"))(rng)
        want = jax.jit(lambda rng: sde_solver.edm_sample_loop(rng, smooth_model, s, shape, **opts, **kw))(rng)
        np.testing.assert_array_equal(got, want)

    def test_bad_options_are_refused_in_one_line(self):
        with pytest.raises(ValueError, match="sampler 'edm' has no option 'eta'; it takes s_churn, s_tmin"):
            sampling.named_sampler("edm", eta=1.0)
        with pytest.raises(ValueError, match="'ddim' has no option 's_churn'; it takes none"):
            sampling.named_sampler("ddim", s_churn=1.0)
        with pytest.raises(ValueError, match="^--sampler_options: sampler 'dpm\\+\\+2m-sde' has no option 's_churn'"):
            samplers.choose("dpm++2m-sde", sampler_options="s_churn=3")
        with pytest.raises(ValueError, match="s_tmin <= s_tmax"):
            samplers.choose("edm", sampler_options="s_tmin=2,s_tmax=1")
        with pytest.raises(ValueError, match="solver_type 'rk4'; use 'midpoint' or 'heun'"):
            samplers.choose("dpm++2m-sde", sampler_options="solver_type=rk4")
        with pytest.raises(ValueError, match="'s_churn' is not name=value"):
            samplers.choose("edm", sampler_options="s_churn")
        with pytest.raises(ValueError, match="s_churn='x' is not a number"):
            samplers.choose("edm", sampler_options="s_churn=x")
        with pytest.raises(ValueError, match="not mean_type='previous_x'"):
            sde_solver.edm_sample_loop(jax.random.key(0), smooth_model, schedules.make_schedule("linear", 100, "4"),
                                       (1, 2), mean_type="previous_x", var_type="fixed_small")
