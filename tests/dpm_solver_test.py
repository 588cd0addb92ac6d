"""DPM-Solver(++): order 1 is DDIM, every solver converges with its order to the
exact probability-flow endpoint of Gaussian data, parameterisations agree,
plans, loop conventions and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffusion_jax import dpm_solver, guidance, sampling, schedules

MU, SD = 0.3, 0.5  # the Gaussian data N(MU, SD^2) of the analytic model
ALGORITHMS = ("dpmsolver", "dpmsolver++")
METHODS = ("multistep", "singlestep")


def gaussian_model(abar_table, mean_type, mu=MU, sd=SD):
    """The exact model of N(mu, sd^2) data, indexed by the network's timestep.

    eps*(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar sd^2 + 1 - abar);
    x0* and v* follow from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
    """
    def model(x, timesteps, y):
        abar = abar_table[timesteps].reshape((-1,) + (1,) * (x.ndim - 1))
        alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1 - abar)
        eps = sigma * (x - alpha * mu) / (abar * sd**2 + 1 - abar)
        x0 = mu + alpha * sd**2 * (x - alpha * mu) / (abar * sd**2 + 1 - abar)
        return {"epsilon": eps, "start_x": x0, "v": alpha * eps - sigma * x0}[mean_type]

    return model


def smooth_model(x, timesteps, y):
    """A nonlinear stand-in network with learned-variance channels: [B,H,W,C] -> [B,H,W,2C]."""
    t = jnp.asarray(timesteps, jnp.float32).reshape((-1, 1, 1, 1))
    shift = 0.0 if y is None else 0.1 * jnp.asarray(y, jnp.float32).reshape((-1, 1, 1, 1))
    eps = jnp.tanh(0.7 * x + 0.3 * jnp.roll(x, 1, axis=1) + 1e-3 * t + shift)
    return jnp.concatenate([eps, jnp.tanh(x)], axis=-1)


def cond_fn(x, timesteps, y):
    return 0.2 * jnp.sin(x) + 1e-4 * jnp.asarray(timesteps, jnp.float32).reshape((-1, 1, 1, 1))


class Order1IsDDIMTest(parameterized.TestCase):
    """K respaced steps of order 1 reproduce DDIM (eta = 0) on the same grid and draws."""

    @parameterized.product(algorithm=ALGORITHMS, method=METHODS, clip=[True, False])
    def test_order1_equals_ddim(self, algorithm, method, clip):
        s = schedules.make_schedule("cosine", 1000, "25")
        shape = (4, 4, 4, 3)
        y = jnp.array([0, 1, 2, 3])
        guided = guidance.classifier_free(smooth_model, 2.0, null_label=5)
        # Unclipped x0 of the stand-in blows up by 1/sqrt(abar) on cosine; the
        # analytic model keeps it meaningful.
        model = guided if clip else gaussian_model(jnp.asarray(np.cumprod(1 - schedules.get_named_beta_schedule(
            "cosine", 1000)), jnp.float32), "epsilon")
        var_type = "learned_range" if clip else "fixed_small"
        kw = {"mean_type": "epsilon", "var_type": var_type, "clip_denoised": clip, "y": y,
              "cond_fn": cond_fn if clip else None, "return_trajectory": True}

        @jax.jit
        def run(rng):
            ddim = sampling.ddim_sample_loop(rng, model, s, shape, eta=0.0, **kw)
            dpm = sampling.dpm_solver_sample_loop(rng, model, s, shape, order=1, method=method,
                                                  algorithm=algorithm, **kw)
            return ddim, dpm

        ddim, dpm = run(jax.random.key(7))
        scale = float(jnp.abs(ddim.samples).max())
        self.assertGreater(float(jnp.std(ddim.sample)), 0.1)
        np.testing.assert_allclose(dpm.samples, ddim.samples, rtol=1e-5, atol=2e-6 * scale)
        np.testing.assert_allclose(dpm.pred_xstart, ddim.pred_xstart, rtol=1e-5, atol=2e-6 * scale)


# ----------------------------------------------------------------------------- convergence order
LAM_HI, LAM_LO, BASE_STEPS = 6.0, -5.0, 20_000


def _lambda_uniform_base():
    """A fine base schedule whose log-SNR lambda = log(alpha / sigma) is linear in the index.

    Respacing it to K steps (OpenAI's even spacing) gives a grid uniform in
    lambda up to 1/20000 of the range, so step sizes shrink like 1/K
    everywhere.  (OpenAI's cosine schedule respaced evenly does not: near
    abar -> 0 its lambda steps are ~log((k+1)/k), independent of K, and the
    last beta is clipped to 0.999 -- no asymptotic order is observable there.)
    """
    lam = np.linspace(LAM_HI, LAM_LO, BASE_STEPS)
    abar = 1 / (1 + np.exp(-2 * lam))  # abar / (1 - abar) = e^(2 lambda)
    betas = 1 - abar / np.append(1.0, abar[:-1])
    return betas, abar


def _float64_schedule(betas, num_steps):
    """`make_schedule`'s respacing with float64 tables (call under jax.enable_x64)."""
    new_betas, tmap = schedules.respace_betas(betas, schedules.space_timesteps(len(betas), str(num_steps)))
    tables = {k: jnp.asarray(v) for k, v in schedules.schedule_tables(new_betas).items()}
    return schedules.Schedule(**tables, timestep_map=jnp.asarray(tmap, jnp.int32), original_num_steps=len(betas))


def _solve_error(algorithm, method, order, num_steps, mean_type="epsilon"):
    """max |x_solver - x_ref| for 6 samples, float64; and |x_ref - exact ODE endpoint|.

    The exact probability-flow ODE of N(mu, sd^2) data maps x_T to
    x(abar) = sqrt(abar) mu + sqrt(abar sd^2 + 1 - abar) z with
    z = (x_T - sqrt(abar_T) mu) / sqrt(abar_T sd^2 + 1 - abar_T); its endpoint
    (abar = 1) is mu + sd z.  Every solver's last step is the x0 prediction at
    the grid's last level abar_0, a step that does not shrink with K; x_ref is
    that prediction evaluated on the exact trajectory, mu + sqrt(abar_0) sd^2 z
    / sqrt(abar_0 sd^2 + 1 - abar_0), and differs from the endpoint by
    O(1 - abar_0) ~ 1e-5 here.
    """
    betas, abar = _lambda_uniform_base()
    with jax.enable_x64(True):
        s = _float64_schedule(betas, num_steps)
        x_T = jnp.asarray(np.random.RandomState(0).randn(2, 3), jnp.float64)
        model = gaussian_model(jnp.asarray(abar), mean_type)
        out = dpm_solver.dpm_solver_sample_loop(jax.random.key(0), model, s, x_T.shape, order=order, method=method,
                                                algorithm=algorithm, mean_type=mean_type, var_type="fixed_large",
                                                x_T=x_T)
        out = np.asarray(out)
    tmap = np.asarray(s.timestep_map)
    a_T, a_0 = abar[tmap[-1]], abar[tmap[0]]
    z = (np.asarray(x_T) - np.sqrt(a_T) * MU) / np.sqrt(a_T * SD**2 + 1 - a_T)
    ref = MU + np.sqrt(a_0) * SD**2 * z / np.sqrt(a_0 * SD**2 + 1 - a_0)
    return np.abs(out - ref).max(), np.abs(ref - (MU + SD * z)).max()


class ConvergenceOrderTest(parameterized.TestCase):

    @parameterized.product(algorithm=ALGORITHMS, method=METHODS, order=[1, 2, 3])
    def test_observed_order(self, algorithm, method, order):
        """Error ratio between K = 86 and K = 170 steps (h halves) is 2^order.

        K - 2 divisible by 6 gives every singlestep split the same group
        structure at both K.  Measured (float64): orders 0.99, 1.97-2.03 and
        2.93-3.42, and 4.7 for noise-prediction 3M.
        """
        (e1, floor), (e2, _) = (_solve_error(algorithm, method, order, k) for k in (86, 170))
        observed = np.log(e1 / e2) / np.log(169 / 85)
        self.assertLess(floor, 2e-5)
        self.assertLess(e2, 0.02)
        self.assertGreater(observed, order - 0.2, (e1, e2))
        if order < 3:  # third order may converge faster (noise-prediction 3M does).
            self.assertLess(observed, order + 0.3, (e1, e2))


class ParameterisationTest(parameterized.TestCase):

    @parameterized.parameters(("dpmsolver++", "multistep", 2), ("dpmsolver", "singlestep", 3),
                              ("dpmsolver++", "singlestep", 2), ("dpmsolver", "multistep", 3))
    def test_eps_x0_v_models_give_the_same_samples(self, algorithm, method, order):
        abar = np.cumprod(1 - schedules.get_named_beta_schedule("cosine", 1000))
        s = schedules.make_schedule("cosine", 1000, "20")
        outs = {}
        for mean_type in ("epsilon", "start_x", "v"):
            model = gaussian_model(jnp.asarray(abar, jnp.float32), mean_type)
            outs[mean_type] = jax.jit(lambda rng, model=model, m=mean_type: sampling.dpm_solver_sample_loop(
                rng, model, s, (4, 8), order=order, method=method, algorithm=algorithm, mean_type=m,
                var_type="fixed_small"))(jax.random.key(1))
        self.assertGreater(float(jnp.std(outs["epsilon"])), 0.3)
        np.testing.assert_allclose(outs["start_x"], outs["epsilon"], atol=2e-4)
        np.testing.assert_allclose(outs["v"], outs["epsilon"], atol=2e-4)


# ----------------------------------------------------------------------------- plans and loop conventions
class PlanTest(parameterized.TestCase):

    def test_multistep_warm_up_and_lower_order_final(self):
        self.assertEqual(dpm_solver.multistep_orders(10, 3), [1, 2, 3, 3, 3, 3, 3, 3, 2, 1])
        self.assertEqual(dpm_solver.multistep_orders(20, 3), [1, 2] + [3] * 17 + [1])
        self.assertEqual(dpm_solver.multistep_orders(3, 2), [1, 2, 1])
        self.assertEqual(dpm_solver.multistep_orders(1, 3), [1])

    @parameterized.product(order=[1, 2, 3], num_steps=[1, 2, 3, 4, 5, 6, 7, 10, 25])
    def test_singlestep_groups_cover_the_grid(self, order, num_steps):
        groups = dpm_solver.singlestep_groups(num_steps, order)
        self.assertEqual(sum(groups), num_steps)
        self.assertEqual(groups[-1], 1)
        self.assertEqual(groups[0], 1)
        self.assertLessEqual(max(groups), order)
        plan = dpm_solver.make_plan(num_steps, order=order, method="singlestep")
        self.assertTrue(plan.ends_group[-1])
        self.assertEqual(int(plan.ends_group.sum()), len(groups))
        # Every step uses only outputs still in the 3-slot history, anchor first.
        k = np.arange(num_steps)
        self.assertTrue(np.all((k[:, None] - plan.nodes >= 0) & (k[:, None] - plan.nodes <= 2)))
        self.assertTrue(np.all(plan.nodes[:, 0] == plan.anchor))

    def test_singlestep_groups_examples(self):
        self.assertEqual(dpm_solver.singlestep_groups(8, 2), [1, 2, 2, 2, 1])
        self.assertEqual(dpm_solver.singlestep_groups(9, 2), [1, 2, 2, 2, 1, 1])
        self.assertEqual(dpm_solver.singlestep_groups(8, 3), [1, 3, 3, 1])
        self.assertEqual(dpm_solver.singlestep_groups(10, 3), [1, 3, 3, 2, 1])
        self.assertEqual(dpm_solver.singlestep_groups(9, 3), [1, 3, 2, 2, 1])  # not 3 + 3 + 1

    @parameterized.product(algorithm=ALGORITHMS, method=METHODS, order=[1, 2, 3])
    def test_model_sees_each_grid_timestep_once(self, algorithm, method, order):
        s = schedules.make_schedule("linear", 1000, "10,7", rescale_timesteps=True)
        seen = []
        record = lambda ts: seen.append(np.asarray(ts).copy())

        def model(x, timesteps, y):
            jax.debug.callback(record, timesteps)
            return gaussian_model(jnp.asarray(np.cumprod(1 - schedules.get_named_beta_schedule("linear", 1000)),
                                              jnp.float32), "epsilon")(x, jnp.asarray(timesteps * 1.0, jnp.int32), y)

        out = sampling.dpm_solver_sample_loop(jax.random.key(0), model, s, (2, 3), order=order, method=method,
                                              algorithm=algorithm, mean_type="epsilon", var_type="fixed_small")
        jax.block_until_ready(out)
        want = np.asarray(s.model_timesteps(jnp.arange(s.num_timesteps)))[::-1]
        np.testing.assert_array_equal(np.stack(seen)[:, 0], want)
        self.assertTrue(np.all(np.isfinite(out)))


class LoopConventionsTest(parameterized.TestCase):

    def test_sample_is_a_function_of_seed_and_index(self):
        s = schedules.make_schedule("linear", 100, "8")
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "clip_denoised": True, "order": 3}
        run = jax.jit(lambda rng, ids: sampling.dpm_solver_sample_loop(rng, smooth_model, s, (ids.shape[0], 4, 4, 3),
                                                                      sample_ids=ids, **kw))
        full = run(jax.random.key(3), jnp.arange(6))
        part = run(jax.random.key(3), jnp.array([4, 1]))
        np.testing.assert_allclose(part, full[jnp.array([4, 1])], atol=1e-6)
        keys = sampling.sample_keys(jax.random.key(3), jnp.arange(6))
        x_T = sampling.initial_noise(keys, (6, 4, 4, 3))
        given = sampling.dpm_solver_sample_loop(jax.random.key(99), smooth_model, s, x_T.shape, x_T=x_T, **kw)
        # Eager vs jitted: XLA may contract a*x + b into an FMA (see sampling_test JIT_ATOL).
        np.testing.assert_allclose(given, full, atol=1e-5)
        traj = sampling.dpm_solver_sample_loop(jax.random.key(3), smooth_model, s, (6, 4, 4, 3),
                                               return_trajectory=True, progress=True, **kw)
        self.assertEqual(traj.samples.shape, (8, 6, 4, 4, 3))
        np.testing.assert_array_equal(traj.sample, traj.samples[-1])
        np.testing.assert_allclose(traj.sample, full, atol=1e-5)

    def test_named_samplers(self):
        s = schedules.make_schedule("linear", 100, "6")
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "clip_denoised": True}
        rng = jax.random.key(0)
        ddim = sampling.named_sampler("ddim")(rng, smooth_model, s, (2, 4, 4, 3), **kw)
        np.testing.assert_array_equal(ddim, sampling.ddim_sample_loop(rng, smooth_model, s, (2, 4, 4, 3), **kw))
        for name, opts in {"dpm++2m": (2, "multistep", "dpmsolver++"), "dpm++3m": (3, "multistep", "dpmsolver++"),
                           "dpm2s": (2, "singlestep", "dpmsolver")}.items():
            got = sampling.named_sampler(name)(rng, smooth_model, s, (2, 4, 4, 3), **kw)
            order, method, algorithm = opts
            want = sampling.dpm_solver_sample_loop(rng, smooth_model, s, (2, 4, 4, 3), order=order, method=method,
                                                   algorithm=algorithm, **kw)
            np.testing.assert_array_equal(got, want)
        self.assertEqual(set(sampling.SAMPLER_NAMES), {"ancestral", "ddim", "dpm++2m", "dpm++3m", "dpm2s",
                                                       "dpm++2m-sde", "edm"})
        with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+2s'.*ancestral, ddim"):
            sampling.named_sampler("dpm++2s")

    def test_bad_options_name_the_fix(self):
        s = schedules.make_schedule("linear", 100, "6")
        run = lambda **kw: sampling.dpm_solver_sample_loop(
            jax.random.key(0), smooth_model, s, (2, 4, 4, 3), **{"mean_type": "epsilon",
                                                                  "var_type": "learned_range", **kw})
        with pytest.raises(ValueError, match="order must be 1, 2 or 3, got 4"):
            run(order=4)
        with pytest.raises(ValueError, match="method 'adaptive'; use 'multistep' or 'singlestep'"):
            run(method="adaptive")
        with pytest.raises(ValueError, match="algorithm 'dpm\\+\\+'; use 'dpmsolver\\+\\+'"):
            run(algorithm="dpm++")
        with pytest.raises(ValueError, match="not mean_type='previous_x'.*p_sample_loop or ddim_sample_loop"):
            run(mean_type="previous_x")
        with pytest.raises(ValueError, match="unknown mean_type 'eps'"):
            run(mean_type="eps")
        with pytest.raises(ValueError, match="sample_ids"):
            run(sample_ids=jnp.arange(3))
