"""Config wiring of min-SNR-gamma and v-prediction, solver spacings, one sampler table."""
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from configs import tiny
from diffusion_jax import objectives, sampling, schedules
from diffusion_jax.generation import samplers
from diffusion_jax.runtime import checkpoints
from diffusion_jax.runtime.cli import UsageError
from diffusion_jax.training import loop as train_lib
from diffusion_jax.training import steps as train_steps


def _tiny(**overrides):
    c = tiny.get_config()
    for dotted, value in overrides.items():
        group, key = dotted.split(".")
        c[group][key] = value
    return c


class SnrGammaWiringTest(parameterized.TestCase):

    def test_config_default_is_off(self):
        self.assertEqual(tiny.get_config().diffusion.snr_gamma, 0.0)

    @parameterized.parameters(0.0, 5.0)
    def test_snr_gamma_reaches_training_losses(self, gamma):
        config = _tiny(**{"diffusion.snr_gamma": gamma, "diffusion.mean_type": "v"})
        schedule = train_lib.make_schedule(config)
        spec = train_lib.make_spec(config, schedule)
        self.assertEqual(spec.snr_gamma, gamma)
        seen = []
        original = objectives.training_losses

        def spy(*args, **kwargs):
            seen.append((kwargs["snr_gamma"], kwargs["mean_type"]))
            return original(*args, **kwargs)

        model = train_lib.make_model(config)
        tx, _ = train_steps.make_optimizer(num_steps=2, **config.optim.to_dict())
        state = train_steps.init_state(train_lib.init_params(model, config, jax.random.key(0)), tx, spec)
        rng = np.random.RandomState(0)
        batch = dict(image=jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32),
                     label=jnp.asarray(rng.randint(0, 10, 4), jnp.int32))
        objectives.training_losses = spy
        try:
            _, metrics = train_steps.diffusion_step(state, batch, jax.random.key(1), model=model, schedule=schedule,
                                                    spec=spec, tx=tx)
        finally:
            objectives.training_losses = original
        self.assertEqual(seen, [(gamma, "v")])
        self.assertTrue(np.isfinite(float(metrics["loss"])))

    @parameterized.parameters(
        ({"diffusion.snr_gamma": -1.0}, "snr_gamma=-1.0 must be >= 0"),
        ({"diffusion.snr_gamma": 5.0, "diffusion.mean_type": "previous_x"}, "needs mean_type in"),
        ({"diffusion.snr_gamma": 5.0, "diffusion.loss_type": "kl"}, "has none"),
        ({"diffusion.mean_type": "x0"}, "mean_type='x0' is not one of epsilon, start_x, previous_x, v"),
    )
    def test_bad_values_fail_before_anything_runs(self, overrides, message):
        workdir = os.path.join(tempfile.mkdtemp(prefix="wiring_test_"), "run")
        with pytest.raises(UsageError, match=message):
            train_lib.train_and_evaluate(_tiny(**overrides), workdir)
        self.assertFalse(os.path.exists(workdir))

    def test_field_absent_from_an_older_run_means_its_default(self):
        config = checkpoints.config_to_dict(_tiny())
        stored = json.loads(json.dumps(config))
        del stored["diffusion"]["snr_gamma"]
        workdir = tempfile.mkdtemp(prefix="wiring_test_")
        with open(os.path.join(workdir, checkpoints.CONFIG_FILE), "w") as f:
            json.dump(stored, f)
        checkpoints.check_workdir_config(workdir, config)  # no error
        config["diffusion"]["snr_gamma"] = 5.0
        with pytest.raises(checkpoints.WorkdirMismatchError, match="diffusion.snr_gamma"):
            checkpoints.check_workdir_config(workdir, config)


class VPredictionRunTest(parameterized.TestCase):

    def test_v_config_trains_and_samples(self):
        workdir = tempfile.mkdtemp(prefix="wiring_test_")
        over = {"diffusion.mean_type": "v", "diffusion.snr_gamma": 5.0, "train.num_steps": 2}
        metrics = train_lib.train_and_evaluate(_tiny(**over), workdir)
        self.assertTrue(np.isfinite(metrics["loss"]))
        module, params, cfg = checkpoints.load_for_inference(workdir)
        self.assertEqual(cfg["diffusion"]["mean_type"], "v")
        sched = schedules.make_schedule("cosine", 10, "quad4")
        out = sampling.named_sampler("dpm++2m")(
            jax.random.key(0), lambda x, t, y: module.apply({"params": params}, x, t, y), sched, (2, 8, 8, 1),
            mean_type="v", var_type=cfg["diffusion"]["var_type"], clip_denoised=False,
            y=jnp.array([1, 2], jnp.int32))
        self.assertTrue(np.all(np.isfinite(np.asarray(out))))
        # An epsilon config cannot resume (or overwrite) the v run.
        with pytest.raises(checkpoints.WorkdirMismatchError, match="diffusion.mean_type"):
            train_lib.train_and_evaluate(_tiny(**dict(over, **{"diffusion.mean_type": "epsilon"})), workdir)


def _lambda64(name, steps):
    abar = np.cumprod(1.0 - schedules.get_named_beta_schedule(name, steps).astype(np.float64))
    return np.log(np.sqrt(abar)) - np.log(np.sqrt(1.0 - abar))


class SolverSpacingTest(parameterized.TestCase):

    @parameterized.product(spacing=schedules.SOLVER_SPACINGS, name=["cosine", "linear"], count=[2, 5, 10, 15, 25, 50])
    def test_subset_of_the_grid_with_both_ends(self, spacing, name, count):
        kept = schedules.space_timesteps(1000, f"{spacing}{count}", schedules.get_named_beta_schedule(name, 1000))
        self.assertLen(kept, count)
        self.assertTrue(kept <= set(range(1000)))
        self.assertIn(0, kept)
        self.assertIn(999, kept)

    @parameterized.parameters(5, 10, 20)
    def test_quad_matches_the_formula(self, count):
        kept = sorted(schedules.space_timesteps(1000, f"quad{count}", schedules.get_named_beta_schedule("cosine", 1000)))
        want = sorted({int(np.rint(999 * (1 - i / (count - 1)) ** 2)) for i in range(count)})
        self.assertEqual(kept, want)

    @parameterized.parameters(4, 8, 12)
    def test_logsnr_is_nearest_to_uniform_lambda(self, count):
        # Linear schedule: lambda(t) is smooth enough that no two targets share a timestep.
        lam = _lambda64("linear", 1000)
        targets = np.linspace(lam[-1], lam[0], count)
        kept = sorted(schedules.space_timesteps(1000, f"logsnr{count}", schedules.get_named_beta_schedule("linear", 1000)))
        for t in kept:
            gap = np.min(np.abs(targets - lam[t]))
            neighbours = [lam[u] for u in (t - 1, t + 1) if 0 <= u < 1000]
            self.assertTrue(all(np.min(np.abs(targets - x)) >= gap - 1e-12 or np.argmin(np.abs(targets - x))
                                != np.argmin(np.abs(targets - lam[t])) for x in neighbours))

    def test_respaced_schedule_keeps_the_original_abar(self):
        betas = schedules.get_named_beta_schedule("cosine", 1000)
        s = schedules.make_schedule("cosine", 1000, "logsnr15")
        tmap = np.asarray(s.timestep_map)
        self.assertEqual(set(tmap.tolist()), schedules.space_timesteps(1000, "logsnr15", betas))
        np.testing.assert_allclose(np.asarray(s.alphas_cumprod), np.cumprod(1 - betas)[tmap], rtol=1e-6)

    def test_model_is_evaluated_only_at_kept_timesteps(self):
        s = schedules.make_schedule("cosine", 1000, "quad6")
        seen = []

        def model(x, t, y):
            jax.debug.callback(lambda v: seen.extend(np.asarray(v).tolist()), t)
            return 0.1 * x

        for name in sampling.SAMPLER_NAMES:
            # EDM's churn raises the noise level off the grid by design (tests/sde_solver_test.py checks where
            # it lands); without churn it, too, stays on the kept timesteps.
            options = {"s_churn": 0.0} if name == "edm" else {}
            sampling.named_sampler(name, **options)(jax.random.key(0), model, s, (1, 2, 2, 1), mean_type="epsilon",
                                                    var_type="fixed_small", clip_denoised=False)
        jax.effects_barrier()
        self.assertTrue(set(seen) <= set(np.asarray(s.timestep_map).tolist()))
        self.assertIn(999, seen)

    def test_bad_specs_name_the_problem(self):
        betas = schedules.get_named_beta_schedule("cosine", 10)
        with pytest.raises(ValueError, match="2 <= N <= 10"):
            schedules.space_timesteps(10, "quad11", betas)
        with pytest.raises(ValueError, match="pass betas"):
            schedules.space_timesteps(10, "logsnr5")


class OneSamplerTableTest(parameterized.TestCase):

    @parameterized.parameters(*sampling.SAMPLER_NAMES)
    def test_every_name_has_one_row_bound_to_the_math_layer_loop(self, name):
        row = samplers.SAMPLERS[name]
        want = sampling.named_sampler(name)
        self.assertIs(row.loop.func, want.func)
        self.assertEqual(row.loop.keywords, want.keywords)
        self.assertEqual(samplers.choose(name).name, name)
