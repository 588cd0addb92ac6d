"""Periodic evaluation during training on the test split.

Diffusion models: an unbiased importance-sampled estimate of test bits/dim
(`evaluation.nll.make_nll_estimator`, `train.eval_timesteps` timesteps per
example) from the first EMA's params.  Noisy classifiers: validation loss and
acc@1/acc@5 on inputs noised at uniformly drawn t, as guided-diffusion's
classifier_train does.
"""

from __future__ import annotations

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import gaussian, schedules
from diffusion_jax.convert import kinds
from diffusion_jax.runtime import parallel
from diffusion_jax.training import steps as train_steps
from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import nll


class Evaluator:
    """Built once per run; `__call__(state) -> metrics dict` (every process calls it)."""

    def __init__(self, config, mesh, model):
        self.config, self.mesh, self.model = config, mesh, model
        d = config.diffusion
        self.schedule = schedules.make_schedule(d.noise_schedule, d.diffusion_steps, d.timestep_respacing,
                                                d.rescale_timesteps)
        n_dev = mesh.devices.size
        batch = -(-min(config.train.eval_examples, config.train.batch_size) // n_dev) * n_dev
        source = pipeline.make_source(config.data.name, config.data.eval_split, data_dir=config.data.data_dir)
        stop = min(len(source), config.train.eval_examples)
        it = pipeline.make_eval_iterator(source, batch_size=batch, image_size=config.data.image_size,
                                         channels=config.data.channels, start=0, stop=stop)
        self.batches = [parallel.global_batch(mesh, {k: b[k] for k in ("image", "label", "index", "valid")})
                        for b in it]
        self.rng = jax.random.key(config.seed + 3)  # fixed: the estimate is comparable across steps
        if kinds.get(config.kind).role == "classifier":
            self._fn = jax.jit(self._classifier_metrics)
        else:
            apply_fn = nll.module_apply(model)
            self._fn = nll.make_nll_estimator(apply_fn, self.schedule, mean_type=d.mean_type, var_type=d.var_type,
                                              num_draws=config.train.eval_timesteps,
                                              class_cond=config.model.num_classes is not None, mesh=mesh)

    def _classifier_metrics(self, params, batch, rng):
        x0 = batch["image"]
        rng = jax.random.fold_in(rng, batch["index"][0])
        t_rng, n_rng = jax.random.split(rng)
        t = jax.random.randint(t_rng, x0.shape[:1], 0, self.schedule.num_timesteps)
        x_t = gaussian.q_sample(self.schedule, x0, t, jax.random.normal(n_rng, x0.shape))
        logits = self.model.apply({"params": params}, x_t, self.schedule.model_timesteps(t))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        acc1, acc5 = train_steps.topk_accuracy(logits, batch["label"])
        return jnp.stack([ce, acc1, acc5], axis=-1)

    def __call__(self, state) -> dict:
        params = state.ema_params[0] if state.ema_params else state.params
        rows, valid = [], []
        for batch in self.batches:
            rows.append(np.asarray(jax.experimental.multihost_utils.process_allgather(
                self._fn(params, batch, self.rng), tiled=True)))
            valid.append(np.asarray(jax.experimental.multihost_utils.process_allgather(batch["valid"], tiled=True)))
        values = np.concatenate(rows)[np.concatenate(valid)]
        if kinds.get(self.config.kind).role == "classifier":
            return {"val_loss": float(values[:, 0].mean()), "val_acc1": float(values[:, 1].mean()),
                    "val_acc5": float(values[:, 2].mean())}
        return {"test_bpd_estimate": float(values.mean()),
                "test_bpd_stderr": float(values.std(ddof=1) / np.sqrt(len(values)))}
