"""Samplers: single steps and guided steps against OpenAI's outputs, loops with the
real parity networks replayed with the saved noise, and loop properties
(device-count / batch-size invariance, DDIM inversion)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import convert, guidance, sampling, schedules
from tests import parity

# Compiles the parity networks several times faster; numerics stay float32.
jax.config.update("jax_disable_most_optimizations", True)

MEANS = {"EPSILON": "epsilon", "START_X": "start_x", "PREVIOUS_X": "previous_x"}
VARS = {"FIXED_SMALL": "fixed_small", "FIXED_LARGE": "fixed_large", "LEARNED": "learned",
        "LEARNED_RANGE": "learned_range"}
RTOL, ATOL = 1e-5, 1e-6
# Under jax.jit XLA:CPU may contract a*x - b into one FMA; where the subtraction
# cancels (eps <-> x0 conversions near t = 0) results move by a few 1e-6 from
# PyTorch's separately rounded ops.  Eager evaluation is checked at ATOL.
JIT_ATOL = 1e-5
GUIDED = "guided/EPSILON/LEARNED_RANGE/clip_true"


def _close(got, want, what, atol=ATOL, rtol=RTOL):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


def _case_inputs(case):
    ref = parity.load("sampling.npz")
    get = lambda k: parity.nhwc(ref[f"{case}/{k}"])
    return {"s": schedules.make_schedule(**parity.CASES[case]), "x": get("inputs/x_t"), "mo": get("inputs/model_output"),
                "noise": get("inputs/sample_noise"), "grad": get("inputs/grad"),
                "t": ref[f"{case}/inputs/t"].astype(np.int32), "y": ref[f"{case}/inputs/y"].astype(np.int32)}, get


def _step_keys(case):
    """(kind, M, V, clip, eta) of every unguided single-step fixture."""
    out = []
    for k in parity.load("sampling.npz"):
        parts = k.split("/")
        if parts[0] == case and parts[-1] == "sample" and parts[1] != "guided":
            eta = float(parts[5][len("eta_"):]) if len(parts) == 7 else None
            out.append((parts[1], parts[2], parts[3], parts[4], eta))
    return out


class SingleStepParityTest(parameterized.TestCase):

    @parameterized.product(case=list(parity.CASES), jit=[False, True])
    def test_steps(self, case, jit):
        inp, get = _case_inputs(case)
        keys = _step_keys(case)
        self.assertLen(keys, 9)
        for kind, m, v, clip, eta in keys:
            c = 6 if v.startswith("LEARNED") else 3  # fixed variances get the first C channels
            model_fn = lambda x, ts, y, c=c: jnp.asarray(inp["mo"][..., :c])
            kw = {"mean_type": MEANS[m], "var_type": VARS[v], "clip_denoised": clip == "clip_true"}
            if kind == "p_sample":
                fn = lambda x, t, n, kw=kw, f=model_fn: sampling.p_sample(inp["s"], f, x, t, n, **kw)
            elif kind == "ddim_sample":
                fn = lambda x, t, n, kw=kw, f=model_fn, e=eta: sampling.ddim_sample(inp["s"], f, x, t, n, eta=e, **kw)
            else:
                fn = lambda x, t, n, kw=kw, f=model_fn: sampling.ddim_reverse_sample(inp["s"], f, x, t, **kw)
            sample, pred = (jax.jit(fn) if jit else fn)(inp["x"], inp["t"], inp["noise"])
            base = "/".join([kind, m, v, clip] + ([f"eta_{eta}"] if eta is not None else []))
            atol = JIT_ATOL if jit else ATOL
            _close(sample, get(base + "/sample"), base + " sample", atol)
            _close(pred, get(base + "/pred_xstart"), base + " pred_xstart", atol)

    @parameterized.parameters(*parity.CASES)
    def test_no_noise_at_t0(self, case):
        inp, _ = _case_inputs(case)
        f = lambda x, ts, y: jnp.asarray(inp["mo"])
        kw = {"mean_type": "epsilon", "var_type": "learned_range"}
        t0 = np.zeros_like(inp["t"])
        a, _ = sampling.p_sample(inp["s"], f, inp["x"], t0, inp["noise"], **kw)
        b, _ = sampling.p_sample(inp["s"], f, inp["x"], t0, 5 * inp["noise"], **kw)
        np.testing.assert_array_equal(a, b)
        a, _ = sampling.ddim_sample(inp["s"], f, inp["x"], t0, inp["noise"], eta=1.0, **kw)
        b, _ = sampling.ddim_sample(inp["s"], f, inp["x"], t0, 5 * inp["noise"], eta=1.0, **kw)
        np.testing.assert_array_equal(a, b)


class GuidedParityTest(parameterized.TestCase):

    @parameterized.product(case=list(parity.CASES), jit=[False, True])
    def test_guided(self, case, jit):
        inp, get = _case_inputs(case)
        ref = parity.load("sampling.npz")
        s, x, t, y = inp["s"], inp["x"], inp["t"], inp["y"]
        seen = []

        def cond_fn(xx, ts, yy):
            seen.append(ts)
            return jnp.asarray(inp["grad"])

        model_fn = lambda xx, ts, yy: jnp.asarray(inp["mo"])
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "clip_denoised": True}
        wrap = jax.jit if jit else (lambda f: f)
        atol = JIT_ATOL if jit else ATOL
        g = lambda k: get(f"{GUIDED}/{k}")

        pmv = wrap(lambda x, t, y: sampling.model_mean_variance(s, model_fn, x, t, y=y, **kw))(x, t, y)
        for f in pmv._fields:
            _close(getattr(pmv, f), g(f"p_mean_variance/{f}"), f"pmv {f}", atol)
        mean = wrap(lambda p, x, t, y: sampling.condition_mean(s, cond_fn, p, x, t, y=y))(pmv, x, t, y)
        _close(mean, g("condition_mean/mean"), "condition_mean", atol)
        cs = wrap(lambda p, x, t, y: sampling.condition_score(s, cond_fn, p, x, t, y=y))(pmv, x, t, y)
        for f in cs._fields:  # pred_xstart is unclipped and large: relative tolerance covers it
            _close(getattr(cs, f), g(f"condition_score/{f}"), f"condition_score {f}", atol)
        out = wrap(lambda x, t, n, y: sampling.p_sample(s, model_fn, x, t, n, cond_fn=cond_fn, y=y, **kw))(
            x, t, inp["noise"], y)
        _close(out[0], g("p_sample_cond/sample"), "p_sample_cond", atol)
        _close(out[1], g("p_sample_cond/pred_xstart"), "p_sample_cond pred", atol)
        out = wrap(lambda x, t, n, y: sampling.ddim_sample(s, model_fn, x, t, n, eta=0.5, cond_fn=cond_fn, y=y,
                                                           **kw))(x, t, inp["noise"], y)
        _close(out[0], g("ddim_sample_cond_eta_0.5/sample"), "ddim_cond", atol)
        _close(out[1], g("ddim_sample_cond_eta_0.5/pred_xstart"), "ddim_cond pred", atol)
        want_ts = ref[f"{case}/{GUIDED}/cond_fn_timesteps"]
        self.assertEqual(seen[0].dtype, np.float32 if want_ts.dtype == np.float32 else np.int32)
        if not jit:
            np.testing.assert_array_equal(seen[0], want_ts)


# ----------------------------------------------------------------------------- real networks
IDIFF_FLAGS = {"repo": "improved", "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,1,2",
                   "attention_resolutions": "16,8", "num_heads": 4, "learn_sigma": True, "class_cond": True, "num_classes": 10,
                   "use_scale_shift_norm": True}
GUNET_FLAGS = {"repo": "guided", "image_size": 32, "num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,1,1",
                   "attention_resolutions": "16,8", "num_head_channels": 16, "resblock_updown": True,
                   "use_new_attention_order": True, "use_scale_shift_norm": True, "learn_sigma": True, "class_cond": True,
                   "num_classes": 10}
GCLS_FLAGS = {"repo": "guided", "kind": "classifier", "image_size": 32, "classifier_width": 32, "classifier_depth": 1,
                  "classifier_channel_mult": "1,1,1", "classifier_attention_resolutions": "16",
                  "classifier_num_head_channels": 16, "classifier_resblock_updown": True,
                  "classifier_use_scale_shift_norm": True, "classifier_pool": "attention", "num_classes": 10}
LOOP_KW = {"mean_type": "epsilon", "var_type": "learned_range", "clip_denoised": True}
# Loops with the real networks (README): atol 1e-3, relative for the large
# intermediate values the strong guidance (scale 20) produces (|x| up to ~60).
LOOP_ATOL, LOOP_RTOL = 1e-3, 1e-4


@functools.cache
def _network(name, flags_items):
    return convert.from_openai(os.path.join(parity.PARITY_DIR, f"unet_{name}_weights.npz"), dict(flags_items))


def _loop_fixture(name, loop):
    io = parity.load(f"unet_{name}_io.npz")
    return lambda k: io[f"{loop}/{k}"]


class LoopParityTest(parameterized.TestCase):

    @parameterized.parameters(("loop0_p_sample_loop", "5", False), ("loop1_ddim_sample_loop", "ddim5", True))
    def test_idiff_compiled_loop(self, loop, respacing, ddim):
        """improved-diffusion net, cosine 1000, rescale True: the whole jitted scan."""
        module, params = _network("idiff_pub", tuple(IDIFF_FLAGS.items()))
        g = _loop_fixture("idiff_pub", loop)
        s = schedules.make_schedule("cosine", 1000, respacing, rescale_timesteps=True)
        np.testing.assert_array_equal(s.model_timesteps(jnp.arange(4, -1, -1)), g("model_timesteps")[:, 0])

        @jax.jit
        def run(params, x_T, noise, y):
            model_fn = lambda x, t, yy: module.apply({"params": params}, x, t, yy)
            if ddim:
                return sampling.ddim_sample_loop_with_noise(model_fn, s, x_T, noise, eta=0.0, y=y,
                                                            return_trajectory=True, **LOOP_KW)
            return sampling.p_sample_loop_with_noise(model_fn, s, x_T, noise, y=y, return_trajectory=True, **LOOP_KW)

        out = run(params, parity.nhwc(g("inputs/noise_init")), parity.nhwc(g("inputs/step_noise")),
                  g("inputs/y").astype(np.int32))
        _close(out.samples, parity.nhwc(g("samples")), loop, LOOP_ATOL, LOOP_RTOL)
        _close(out.pred_xstart, parity.nhwc(g("pred_xstart")), loop + " pred_xstart", LOOP_ATOL, LOOP_RTOL)
        np.testing.assert_array_equal(out.sample, out.samples[-1])

    def test_gdiff_classifier_guided_loops(self):
        """guided-diffusion net + noisy classifier (scale 20), linear 1000 "4", step by step."""
        module, params = _network("gdiff_unet_pub", tuple(GUNET_FLAGS.items()))
        cmod, cparams = _network("gdiff_cls_pub", tuple(GCLS_FLAGS.items()))
        model_fn = jax.jit(lambda x, t, y: module.apply({"params": params}, x, t, y))
        cond_fn = jax.jit(guidance.classifier_cond_fn(lambda x, t: cmod.apply({"params": cparams}, x, t), 20.0))
        s = schedules.make_schedule("linear", 1000, "4")
        for loop, ddim in (("loop0_p_sample_loop", False), ("loop1_ddim_sample_loop", True)):
            g = _loop_fixture("gdiff_unet_pub", loop)
            x, y = parity.nhwc(g("inputs/noise_init")), g("inputs/y").astype(np.int32)
            noise, want, want_pred = (parity.nhwc(g(k)) for k in ("inputs/step_noise", "samples", "pred_xstart"))
            for k in range(s.num_timesteps):
                t = np.full((2,), s.num_timesteps - 1 - k, np.int32)
                np.testing.assert_array_equal(s.model_timesteps(t), g("cond_fn_timesteps")[k])
                step = sampling.ddim_sample if ddim else sampling.p_sample
                x, pred = step(s, model_fn, x, t, noise[k], cond_fn=cond_fn, y=y, **LOOP_KW)
                _close(x, want[k], f"{loop} step {k}", LOOP_ATOL, LOOP_RTOL)
                _close(pred, want_pred[k], f"{loop} step {k} pred_xstart", LOOP_ATOL, LOOP_RTOL)


# ----------------------------------------------------------------------------- loop properties
def toy_model(x, timesteps, y):
    """A smooth stand-in network: [B,H,W,C] -> [B,H,W,2C] (eps, variance values)."""
    t = jnp.asarray(timesteps, jnp.float32).reshape((-1, 1, 1, 1))
    shift = 0.0 if y is None else 0.1 * jnp.asarray(y, jnp.float32).reshape((-1, 1, 1, 1))
    eps = jnp.tanh(0.7 * x + 0.3 * jnp.roll(x, 1, axis=1) + 1e-3 * t + shift)
    return jnp.concatenate([eps, jnp.tanh(x)], axis=-1)


def _mesh(n):
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


class LoopPropertiesTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.s = schedules.make_schedule("linear", 100, "6")
        self.rng = jax.random.key(3)
        self.shape = (8, 4, 4, 3)

    def _sampler(self, ddim, n_dev, progress=False):
        s = self.s

        def run(rng, ids, y):
            shape = (ids.shape[0],) + self.shape[1:]
            kw = {"mean_type": "epsilon", "var_type": "learned_range", "y": y, "sample_ids": ids, "progress": progress}
            if ddim:
                return sampling.ddim_sample_loop(rng, toy_model, s, shape, eta=0.5, **kw)
            return sampling.p_sample_loop(rng, toy_model, s, shape, **kw)

        mesh = _mesh(n_dev)
        repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        return jax.jit(run, in_shardings=(repl, data, data), out_shardings=data)

    @parameterized.parameters(False, True)
    def test_device_count_and_batch_size_invariance(self, ddim):
        ids = np.arange(8, dtype=np.int32)
        y = (ids % 3).astype(np.int32)
        on8 = self._sampler(ddim, 8, progress=True)(self.rng, ids, y)
        self.assertLen(on8.sharding.device_set, 8)
        on1 = self._sampler(ddim, 1)(self.rng, ids, y)
        half = self._sampler(ddim, 2)(self.rng, ids[4:], y[4:])  # another batch size, other ids
        # The random draws are bit-identical whatever the sharding; the float
        # math may differ in the last bit (XLA:CPU vectorises 1 vs 8 rows per
        # device differently), hence the 1e-5 tolerance on the samples.
        np.testing.assert_allclose(on8, on1, atol=1e-5, rtol=0)
        np.testing.assert_allclose(on8[4:], half, atol=1e-5, rtol=0)
        self.assertGreater(float(jnp.std(on8)), 0.1)

    def test_noise_independent_of_sharding_and_batch(self):
        def draws(ids):
            keys = sampling.sample_keys(self.rng, ids)
            return sampling.initial_noise(keys, self.shape), sampling.step_noise(keys, 3, self.shape)

        ids = np.arange(8, dtype=np.int32)
        mesh = _mesh(8)
        data = NamedSharding(mesh, P("data"))
        sharded = jax.jit(draws, in_shardings=(data,), out_shardings=(data, data))(ids)
        single = jax.jit(draws)(ids)
        pick = np.array([6, 2])
        part = jax.jit(draws)(ids[pick])
        for a, b, c in zip(sharded, single, part):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(np.asarray(a)[pick], c)
        self.assertFalse(np.array_equal(sharded[0], sharded[1]))  # x_T and step noise differ

    def test_compiled_once_per_shape(self):
        traces = []

        @jax.jit
        def run(rng, ids):
            traces.append(1)
            return sampling.p_sample_loop(rng, toy_model, self.s, (4, 4, 4, 3), mean_type="epsilon",
                                          var_type="learned_range", sample_ids=ids)

        a = run(self.rng, np.arange(4))
        b = run(jax.random.key(4), np.arange(4, 8))
        self.assertLen(traces, 1)
        self.assertFalse(np.array_equal(a, b))

    def test_explicit_noise_and_x_T_match_drawn(self):
        """The drawn loop equals the explicit-noise loop fed the same draws, and x_T= is used."""
        ids = jnp.arange(8)
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "return_trajectory": True}

        @jax.jit
        def run(rng):
            keys = sampling.sample_keys(rng, ids)
            x_T = sampling.initial_noise(keys, self.shape)
            noise = jnp.stack([sampling.step_noise(keys, t, self.shape) for t in range(5, -1, -1)])
            drawn = sampling.ddim_sample_loop(rng, toy_model, self.s, self.shape, eta=1.0, **kw)
            given = sampling.ddim_sample_loop_with_noise(toy_model, self.s, x_T, noise, eta=1.0, **kw)
            from_x_T = sampling.ddim_sample_loop(rng, toy_model, self.s, self.shape, eta=1.0, x_T=x_T, **kw)
            return drawn, given, from_x_T

        drawn, given, from_x_T = run(self.rng)
        self.assertEqual(drawn.samples.shape, (6,) + self.shape)
        np.testing.assert_allclose(drawn.samples, given.samples, atol=1e-6)
        np.testing.assert_allclose(drawn.samples, from_x_T.samples, atol=1e-6)
        np.testing.assert_array_equal(drawn.sample, drawn.samples[-1])

    def test_bad_shapes(self):
        with self.assertRaisesRegex(ValueError, "sample_ids"):
            sampling.p_sample_loop(self.rng, toy_model, self.s, (4, 4, 4, 3), mean_type="epsilon",
                                   var_type="learned_range", sample_ids=jnp.arange(3))
        with self.assertRaisesRegex(ValueError, "step_noise"):
            sampling.p_sample_loop_with_noise(toy_model, self.s, jnp.zeros((2, 4, 4, 3)), jnp.zeros((5, 2, 4, 4, 3)),
                                              mean_type="epsilon", var_type="learned_range")

    def test_ddim_reverse_then_forward_recovers_input(self):
        """DDIM eta = 0 discretises an ODE: encoding then decoding returns x_0.

        The error is first order in the step size (measured with this stand-in:
        ~0.2 with 100 steps, ~0.018 with 1000), so we check both the tolerance
        at 1000 steps and the convergence rate.  x_0 is taken as the level-0
        sample, so it is compared with the decoder's state before the final
        t = 0 denoising step.  Linear schedule: cosine's abar ~ 1e-8 at the top
        amplifies any mismatch by 1/sqrt(abar).
        """
        x0 = jnp.clip(0.5 * jax.random.normal(jax.random.key(0), (2, 4, 4, 3)), -1, 1)
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "clip_denoised": False}

        def round_trip(k):
            s = schedules.make_schedule("linear", 1000, str(k))

            @jax.jit
            def run(x0):
                x_T = sampling.ddim_reverse_sample_loop(toy_model, s, x0, **kw)
                traj = sampling.ddim_sample_loop(jax.random.key(0), toy_model, s, x0.shape, x_T=x_T,
                                                 return_trajectory=True, **kw)
                return traj.samples[-2], x_T

            back, x_T = run(x0)
            return float(jnp.abs(back - x0).max()), float(jnp.abs(x_T - x0).mean())

        err_fine, dist = round_trip(1000)
        err_coarse, _ = round_trip(100)
        self.assertLess(err_fine, 0.025)
        self.assertGreater(err_coarse / err_fine, 5.0)  # first-order convergence
        self.assertGreater(dist, 0.5)  # x_T really is far from x_0

if __name__ == "__main__":
    absltest.main()
