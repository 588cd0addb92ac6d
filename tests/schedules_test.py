"""Schedules and respacing against OpenAI's tables, plus properties."""
import numpy as np
import pytest
from absl.testing import parameterized

from diffusion_jax import schedules
from tests import parity

TABLES = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
          "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
          "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
          "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]


def _respacing_cases():
    ref = parity.load("respacing.npz")
    return sorted({k.split("/")[0] for k in ref})


class ScheduleParityTest(parameterized.TestCase):

    @parameterized.parameters("linear_1000", "cosine_1000", "cosine_4000")
    def test_named_schedule_tables(self, case):
        ref = parity.load("schedules.npz")
        name, steps = case.split("_")
        betas = schedules.get_named_beta_schedule(name, int(steps))
        self.assertEqual(betas.dtype, np.float64)
        np.testing.assert_allclose(betas, ref[f"{case}/betas"], rtol=1e-12, atol=0)
        tables = schedules.schedule_tables(betas)
        sched = schedules.make_schedule(name, int(steps))
        for key in TABLES:
            np.testing.assert_allclose(tables[key], ref[f"{case}/{key}"], rtol=1e-12, atol=1e-300, err_msg=key)
            # Device tables are the float64 tables cast once to float32.
            np.testing.assert_array_equal(np.asarray(getattr(sched, key)),
                                          ref[f"{case}/{key}"].astype(np.float32), err_msg=key)
        np.testing.assert_array_equal(np.asarray(sched.fixed_large_variance),
                                      ref[f"{case}/runtime_f32/fixed_large_variance"])
        np.testing.assert_array_equal(np.asarray(sched.fixed_large_log_variance),
                                      ref[f"{case}/runtime_f32/fixed_large_log_variance"])

    @parameterized.parameters(*_respacing_cases())
    def test_respacing(self, case):
        ref = parity.load("respacing.npz")
        name, steps, counts = case.split("_", 2)
        counts = counts.replace("-", ",")
        use = schedules.space_timesteps(int(steps), counts)
        np.testing.assert_array_equal(sorted(use), ref[f"{case}/use_timesteps"])
        for rescale in (False, True):
            sched = schedules.make_schedule(name, int(steps), counts, rescale_timesteps=rescale)
            np.testing.assert_array_equal(np.asarray(sched.timestep_map), ref[f"{case}/timestep_map"])
            t = np.arange(sched.num_timesteps)
            got = np.asarray(sched.model_timesteps(t))
            want = ref[f"{case}/model_timesteps_rescale_{str(rescale).lower()}"]
            np.testing.assert_array_equal(got, want)
            self.assertEqual(got.dtype, np.float32 if rescale else np.int32)
        for key in TABLES:
            np.testing.assert_array_equal(np.asarray(getattr(sched, key)),
                                          ref[f"{case}/{key}"].astype(np.float32), err_msg=key)
        for v in ("fixed_small_variance", "fixed_small_log_variance"):
            src = "posterior_variance" if v == "fixed_small_variance" else "posterior_log_variance_clipped"
            np.testing.assert_array_equal(np.asarray(getattr(sched, src)), ref[f"{case}/runtime_f32/{v}"])
        np.testing.assert_array_equal(np.asarray(sched.fixed_large_variance),
                                      ref[f"{case}/runtime_f32/fixed_large_variance"])
        np.testing.assert_array_equal(np.asarray(sched.fixed_large_log_variance),
                                      ref[f"{case}/runtime_f32/fixed_large_log_variance"])


class RespacingBehaviourTest(parameterized.TestCase):

    def test_round_half_even(self):
        use = schedules.space_timesteps(1000, "25")
        self.assertIn(166, use)
        self.assertIn(832, use)
        self.assertEqual(sorted(schedules.space_timesteps(100, "3,3")), [0, 24, 49, 50, 74, 99])

    def test_ddim_stride(self):
        self.assertEqual(sorted(schedules.space_timesteps(1000, "ddim25")), list(range(0, 1000, 40)))

    @parameterized.parameters((1000, "ddim1", "cannot create exactly 1000 steps with an integer stride"),
                              (1000, "ddim999", "cannot create exactly 1000 steps with an integer stride"),
                              (30, "11,11,11", "cannot divide section of 10 steps into 11"),
                              (100, "ddimx", "ddimN"),
                              (100, "fast", "'N', 'a,b,c', 'ddimN'"),
                              (100, "0", "at least one step"))
    def test_impossible_respacing_raises(self, steps, counts, message):
        with pytest.raises(ValueError, match=message):
            schedules.space_timesteps(steps, counts)

    @parameterized.parameters(1, 7, 100, 1000, 4000)
    def test_full_respacing_keeps_every_step(self, steps):
        self.assertEqual(schedules.space_timesteps(steps, str(steps)), set(range(steps)))

    @parameterized.product(name=["linear", "cosine"], counts=["10", "7,3,5", "ddim20", "333"])
    def test_respaced_alphas_cumprod_is_subset(self, name, counts):
        base = schedules.schedule_tables(schedules.get_named_beta_schedule(name, 1000))
        betas, tmap = schedules.respace_betas(base["betas"], schedules.space_timesteps(1000, counts))
        new = schedules.schedule_tables(betas)
        np.testing.assert_allclose(new["alphas_cumprod"], base["alphas_cumprod"][tmap], rtol=1e-8)

    def test_unknown_schedule(self):
        with pytest.raises(ValueError, match="unknown beta schedule 'quad'.*linear, cosine"):
            schedules.get_named_beta_schedule("quad", 10)

    def test_glide_alias(self):
        np.testing.assert_array_equal(schedules.get_named_beta_schedule("squaredcos_cap_v2", 50),
                                      schedules.get_named_beta_schedule("cosine", 50))

    def test_rescaled_4000_is_quarter_steps(self):
        sched = schedules.make_schedule("cosine", 4000, rescale_timesteps=True)
        np.testing.assert_array_equal(np.asarray(sched.model_timesteps(np.array([0, 1, 3999]))),
                                      np.float32([0.0, 0.25, 999.75]))
