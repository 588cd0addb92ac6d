"""FSDP: sharded params / optimizer state / EMAs train exactly like the replicated run."""
import functools

import chex
import jax
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

from diffusion_jax.runtime import checkpoints, parallel
from diffusion_jax.training import loop as train_lib
from diffusion_jax.training import steps as train_steps
from tests import train_test


def _setup(config, fsdp, *, sgd=False, min_size=2**10):
    mesh = parallel.make_mesh(8, fsdp=fsdp)
    schedule = train_lib.make_schedule(config)
    spec = train_lib.make_spec(config, schedule)
    model = train_lib.make_model(config)
    tx = optax.sgd(1e-2) if sgd else train_steps.make_optimizer(num_steps=4, **config.optim.to_dict())[0]
    make = lambda k: train_steps.init_state(train_lib.init_params(model, config, k), tx, spec)  # noqa: E731
    state = train_steps.create_state(mesh, make, jax.random.key(0), min_size=min_size)
    sharding = train_steps.state_shardings(mesh, state, min_size=min_size)
    step = train_steps.compile_step(mesh, model=model, schedule=schedule, spec=spec, tx=tx, state_sharding=sharding)
    return mesh, state, step


def _largest(tree):
    return max(jax.tree.leaves(tree), key=lambda x: x.size)


def _run(config, fsdp, batches, **kw):
    mesh, state, step = _setup(config, fsdp, **kw)
    rng = parallel.replicated_key(mesh, 1)
    losses = []
    for b in batches:
        state, metrics = step(state, parallel.global_batch(mesh, b), rng)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


class ShardingRuleTest(parameterized.TestCase):

    @parameterized.parameters(
        ((3, 3, 32, 64), 4, P(None, None, None, "fsdp")),  # Largest divisible axis.
        ((64, 32), 4, P("fsdp")),
        ((3, 3, 6, 6), 4, P()),  # Nothing divisible.
        ((16,), 4, P()),  # Under the size threshold.
        ((3, 3, 32, 32), 4, P(None, None, None, "fsdp")),  # Ties: the last axis.
        ((3, 3, 32, 64), 1, P()),
    )
    def test_rule(self, shape, fsdp, want):
        self.assertEqual(parallel.fsdp_spec(shape, fsdp, min_size=64), want)

    def test_fsdp_must_divide_devices(self):
        with pytest.raises(ValueError, match=r"fsdp=3 does not divide the 8 devices.*\[1, 2, 4, 8\]"):
            parallel.make_mesh(8, fsdp=3)

    def test_batch_must_divide_mesh(self):
        mesh = parallel.make_mesh(8, fsdp=4)
        with pytest.raises(ValueError, match=r"12 is not divisible by the 8 devices.*data=2 x fsdp=4"):
            parallel.check_batch_divisible(12, mesh, "config.train.batch_size")

    def test_batch_splits_over_both_axes(self):
        mesh = parallel.make_mesh(8, fsdp=2)
        self.assertEqual(dict(mesh.shape), {"data": 4, "fsdp": 2})
        x = parallel.global_batch(mesh, {"image": np.arange(16, dtype=np.float32)})["image"]
        self.assertEqual({s.data.shape for s in x.addressable_shards}, {(2,)})


class FsdpTrainTest(parameterized.TestCase):

    @parameterized.parameters(2, 8)
    def test_losses_and_params_match_replicated(self, fsdp):
        # SGD: Adam's normalisation would amplify reduction-order noise in tiny gradients.
        config = train_test._tiny(**{"diffusion.schedule_sampler": "loss-second-moment"})
        batches = train_test._batches(3, 8)
        l1, s1 = _run(config, 1, batches, sgd=True)
        lf, sf = _run(config, fsdp, batches, sgd=True)
        np.testing.assert_allclose(lf, l1, rtol=1e-5, atol=1e-6)
        got, want = jax.device_get(sf), jax.device_get(s1)
        chex.assert_trees_all_close(got.params, want.params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(got.ema_params, want.ema_params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(got.sampler_state, want.sampler_state, rtol=1e-5, atol=1e-6)

    def test_adam_losses_match(self):
        config = train_test._tiny(**{"optim.lr": 1e-4, "train.microbatches": 2})
        batches = train_test._batches(3, 8)
        l1, _ = _run(config, 1, batches)
        l4, _ = _run(config, 4, batches)
        np.testing.assert_allclose(l4, l1, rtol=1e-5, atol=1e-6)

    def test_state_bytes_drop_by_fsdp(self):
        config = train_test._tiny()
        per_device = {}
        for fsdp in (1, 2, 8):
            _, state, _ = _setup(config, fsdp)
            per_device[fsdp] = parallel.per_device_bytes((state.params, state.opt_state, state.ema_params))
            self.assertEqual(_largest(state.params).sharding.spec != P(), fsdp > 1)
        for fsdp in (2, 8):  # Small leaves (biases, norms) stay replicated: allow 15 % of slack.
            ratio = per_device[1] / per_device[fsdp]
            self.assertBetween(ratio, 0.85 * fsdp, fsdp)

    def test_step_compiles_once(self):
        config = train_test._tiny()
        mesh, state, _ = _setup(config, 4)
        schedule = train_lib.make_schedule(config)
        spec = train_lib.make_spec(config, schedule)
        tx, _ = train_steps.make_optimizer(num_steps=4, **config.optim.to_dict())
        sharding = train_steps.state_shardings(mesh, state, min_size=2**10)
        layout = train_steps.Layout(parallel.replicated(mesh), sharding.params)
        counted = chex.assert_max_traces(n=1)(train_steps.diffusion_step)
        fn = jax.jit(functools.partial(counted, model=train_lib.make_model(config), schedule=schedule, spec=spec,
                                       tx=tx, layout=layout),
                     in_shardings=(sharding, parallel.data_sharded(mesh), parallel.replicated(mesh)),
                     out_shardings=(sharding, parallel.replicated(mesh)), donate_argnums=0)
        rng = parallel.replicated_key(mesh, 1)
        for b in train_test._batches(3, 8):
            state, _ = fn(state, parallel.global_batch(mesh, b), rng)
        same = jax.tree.map(lambda x, want: x.sharding.is_equivalent_to(want, x.ndim), state.params, sharding.params)
        self.assertTrue(all(jax.tree.leaves(same)))


class FsdpCheckpointTest(parameterized.TestCase):

    def test_restore_onto_other_fsdp_and_one_device(self):
        config = train_test._tiny()
        _, state, step = _setup(config, 4)
        directory = train_test._tmpdir()
        manager = checkpoints.make_manager(directory, keep=2, async_save=False)
        checkpoints.save(manager, 0, state, None, {"kind": "unet"})
        manager.wait_until_finished()
        want = jax.device_get(state)
        _, template, _ = _setup(config, 2)
        restored, at = checkpoints.restore_latest(manager, template, None)
        self.assertEqual(at, 0)
        self.assertEqual(_largest(restored.params).sharding, _largest(template.params).sharding)
        self.assertNotEqual(_largest(restored.params).sharding, _largest(state.params).sharding)
        chex.assert_trees_all_equal(jax.device_get(restored), want)
        one = checkpoints._restore_state_on_one_device(f"{manager.directory}/0/state")
        chex.assert_trees_all_equal(jax.device_get(one["params"]), want.params)
