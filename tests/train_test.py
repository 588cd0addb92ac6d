"""Training: data-parallel equivalence, exact resume, guards, end-to-end runs."""
import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from configs import tiny
from diffusion_jax.runtime import checkpoints
from diffusion_jax.runtime import parallel
from diffusion_jax.training import loop as train_lib
from diffusion_jax.training import steps as train_steps


def _tmpdir():
    import tempfile
    return tempfile.mkdtemp(prefix="train_test_")


def _tiny(**overrides):
    c = tiny.get_config()
    for dotted, value in overrides.items():
        group, key = dotted.split(".")
        c[group][key] = value
    return c


def _setup(config, num_devices):
    mesh = parallel.make_mesh(num_devices)
    schedule = train_lib.make_schedule(config)
    spec = train_lib.make_spec(config, schedule)
    model = train_lib.make_model(config)
    tx, _ = train_steps.make_optimizer(num_steps=config.train.num_steps, **config.optim.to_dict())
    init = jax.jit(lambda k: train_steps.init_state(train_lib.init_params(model, config, k), tx, spec),
                   out_shardings=parallel.replicated(mesh))
    state = init(jax.random.key(0))
    step = train_steps.compile_step(mesh, model=model, schedule=schedule, spec=spec, tx=tx)
    return mesh, state, step


def _batches(n, batch_size, seed=0):
    rng = np.random.RandomState(seed)
    return [dict(image=rng.uniform(-1, 1, (batch_size, 8, 8, 1)).astype(np.float32),
                 label=rng.randint(0, 10, batch_size).astype(np.int32)) for _ in range(n)]


def _run(config, num_devices, batches):
    mesh, state, step = _setup(config, num_devices)
    rng = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
    losses = []
    for b in batches:
        state, metrics = step(state, parallel.global_batch(mesh, b), rng)
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state)


class DataParallelTest(parameterized.TestCase):

    @parameterized.parameters("uniform", "loss-second-moment")
    def test_eight_devices_match_one(self, sampler):
        # SGD-like comparison is not needed: gradients are averaged over the
        # global batch either way; only the reduction order differs.
        config = _tiny(**{"diffusion.schedule_sampler": sampler, "optim.lr": 1e-4})
        batches = _batches(3, 8)
        l1, s1 = _run(config, 1, batches)
        l8, s8 = _run(config, 8, batches)
        np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(s8.params, s1.params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(s8.ema_params, s1.ema_params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(s8.sampler_state, s1.sampler_state, rtol=1e-5, atol=1e-6)

    def test_gradient_accumulation_averages(self):
        batches = _batches(2, 8)
        l1, s1 = _run(_tiny(**{"optim.lr": 1e-4}), 2, batches)
        l2, s2 = _run(_tiny(**{"optim.lr": 1e-4, "train.microbatches": 2}), 2, batches)
        # Same t/noise/labels; only dropout keys (dropout is 0 here) and sums differ.
        np.testing.assert_allclose(l2, l1, rtol=1e-5)
        chex.assert_trees_all_close(s2.params, s1.params, rtol=1e-4, atol=1e-6)

    def test_step_compiles_once(self):
        config = _tiny()
        mesh, state, step = _setup(config, 2)
        rng = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
        counted = chex.assert_max_traces(n=1)(train_steps.diffusion_step)
        schedule = train_lib.make_schedule(config)
        spec = train_lib.make_spec(config, schedule)
        tx, _ = train_steps.make_optimizer(num_steps=4, **config.optim.to_dict())
        fn = jax.jit(functools.partial(counted, model=train_lib.make_model(config), schedule=schedule, spec=spec,
                                       tx=tx), donate_argnums=0)
        for b in _batches(3, 8):
            state, _ = fn(state, parallel.global_batch(mesh, b), rng)

    def test_non_finite_step_is_recorded_and_changes_nothing(self):
        config = _tiny()
        mesh, state, step = _setup(config, 1)
        rng = jax.random.key(1)
        before = jax.device_get(state.params)
        bad = _batches(1, 8)[0]
        bad["image"][0, 0, 0, 0] = np.nan
        state, _ = step(state, parallel.global_batch(mesh, bad), rng)
        self.assertEqual(int(state.first_nonfinite), 0)
        self.assertEqual(int(state.step), 1)
        chex.assert_trees_all_equal(jax.device_get(state.params), before)
        with pytest.raises(train_lib.NonFiniteError, match="non-finite loss or gradients at step 0.*step 7"):
            train_lib._check_finite(state, 7)

    def test_null_label_dropout(self):
        labels = jnp.arange(1000) % 10
        dropped = train_steps.drop_labels(jax.random.key(0), labels, 0.25, 10)
        frac = float(jnp.mean(dropped == 10))
        self.assertBetween(frac, 0.2, 0.3)
        np.testing.assert_array_equal(np.where(dropped != 10, dropped, labels), labels)


class EndToEndTest(parameterized.TestCase):

    def test_resume_equals_uninterrupted(self):
        base = {"diffusion.schedule_sampler": "loss-second-moment", "train.num_steps": 4,
                "train.checkpoint_every": 2}
        straight = _tmpdir()
        train_lib.train_and_evaluate(_tiny(**base), straight)
        split = _tmpdir()
        train_lib.train_and_evaluate(_tiny(**dict(base, **{"train.num_steps": 2})), split)
        train_lib.train_and_evaluate(_tiny(**base), split)
        lines = lambda d: [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
        a = {r["step"]: r["loss"] for r in lines(straight)}
        b = {r["step"]: r["loss"] for r in lines(split)}
        self.assertEqual(sorted(b), [1, 2, 3, 4])
        for s in (3, 4):
            self.assertAlmostEqual(a[s], b[s], places=6)
        _, pa, _ = checkpoints.load_for_inference(straight)
        _, pb, _ = checkpoints.load_for_inference(split)
        chex.assert_trees_all_close(pa, pb, rtol=1e-6, atol=1e-7)
        self.assertTrue(os.path.exists(os.path.join(split, "samples", "step_0000004.png")))

    def test_config_mismatch_is_refused(self):
        workdir = _tmpdir()
        train_lib.train_and_evaluate(_tiny(**{"train.num_steps": 2}), workdir)
        with pytest.raises(checkpoints.WorkdirMismatchError, match="model.model_channels: checkpoint has 32"):
            train_lib.train_and_evaluate(_tiny(**{"model.model_channels": 64}), workdir)

    def test_truncated_checkpoint_falls_back(self):
        workdir = _tmpdir()
        train_lib.train_and_evaluate(_tiny(**{"train.num_steps": 4}), workdir)
        # Corrupt the newest step: truncate every file of its state.
        state_dir = os.path.join(workdir, "checkpoints", "4", "state")
        for root, _, files in os.walk(state_dir):
            for f in files:
                open(os.path.join(root, f), "w").close()
        train_lib.train_and_evaluate(_tiny(**{"train.num_steps": 5}), workdir)
        steps = [json.loads(x)["step"] for x in open(os.path.join(workdir, "metrics.jsonl"))]
        # Resumed from step 2 (rows 3, 4 of the first run trimmed, each step once); step 4 moved aside.
        self.assertEqual(steps, [1, 2, 3, 4, 5])
        self.assertTrue(os.listdir(os.path.join(workdir, "checkpoints", "corrupt")))

    @parameterized.parameters(
        ({"data.image_size": 16}, "config.model.image_size=8 but config.data.image_size=16"),
        ({"model.out_channels": 1}, "needs 2"),
        ({"train.batch_size": 7}, "not divisible by the 8 devices"),
        ({"model.null_label": False}, "null-label dropout"),
    )
    def test_bad_config(self, overrides, message):
        with pytest.raises(ValueError, match=message):
            train_lib.train_and_evaluate(_tiny(**overrides), _tmpdir())

    def test_classifier_trains(self):
        from configs import digits_classifier
        c = digits_classifier.get_config()
        c.model.update(model_channels=32, num_res_blocks=1)
        c.diffusion.update(diffusion_steps=10)
        c.train.update(batch_size=8, num_steps=2, log_every=1, checkpoint_every=2, eval_every=0)
        workdir = _tmpdir()
        train_lib.train_and_evaluate(c, workdir)
        rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
        self.assertIn("acc1", rows[-1])
        self.assertIn("loss_q3", rows[-1])


class GridTest(parameterized.TestCase):

    def test_grid_sampler_compiles_once_per_run(self):
        from diffusion_jax.generation import engine
        from diffusion_jax.training import grids

        config = _tiny()
        mesh, state, _ = _setup(config, 2)
        job = grids.class_grid(config, train_lib.make_model(config))
        workdir = _tmpdir()
        for step in (1, 2):
            grids.write(job, config, workdir, mesh, state, step)
            self.assertTrue(os.path.exists(os.path.join(workdir, "samples", f"step_{step:07d}.png")))
        jitted = engine._compile(job.sample_fn, jax.random.key_impl(jax.random.key(0)), parallel.data_sharded(mesh))
        self.assertEqual(jitted._cache_size(), 1)
