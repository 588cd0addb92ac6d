"""Probability-flow ODE likelihood: exact on a Gaussian, solvers agree, Hutchinson unbiased, per-example."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import tiny
from diffusion_jax import convert, ode_solvers, schedules
from diffusion_jax import ode_likelihood as ode
from diffusion_jax.evaluation import ode_run, run

jax.config.update("jax_disable_most_optimizations", True)

K = 10
MU = np.array([0.3, -0.5, 0.1])
A = np.array([[0.5, 0.0, 0.0], [0.3, 0.4, 0.0], [-0.2, 0.25, 0.3]])
SIGMA = A @ A.T + 0.05 * np.eye(3)  # correlated: the Jacobian of eps_hat is not diagonal
TIGHT = ode.SolverOptions("dopri5", rtol=1e-6, atol=1e-6)


def _log_abar_knots(schedule) -> np.ndarray:
    return np.cumsum(np.log1p(-np.asarray(schedule.betas, np.float64)))


def gaussian_model(fs):
    """The exact eps_hat of data N(MU, SIGMA): x_s ~ N(sqrt(abar) MU, C), C = abar SIGMA + (1 - abar) I,
    E[eps | x_s] = sigma C^{-1} (x_s - sqrt(abar) MU).  Inputs [N, 1, 1, 3]; float timesteps in index units.
    abar(s) is the module's interpolant (checked against scipy in `test_log_alpha_bar_is_scipys_pchip`)."""
    mu, cov = jnp.asarray(MU, jnp.float32), jnp.asarray(SIGMA, jnp.float32)

    def model_fn(x, t, y):
        del y
        log_abar, _ = ode.log_alpha_bar(fs, t / fs.time_scale)  # [N]

        def one(xi, la):
            abar = jnp.exp(la)
            c = abar * cov + (1.0 - abar) * jnp.eye(3)
            return jnp.sqrt(1.0 - abar) * jnp.linalg.solve(c, xi.reshape(3) - jnp.sqrt(abar) * mu)

        return jax.vmap(one)(x, log_abar).reshape(x.shape)

    return model_fn


def marginal_logpdf(x: np.ndarray, log_abar: float) -> np.ndarray:
    """float64 log N(x; sqrt(abar) MU, abar SIGMA + (1 - abar) I), x [B, 3]."""
    abar = math.exp(log_abar)
    c = abar * SIGMA + (1.0 - abar) * np.eye(3)
    r = x - math.sqrt(abar) * MU
    _, logdet = np.linalg.slogdet(c)
    return -0.5 * np.einsum("bi,ij,bj->b", r, np.linalg.inv(c), r) - 0.5 * (logdet + 3 * math.log(2 * math.pi))


class GaussianFlowTest(parameterized.TestCase):
    """A model whose probability flow maps the exact marginal at s = 0 to the exact marginal at K-1."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.schedule = schedules.make_schedule("cosine", K)
        cls.fs = ode.flow_schedule(cls.schedule)
        cls.knots = _log_abar_knots(cls.schedule)
        cls.model_fn = staticmethod(gaussian_model(cls.fs))
        rng = np.random.default_rng(0)
        abar0 = math.exp(cls.knots[0])
        cov0 = abar0 * SIGMA + (1 - abar0) * np.eye(3)
        cls.x = (math.sqrt(abar0) * MU + rng.standard_normal((48, 3)) @ np.linalg.cholesky(cov0).T)
        cls.truth = marginal_logpdf(cls.x, cls.knots[0])
        end = cls.knots[-1]
        cls.prior = staticmethod(lambda z: jnp.asarray(marginal_logpdf_jnp(z.reshape(3), end)))

    def _ll(self, x, num_probes, options, rng=jax.random.key(0), index=None):
        index = np.arange(x.shape[0]) if index is None else index
        _, probe_rngs = ode.example_keys(rng, jnp.asarray(index, jnp.int32))
        fn = jax.jit(lambda xx, keys: ode.log_likelihood(
            self.model_fn, self.fs, xx, None, keys, mean_type="epsilon", var_type="fixed_small",
            num_probes=num_probes, options=options, prior_logp=self.prior))
        return fn(jnp.asarray(x, jnp.float32).reshape(-1, 1, 1, 3), probe_rngs)

    def test_exact_divergence_is_the_true_log_density(self):
        got = self._ll(self.x[:8], 0, TIGHT)
        self.assertTrue(np.all(got.success))
        np.testing.assert_allclose(got.log_likelihood, self.truth[:8], atol=2e-3)  # global error ~ tol * NFE
        self.assertTrue(np.all(got.nfe > 8), got.nfe)  # adaptive: 2 + 6 per step

    def test_hutchinson_within_its_standard_error(self):
        got = self._ll(self.x, 1, ode.SolverOptions("dopri5", rtol=1e-5, atol=1e-5))
        d = np.asarray(got.log_likelihood, np.float64) - self.truth
        self.assertGreater(np.std(d), 1e-3)  # the estimator is really noisy here (non-diagonal Jacobian)
        self.assertLess(abs(d.mean()), 3.0 * np.std(d, ddof=1) / math.sqrt(len(d)) + 2e-3, d)

    def test_rk4_agrees_with_dopri5(self):
        rk4 = self._ll(self.x[:4], 0, ode.SolverOptions("rk4", num_steps=40))
        self.assertEqual(int(rk4.nfe[0]), 160)
        np.testing.assert_allclose(rk4.log_likelihood, self.truth[:4], atol=2e-3)
        np.testing.assert_allclose(rk4.delta_logp, self._ll(self.x[:4], 0, TIGHT).delta_logp, atol=2e-3)

    def test_example_alone_equals_example_in_batch(self):
        options = ode.SolverOptions("dopri5", rtol=1e-4, atol=1e-4)
        batch = self._ll(self.x[:5], 1, options, index=np.array([7, 3, 11, 5, 2]))
        alone = self._ll(self.x[2:3], 1, options, index=np.array([11]))
        np.testing.assert_allclose(alone.log_likelihood[0], batch.log_likelihood[2], rtol=1e-5, atol=1e-5)
        self.assertEqual(int(alone.nfe[0]), int(batch.nfe[2]))

    def test_dequantized_bits_per_dim_is_per_example(self):
        v = np.random.default_rng(1).integers(0, 256, (4, 1, 1, 3))
        x = jnp.asarray(v / 127.5 - 1.0, jnp.float32)
        fn = jax.jit(lambda xx, idx: ode.data_bits_per_dim(
            self.model_fn, self.fs, xx, None, idx, jax.random.key(5), mean_type="epsilon", var_type="fixed_small",
            num_probes=1, options=ode.SolverOptions("rk4", num_steps=8)))
        bpd, ll = fn(x, jnp.arange(4, dtype=jnp.int32))
        bpd1, _ = fn(x[3:], jnp.array([3], jnp.int32))
        np.testing.assert_allclose(bpd1[0], bpd[3], rtol=1e-6)
        np.testing.assert_allclose(bpd, -np.asarray(ll.log_likelihood) / (3 * math.log(2)) + 7.0, rtol=1e-6)


def marginal_logpdf_jnp(z, log_abar: float):
    """marginal_logpdf for one example inside jit (the test's exact prior at s = K-1)."""
    abar = math.exp(log_abar)
    c = abar * SIGMA + (1.0 - abar) * np.eye(3)
    r = z - jnp.asarray(math.sqrt(abar) * MU, jnp.float32)
    _, logdet = np.linalg.slogdet(c)
    return -0.5 * r @ jnp.asarray(np.linalg.inv(c), jnp.float32) @ r - 0.5 * (logdet + 3 * math.log(2 * math.pi))


class PiecesTest(parameterized.TestCase):

    def test_hutchinson_mean_is_the_trace(self):
        w = jax.random.normal(jax.random.key(0), (4, 4))
        f = lambda x: jnp.tanh(w @ x) + 0.3 * x[::-1] ** 2
        x = jnp.array([0.2, -0.4, 0.7, 0.1])
        jac = np.asarray(jax.jacfwd(f)(x), np.float64)
        probes = ode.make_probes(jax.random.key(1), (4,), 4000)
        fx, est = jax.jit(lambda p: ode.drift_and_divergence(f, x, p, exact=False))(probes)
        quads = np.einsum("pi,ij,pj->p", np.asarray(probes, np.float64), jac, np.asarray(probes, np.float64))
        se = quads.std(ddof=1) / math.sqrt(len(quads))
        self.assertGreater(se, 1e-3)
        self.assertLess(abs(float(est) - np.trace(jac)), 4 * se)
        np.testing.assert_allclose(est, quads.mean(), rtol=1e-5)
        np.testing.assert_allclose(fx, f(x), rtol=1e-6)
        _, exact = ode.drift_and_divergence(f, x, ode.make_probes(None, (4,), 0), exact=True)
        np.testing.assert_allclose(exact, np.trace(jac), rtol=1e-5)

    @parameterized.parameters(("cosine", 10), ("cosine", 1000), ("linear", 1000))
    def test_log_alpha_bar_is_scipys_pchip(self, name, k):
        from scipy.interpolate import PchipInterpolator

        schedule = schedules.make_schedule(name, k)
        fs = ode.flow_schedule(schedule)
        knots = _log_abar_knots(schedule)
        ref = PchipInterpolator(np.arange(k), knots)
        s = np.concatenate([[0.0, 0.5, 3.0, 3.25], np.linspace(k - 3, k - 1, 7)]).astype(np.float32)
        la, beta = jax.jit(lambda s: ode.log_alpha_bar(fs, s))(s)
        s = s.astype(np.float64)  # the reference at the same (float32) times
        np.testing.assert_allclose(la, ref(s), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(beta, -ref.derivative()(s), rtol=1e-4, atol=1e-6)
        self.assertTrue(np.all(np.asarray(beta) >= 0))
        np.testing.assert_allclose(ode.pchip_slopes(knots), ref.derivative()(np.arange(k)), rtol=1e-9, atol=1e-12)

    def test_flow_schedule_time_scale_and_respacing(self):
        self.assertEqual(ode.flow_schedule(schedules.make_schedule("linear", 1000, rescale_timesteps=True)).time_scale,
                         1.0)
        self.assertEqual(ode.flow_schedule(schedules.make_schedule("cosine", 10, rescale_timesteps=True)).time_scale,
                         100.0)
        with self.assertRaisesRegex(ValueError, "drop --timestep_respacing"):
            ode.flow_schedule(schedules.make_schedule("cosine", 100, "10"))

    @parameterized.parameters("epsilon", "start_x", "v")
    def test_eps_from_output_mean_types(self, mean_type):
        rng = np.random.default_rng(2)
        x, eps = rng.standard_normal((2, 2, 3)), rng.standard_normal((2, 2, 3))
        la = -0.7
        sa, sig = math.exp(0.5 * la), math.sqrt(1 - math.exp(la))
        x0 = (x - sig * eps) / sa
        out = {"epsilon": eps, "start_x": x0, "v": sa * eps - sig * x0}[mean_type]
        learned = np.concatenate([out, rng.standard_normal(out.shape)], -1)  # variance channels are ignored
        got = ode.eps_from_output(jnp.asarray(learned, jnp.float32), jnp.asarray(x, jnp.float32), jnp.float32(la),
                                  mean_type=mean_type, var_type="learned_range")
        np.testing.assert_allclose(got, eps, rtol=1e-5, atol=1e-5)

    def test_previous_x_and_bad_options_are_refused(self):
        with self.assertRaisesRegex(ValueError, "previous_x"):
            ode.eps_from_output(jnp.zeros(3), jnp.zeros(3), 0.0, mean_type="previous_x", var_type="fixed_small")
        with self.assertRaisesRegex(ValueError, "must be >= 0"):
            ode.make_probes(jax.random.key(0), (3,), -1)

    def test_bits_offset_and_dequantization(self):
        # A density uniform on [-1, 1]^D (each pixel's 256 bins equally likely) is exactly 8 bits/dim.
        np.testing.assert_allclose(ode.bits_per_dim(jnp.float32(-64 * math.log(2.0)), 64), 8.0, rtol=1e-6)
        x = jnp.array([0, 1, 254, 255], jnp.float32) / 127.5 - 1.0
        np.testing.assert_allclose(ode.dequantize(x, jnp.zeros(4)), [-1, -1 + 1 / 128, 1 - 2 / 128, 1 - 1 / 128])
        self.assertLess(float(ode.dequantize(x, jnp.full(4, 0.99999))[-1]), 1.0)

    def test_dopri5_on_a_known_solution(self):
        # dy/dt = -y t: y = y0 exp(-t^2 / 2).
        sol = jax.jit(lambda y: ode_solvers.dopri5_solve(lambda t, v: -v * t, y, 0.0, 3.0, rtol=1e-6, atol=1e-8))(
            jnp.array([1.0, 2.0]))
        np.testing.assert_allclose(sol.y, np.array([1.0, 2.0]) * math.exp(-4.5), rtol=1e-4)
        self.assertTrue(bool(sol.success))
        self.assertEqual(int(sol.nfe), 2 + 6 * int(sol.num_steps))
        capped = ode_solvers.dopri5_solve(lambda t, v: -v * t, jnp.ones(2), 0.0, 3.0, rtol=1e-6, atol=1e-8,
                                          max_steps=2)
        self.assertFalse(bool(capped.success))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _evaluate(*args: str, cache: str | None = None) -> subprocess.CompletedProcess:
    # 2 devices (the batch is still split), no XLA optimisation and a shared compilation cache: this is about
    # wiring, and compiling a U-Net's VJP inside an ODE solver dominates the cost.
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_DISABLE_MOST_OPTIMIZATIONS="true",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=2"))
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.run([sys.executable, "evaluate.py", "--metric=ode_nll", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


class OdeCliTest(absltest.TestCase):
    """evaluate.py --metric=ode_nll on an untrained tiny U-Net (configs/tiny.py, K = 10) saved as a directory."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="ode_cli_")
        c = tiny.get_config()
        c.model.update(channel_mult=(1,), attention_resolutions=())  # smaller than tiny: compiles faster
        cfg = {"kind": "unet", "model": c.model.to_dict(), "diffusion": c.diffusion.to_dict()}
        module = convert.kinds.build("unet", **cfg["model"])
        shapes = convert.param_shapes(module, "unet", cfg["model"])  # eval_shape: nothing compiled
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
                              convert.state_dict.unflatten(shapes))  # random weights: eps_hat is not trivial
        cls.workdir = os.path.join(cls.tmp, "model")
        convert.save_converted(cls.workdir, cfg, params, {"repo": "test", "flags": ""})

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_end_to_end_and_resume(self):
        out = os.path.join(self.tmp, "eval", "ode.json")
        args = (f"--workdir={self.workdir}", "--data=digits", "--num_samples=3", "--batch_size=2",
                "--ode_solver=rk4", "--ode_steps=2", f"--out={out}")
        cache = os.path.join(self.tmp, "jax_cache")
        proc = _evaluate(*args, cache=cache)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn("ODE bits/dim", proc.stdout)
        report = json.load(open(out))
        self.assertEqual((report["num_examples"], report["nfe_mean"]), (3, 8.0))
        self.assertTrue(np.isfinite(report["bits_per_dim"]) and report["bits_per_dim"] > 0, report)
        self.assertEqual(report["settings"]["ode_steps"], 2)
        full = dict(np.load(os.path.join(self.tmp, "eval", "ode_examples.npz")))
        # As if killed after the first batch: the partial file holds 2 examples; the rerun does the rest.
        partial_file = run.partial_path(out)
        first = ode_run.OdePartial(**{k: v[:2] for k, v in full.items()})
        run.save_partial(partial_file, first, report["settings"])
        os.remove(out)
        proc = _evaluate(*args, cache=cache)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        resumed = dict(np.load(os.path.join(self.tmp, "eval", "ode_examples.npz")))
        np.testing.assert_array_equal(resumed["index"], np.arange(3))
        np.testing.assert_allclose(resumed["bpd"], full["bpd"], rtol=1e-5)
        np.testing.assert_allclose(json.load(open(out))["bits_per_dim"], report["bits_per_dim"], rtol=1e-5)
        with self.assertRaisesRegex(run.ResumeError, "seed: stored 0, now 1"):  # other settings: refused
            ode_run.load_partial(partial_file, dict(report["settings"], seed=1, batch_size=4))
        self.assertLen(ode_run.load_partial(partial_file, dict(report["settings"], batch_size=4)).index, 3)

    def test_respacing_refused_and_nothing_written(self):
        out = os.path.join(self.tmp, "refused", "ode.json")
        proc = _evaluate(f"--workdir={self.workdir}", "--data=digits", "--timestep_respacing=5", f"--out={out}")
        self.assertEqual(proc.returncode, 2, proc.stderr[-3000:])
        self.assertNotIn("Traceback", proc.stderr)
        self.assertLen([line for line in proc.stderr.splitlines() if ": error: " in line], 1, proc.stderr)
        self.assertIn("drop --timestep_respacing=5", proc.stderr)
        self.assertFalse(os.path.exists(os.path.dirname(out)))

    def test_bad_options(self):
        base = dict(batch_size=8, t_chunk=1, start=0, ode_probes=1, ode_solver="dopri5", ode_rtol=1e-5,
                    ode_atol=1e-5, ode_steps=10)
        ode_run.check_ode_options(base)
        for bad, pattern in ((dict(ode_probes=-1), "ode_probes=-1 must be >= 0"),
                             (dict(ode_rtol=0.0), "ode_rtol=0.0 must be in"),
                             (dict(ode_atol=float("nan")), "ode_atol=nan must be in"),
                             (dict(ode_steps=0), "ode_steps=0 must be at least 1"),
                             (dict(timestep_respacing="ddim5"), "drop --timestep_respacing"),
                             (dict(cfg_scale=2.0), "drop --cfg_scale")):
            with self.assertRaisesRegex(ValueError, pattern):
                ode_run.check_ode_options(dict(base, **bad))


if __name__ == "__main__":
    absltest.main()
