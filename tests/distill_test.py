"""Progressive distillation: the two-DDIM-step target, the student's parameterisation, a stage run."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from configs import tiny
from diffusion_jax import distillation, sampling, schedules
from diffusion_jax.convert import kinds
from diffusion_jax.generation import program
from diffusion_jax.runtime import checkpoints
from diffusion_jax.runtime import cli
from diffusion_jax.runtime.cli import UsageError
from diffusion_jax.training import distill
from diffusion_jax.training import loop as train_lib
from diffusion_jax.training import steps as train_steps

T = 10  # configs/tiny.py


def _grids(n=4):
    return (schedules.make_schedule("cosine", T, f"distill{n}"), schedules.make_schedule("cosine", T, f"distill{2 * n}"))


def _toy_teacher(channels_out):
    """A smooth, t- and y-dependent stand-in network (x [B,8,8,1] -> [B,8,8,channels_out])."""
    def fn(x, ts, y):
        scale = 0.3 + 0.05 * ts.astype(jnp.float32)[:, None, None, None] + 0.01 * y[:, None, None, None]
        out = jnp.tanh(scale * x + 0.2)
        return jnp.concatenate([out, -0.5 * out][:channels_out // x.shape[-1]], axis=-1)
    return fn


def _random_params(module, *inputs):
    """Every layer live (the zero-initialised output conv too): kernels ~ N(0, 1/fan_in), the rest small."""
    shapes = jax.eval_shape(lambda k: module.init(k, *inputs), jax.random.key(0))["params"]
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name, noise = path[-1].key, rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        return (1.0 if name == "scale" else 0.0) + 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


class TargetTest(parameterized.TestCase):

    @parameterized.parameters(("epsilon", "learned_range", True), ("epsilon", "learned_range", False),
                              ("v", "fixed_small", True))
    def test_target_is_two_teacher_ddim_steps(self, mean_type, var_type, clip):
        student, teacher = _grids()
        fn = _toy_teacher(2 if var_type == "learned_range" else 1)
        rng = np.random.default_rng(1)
        z = jnp.asarray(rng.standard_normal((8, 8, 8, 1)), jnp.float32)
        t = jnp.asarray([0, 1, 2, 3, 3, 2, 1, 0], jnp.int32)
        y = jnp.arange(8, dtype=jnp.int32)
        target = jax.jit(lambda z: distillation.two_step_target(
            student, teacher, fn, z, t, y, mean_type=mean_type, var_type=var_type, clip_denoised=clip))(z)

        def ddim(x, i):  # the teacher's DDIM sampler, one step at teacher index i
            return sampling.ddim_sample(teacher, fn, x, i, jnp.zeros_like(x), eta=0.0, mean_type=mean_type,
                                        var_type=var_type, clip_denoised=clip, y=y)[0]

        want = jax.jit(lambda z: ddim(ddim(z, 2 * t + 1), 2 * t))(z)
        np.testing.assert_allclose(target.z, want, rtol=1e-5, atol=1e-5)
        # x~ and v~ in float64: a student DDIM step with x_hat = x~ lands on z''.
        abar = np.asarray(student.alphas_cumprod, np.float64)[np.asarray(t)]
        prev = np.asarray(student.alphas_cumprod_prev, np.float64)[np.asarray(t)]
        a, s, a2, s2 = (np.sqrt(v)[:, None, None, None] for v in (abar, 1 - abar, prev, 1 - prev))
        x = np.asarray(target.x, np.float64)
        np.testing.assert_allclose(a2 * x + s2 / s * (np.asarray(z) - a * x), np.asarray(want), rtol=1e-4, atol=2e-4)
        np.testing.assert_allclose(np.asarray(target.v), (a * np.asarray(z) - x) / s, rtol=1e-4, atol=2e-4)

    def test_student_outputting_the_target_reproduces_the_teacher(self):
        # The parameterisation conversion: a v-student whose output is v~ takes, with the DDIM sampler on its
        # own N-step grid, the teacher's two steps in one, and has zero loss.
        student, teacher = _grids()
        fn = _toy_teacher(2)
        z = jnp.asarray(np.random.default_rng(2).standard_normal((4, 8, 8, 1)), jnp.float32)
        t = jnp.arange(4, dtype=jnp.int32)
        y = jnp.zeros((4,), jnp.int32)
        target = distillation.two_step_target(student, teacher, fn, z, t, y, mean_type="epsilon",
                                              var_type="learned_range")
        as_student = lambda x, ts, y: target.v  # the student "network", called once at (z, t)
        one, _ = sampling.ddim_sample(student, as_student, z, t, jnp.zeros_like(z), mean_type="v",
                                      var_type="fixed_small", clip_denoised=False)
        np.testing.assert_allclose(one, target.z, rtol=1e-5, atol=1e-5)
        loss, mse = distillation.distillation_loss(student, target.v, z, t, target)
        np.testing.assert_allclose(loss, 0.0, atol=1e-9)
        np.testing.assert_allclose(mse, 0.0, atol=1e-9)
        # Weighted x-space loss = max(alpha^2, sigma^2) * v-space MSE.
        loss, mse = distillation.distillation_loss(student, target.v + 0.1, z, t, target)
        abar = np.asarray(student.alphas_cumprod)[np.asarray(t)]
        np.testing.assert_allclose(loss, np.maximum(abar, 1 - abar) * np.asarray(mse), rtol=1e-4)

    def test_grids_nest(self):
        for total, n in ((T, 4), (1000, 32), (1000, 2)):
            big = sorted(schedules.distill_timesteps(total, 2 * n))
            self.assertEqual(big[1::2], sorted(schedules.distill_timesteps(total, n)))
            self.assertEqual(max(big), total - 1)
        distillation.check_nested(*_grids())
        with self.assertRaisesRegex(ValueError, "every other step"):
            distillation.check_nested(schedules.make_schedule("cosine", T, "4"), _grids()[1])

    def test_student_init_keeps_the_mean_half(self):
        teacher = kinds.build("unet", **dict(tiny.get_config().model.to_dict(), **SMALL))
        x, ts, y = jnp.ones((2, 8, 8, 1)) * 0.3, jnp.asarray([1, 7]), jnp.asarray([3, 10])
        params = _random_params(teacher, x, ts, y)
        student = kinds.build("unet", **dict(tiny.get_config().model.to_dict(), out_channels=1, **SMALL))
        shapes = jax.eval_shape(lambda k: student.init(k, x, ts, y), jax.random.key(0))["params"]
        init = distill.student_params(params, shapes)
        np.testing.assert_allclose(student.apply({"params": init}, x, ts, y),
                                   teacher.apply({"params": params}, x, ts, y)[..., :1], rtol=1e-5, atol=1e-6)


SMALL = dict(channel_mult=(1,), attention_resolutions=())  # tiny, one resolution: a quick compile


def _teacher_config():
    c = tiny.get_config()
    c.model.update(**SMALL)
    c.train.update(ema_rates=(0.9,))
    return c


def _write_teacher(workdir):
    """A tiny 'trained' teacher workdir: random (live) params as params and EMA, one orbax checkpoint."""
    config = _teacher_config()
    model = train_lib.make_model(config)
    x, ts = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    params = jax.tree.map(jnp.asarray, _random_params(model, x, ts, ts))
    schedule = train_lib.make_schedule(config)
    spec = train_lib.make_spec(config, schedule)
    tx, _ = train_steps.make_optimizer(num_steps=4, **config.optim.to_dict())
    state = train_steps.init_state(params, tx, spec)
    cfg = checkpoints.config_to_dict(config)
    manager = checkpoints.make_manager(workdir, keep=1, async_save=False)
    checkpoints.save(manager, 1, state, None, cfg)
    manager.wait_until_finished()
    manager.close()
    checkpoints.write_config(workdir, cfg)


def student_config(teacher_workdir, n=4, **overrides):
    c = tiny.get_config()
    c.model.update(out_channels=1, **SMALL)
    c.diffusion.update(mean_type="v", var_type="fixed_small", loss_type="mse", timestep_respacing=f"distill{n}")
    c.distill.update(teacher_workdir=teacher_workdir, teacher_steps=2 * n, teacher_mean_type="epsilon")
    c.train.update(num_steps=2, ema_rates=(0.9,), checkpoint_every=1, log_every=1)
    for dotted, value in overrides.items():
        group, key = dotted.split(".")
        c[group][key] = value
    return c


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A teacher workdir and a 2-step 8 -> 4 stage trained from it (shared by the stage tests)."""
    root = tmp_path_factory.mktemp("distill")
    teacher = str(root / "teacher")
    _write_teacher(teacher)
    student = str(root / "s4")
    metrics = train_lib.train_and_evaluate(student_config(teacher), student)
    return teacher, student, metrics


def test_stage_writes_a_workdir_sample_py_samples_in_n_steps(stage):
    teacher, student, metrics = stage
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    _, _, cfg = checkpoints.load_for_inference(student)
    assert cfg["checkpoint_step"] == 2 and cfg["distill"]["teacher_workdir"] == teacher
    opts = program.SampleOptions(num_samples=2, batch_size=8, progress=False, out=os.path.join(student, "s"))
    plan = program.make_plan(cfg, opts)
    assert plan.sampler.name == "ddim" and plan.sampler.eta == 0.0 and plan.mean_type == "v"
    np.testing.assert_array_equal(plan.schedule.timestep_map, sorted(schedules.distill_timesteps(T, 4)))
    npz, _ = program.run(student, opts, log=lambda s: None)
    assert np.load(npz)["arr_0"].shape == (2, 8, 8, 1)


def test_stage_resumes(stage, capsys):
    teacher, student, _ = stage
    metrics = train_lib.train_and_evaluate(student_config(teacher, **{"train.num_steps": 3}), student)
    assert "resumed from" in capsys.readouterr().out
    assert np.isfinite(metrics["loss"])
    assert checkpoints.load_for_inference(student)[2]["checkpoint_step"] == 3


@pytest.mark.parametrize("overrides, message", [
    ({"model.image_size": 16, "data.image_size": 16}, "model.image_size=8 but this config has 16"),
    ({"distill.teacher_mean_type": "v"}, "predicts mean_type='epsilon'"),
    ({"distill.teacher_steps": 4}, "each stage halves the grid"),
    ({"diffusion.mean_type": "epsilon"}, "v-parameterised"),
])
def test_bad_stages_are_refused_before_writing(stage, tmp_path, overrides, message):
    teacher = stage[0]
    workdir = str(tmp_path / "refused")
    with pytest.raises(ValueError, match=message):
        train_lib.train_and_evaluate(student_config(teacher, **overrides), workdir)
    assert not os.path.exists(workdir)


def test_student_of_a_student_must_halve(stage, tmp_path):
    _, student, _ = stage  # distilled to 4 steps: its student must be on 2, teacher_steps 4
    config = student_config(student, n=4, **{"distill.teacher_mean_type": "v"})
    with pytest.raises(UsageError, match="was distilled to 4 steps"):
        train_lib.train_and_evaluate(config, str(tmp_path / "s"))
    assert not os.path.exists(tmp_path / "s")


def test_missing_teacher_is_one_line_exit_2(tmp_path, capsys):
    # What train.py does with it (cli.run_main -> cli.handle): one line, exit status 2, nothing written.
    from configs import digits_distill

    workdir = str(tmp_path / "student")
    config = digits_distill.get_config("4")
    config.distill.teacher_workdir = str(tmp_path / "nothing")
    status = cli.handle(lambda: train_lib.train_and_evaluate(config, workdir), prog="train.py", verbose=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "no such directory" in err[0], err
    assert not os.path.exists(workdir)


if __name__ == "__main__":
    absltest.main()
