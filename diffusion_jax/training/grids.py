"""Sample grids written during training, from the first EMA's params.

Uses the compiled samplers of `diffusion_jax.sampling` (one sampler in the
project); conditional models get `sample.num_per_class` samples per class,
one row per class, optionally with classifier-free guidance.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from diffusion_jax import sampling, schedules
from diffusion_jax.runtime import parallel


def grid_labels(num_classes: int | None, num_per_class: int) -> np.ndarray | None:
    if not num_classes:
        return None
    return np.repeat(np.arange(num_classes, dtype=np.int32), num_per_class)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 the way OpenAI's sample scripts do."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images: np.ndarray, path: str, nrow: int, min_size: int = 32) -> None:
    """uint8 [N, H, W, C] -> one PNG, `nrow` images per row, small images upscaled."""
    from PIL import Image

    n, h, w, c = images.shape
    ncol = -(-n // nrow)
    grid = np.full((ncol * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, nrow)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = max(1, min_size // h)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pil.save(path)


def write_grid(config, workdir: str, mesh, model, state, step: int) -> str | None:
    """Sample a grid with the EMA params and write `samples/step_XXXXXXX.png` (process 0)."""
    from diffusion_jax import guidance

    s = config.sample
    d = config.diffusion
    schedule = schedules.make_schedule(d.noise_schedule, d.diffusion_steps, s.timestep_respacing,
                                       d.rescale_timesteps)
    num_classes = config.model.num_classes
    labels = grid_labels(num_classes, s.num_per_class)
    n = len(labels) if labels is not None else 64
    n_dev = mesh.devices.size
    n_pad = -(-n // n_dev) * n_dev
    params = state.ema_params[0] if state.ema_params else state.params
    size, ch = config.model.image_size, config.model.in_channels

    def model_fn(x, t, y):
        return model.apply({"params": params}, x, t, y)

    fn = model_fn
    if labels is not None and s.cfg_scale and config.model.null_label:
        fn = guidance.classifier_free(model_fn, s.cfg_scale, null_label=num_classes)
    loop = sampling.ddim_sample_loop if s.use_ddim else sampling.p_sample_loop
    y = None if labels is None else jnp.asarray(np.pad(labels, (0, n_pad - n)))
    data = parallel.data_sharded(mesh)

    @jax.jit
    def run(rng, ids, y):
        return loop(rng, fn, schedule, (n_pad, size, size, ch), mean_type=d.mean_type, var_type=d.var_type,
                    y=y, sample_ids=ids)

    ids = parallel.put_global(mesh, np.arange(n_pad, dtype=np.int32), data.spec)
    y = None if y is None else parallel.put_global(mesh, y, data.spec)
    x = run(parallel.replicated_key(mesh, config.seed + 2), ids, y)
    images = to_uint8(multihost_utils.process_allgather(x, tiled=True))[:n]
    if not parallel.is_main_process():
        return None
    path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    save_grid(images, path, nrow=s.num_per_class if labels is not None else 8)
    return path


def write_text_grid(config, workdir: str, mesh, model, state, step: int) -> str | None:
    """GLIDE kinds: `sample.num_per_class` samples for each of `text.grid_prompts`, one row per prompt,
    guided with `sample.cfg_scale` when it is > 0 (EMA params; `samples/step_XXXXXXX.png`)."""
    from diffusion_jax.runtime import text_conditioning as tc

    s, d = config.sample, config.diffusion
    schedule = schedules.make_schedule(d.noise_schedule, d.diffusion_steps, s.timestep_respacing,
                                       d.rescale_timesteps)
    tokenizer = tc.tokenizer_from_config(config)
    prompts = np.repeat(np.asarray(config.text.grid_prompts, np.str_), s.num_per_class)
    n = len(prompts)
    n_pad = -(-n // mesh.devices.size) * mesh.devices.size
    cond = tc.caption_batch(tokenizer, np.pad(prompts, (0, n_pad - n), mode="edge"), config.text.text_ctx)
    null = tc.null_caption(tokenizer, config.text.text_ctx)
    params = state.ema_params[0] if state.ema_params else state.params
    size, ch = config.model.image_size, config.data.channels
    loop = sampling.ddim_sample_loop if s.use_ddim else sampling.p_sample_loop
    scale = float(s.cfg_scale) if s.cfg_scale else None

    @jax.jit
    def run(params, rng, ids, tokens, mask):
        fn, y = tc.text_model_fn(model, params, tokens, mask, null=null, cfg_scale=scale)
        return loop(rng, fn, schedule, (n_pad, size, size, ch), mean_type=d.mean_type, var_type=d.var_type,
                    y=y, sample_ids=ids)

    data = parallel.data_sharded(mesh)
    put = lambda a: jax.device_put(jnp.asarray(a), data)
    x = run(params, jax.random.key(config.seed + 2), put(np.arange(n_pad, dtype=np.int32)), put(cond["tokens"]),
            put(cond["mask"]))
    images = to_uint8(multihost_utils.process_allgather(x, tiled=True))[:n]
    if not parallel.is_main_process():
        return None
    path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    save_grid(images, path, nrow=s.num_per_class)
    return path
