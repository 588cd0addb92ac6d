"""Sample grids written during training, from the first EMA's params.

Sampling goes through `generation.engine` with the loop from
`generation.samplers` (`sample.sampler`, or `sample.use_ddim`), and the PNG
through `generation.images`.  Class-conditional models get
`sample.num_per_class` samples per class, one row per class, optionally with
classifier-free guidance; GLIDE kinds one row per `text.grid_prompts` entry.
Sample i draws its noise from `fold_in(key(seed + 2), i)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from diffusion_jax import guidance, schedules
from diffusion_jax.generation import engine, images, samplers
from diffusion_jax.runtime import parallel


def grid_labels(num_classes: int | None, num_per_class: int) -> np.ndarray | None:
    """int32 `[num_classes * num_per_class]`: each class repeated, in order (None if unconditional)."""
    if not num_classes:
        return None
    return np.repeat(np.arange(num_classes, dtype=np.int32), num_per_class)


def _setup(config):
    s, d = config.sample, config.diffusion
    schedule = schedules.make_schedule(d.noise_schedule, d.diffusion_steps, s.timestep_respacing,
                                       d.rescale_timesteps)
    choice = samplers.choose(s.get("sampler"), use_ddim=bool(s.use_ddim), flag="config.sample.sampler")
    loop = samplers.make_loop(choice)
    sample = lambda rng, model_fn, shape, ids, y: loop(rng, model_fn, schedule, shape, mean_type=d.mean_type,
                                                       var_type=d.var_type, y=y, sample_ids=ids)
    return sample


class GridJob(NamedTuple):
    """A run's sample grid, built once: the engine compiles `sample_fn` at the first write only."""
    sample_fn: Callable  # (params, rng, ids, cond) -> x in [-1, 1]
    conditioning: Any  # labels [N], caption pytree, or None
    num: int  # N samples
    nrow: int  # images per grid row


def class_grid(config, model) -> GridJob:
    """Class-conditional (or unconditional) U-Nets: `sample.num_per_class` per class, one row per class,
    classifier-free guided with `sample.cfg_scale` when the model has a null label; else 64 samples."""
    s = config.sample
    num_classes = config.model.num_classes
    labels = grid_labels(num_classes, s.num_per_class)
    size, ch = config.model.image_size, config.model.in_channels
    guided = labels is not None and s.cfg_scale and config.model.null_label
    sample = _setup(config)

    def sample_fn(params, rng, ids, y):
        def model_fn(x, t, yy):
            return model.apply({"params": params}, x, t, yy)

        fn = guidance.classifier_free(model_fn, s.cfg_scale, null_label=num_classes) if guided else model_fn
        return sample(rng, fn, (ids.shape[0], size, size, ch), ids, y)

    if labels is None:
        return GridJob(sample_fn, None, 64, 8)
    return GridJob(sample_fn, labels, len(labels), s.num_per_class)


def text_grid(config, model) -> GridJob:
    """GLIDE kinds: `sample.num_per_class` samples for each of `text.grid_prompts`, one row per prompt,
    guided with `sample.cfg_scale` when it is > 0."""
    from diffusion_jax.runtime import text_conditioning as tc

    s = config.sample
    tokenizer = tc.tokenizer_from_config(config)
    prompts = np.repeat(np.asarray(config.text.grid_prompts, np.str_), s.num_per_class)
    cond = tc.caption_batch(tokenizer, prompts, config.text.text_ctx)
    null = tc.null_caption(tokenizer, config.text.text_ctx)
    size, ch = config.model.image_size, config.data.channels
    scale = float(s.cfg_scale) if s.cfg_scale else None
    sample = _setup(config)

    def sample_fn(params, rng, ids, c):
        fn, y = tc.text_model_fn(model, params, c["tokens"], c["mask"], null=null, cfg_scale=scale)
        return sample(rng, fn, (ids.shape[0], size, size, ch), ids, y)

    return GridJob(sample_fn, cond, len(prompts), s.num_per_class)


def write(job: GridJob, config, workdir: str, mesh, state, step: int) -> str | None:
    """Sample `job` with the first EMA's params and write `samples/step_XXXXXXX.png` (process 0)."""
    params = state.ema_params[0] if state.ema_params else state.params
    out = engine.generate(job.sample_fn, job.num, batch_size=job.num, rng=jax.random.key(config.seed + 2),
                          args=params, conditioning=job.conditioning, mesh=mesh, log=None)
    if not parallel.is_main_process():
        return None
    return images.write_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"),
                            images.image_grid(out.images, nrow=job.nrow))
