"""Training kind "clip": a noised CLIP pair (GLIDE Sec. 2.4) trained contrastively on captioned images.

Each step draws t uniformly over the (training) schedule and noise from
`fold_in(rng, step)` at global batch shape, noises the images,
x_t = q_sample(x_0, t, noise), and minimises CLIP's symmetric InfoNCE loss
(`objectives.clip_contrastive_loss`) between the image tower's embedding of
(x_t, t) and the text tower's embedding of each image's caption, with CLIP's
*learned* temperature (`models.clip_pair.ClipPair.scale`, clipped at 100).
The image tower gets the *original* timestep index `schedule.timestep_map[t]`
(GLIDE's noised CLIP indexes a table with it), whatever `rescale_timesteps`.

The loss couples every example of the batch, so the global batch is one
contrastive batch (no microbatches); under `jax.jit` over the mesh the
[B, B] logits span every device's rows.

`training.loop` calls `validate_config`, `init_params`, `CaptionBatcher` and
`clip_step` (through `steps.compile_step(step_fn=...)`) for kinds of role "clip".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import gaussian, objectives
from diffusion_jax.convert import kinds
from diffusion_jax.runtime import text_conditioning as tc
from diffusion_jax.runtime.cli import UsageError
from diffusion_jax.schedules import Schedule
from diffusion_jax.training import steps as train_steps


def validate_config(config) -> None:
    """Cross-field checks of a kind="clip" config, with the field to change in each message."""
    m, d, t = config.model, config.data, config.train
    pairs = [("model.image_size", m.image_size, "data.image_size", d.image_size),
             ("model.image_channels", m.image_channels, "data.channels", d.channels),
             ("model.text_ctx", m.text_ctx, "text.text_ctx", config.text.text_ctx)]
    for a, va, b, vb in pairs:
        if va != vb:
            raise UsageError(f"config.{a}={va} but config.{b}={vb}; set both to the same value")
    if m.image_size % m.patch_size:
        raise UsageError(f"config.model.image_size={m.image_size} is not a multiple of "
                         f"config.model.patch_size={m.patch_size}")
    if m.n_timestep < config.diffusion.diffusion_steps:
        raise UsageError(f"config.model.n_timestep={m.n_timestep} does not cover the {config.diffusion.diffusion_steps} "
                         "diffusion steps: set config.model.n_timestep=config.diffusion.diffusion_steps")
    if config.diffusion.schedule_sampler != "uniform":
        raise UsageError("a CLIP pair trains at uniform timesteps: set config.diffusion.schedule_sampler='uniform'")
    if t.microbatches != 1:
        raise UsageError("the contrastive loss couples the whole batch: config.train.microbatches must be 1")
    if t.eval_every:
        raise UsageError("config.train.eval_every > 0: bits/dim does not apply to a CLIP pair; set it to 0")
    tc.check_tokenizer_fits(tc.tokenizer_from_config(config), m.n_vocab)


class CaptionBatcher:
    """Host-side captions of a training batch -> {"tokens", "lens"}."""

    def __init__(self, tokenizer, text_ctx: int):
        self.tokenizer, self.text_ctx = tokenizer, text_ctx

    @classmethod
    def from_config(cls, config):
        return cls(tc.tokenizer_from_config(config), config.text.text_ctx) if kinds.get(config.kind).role == "clip" else None

    def __call__(self, batch: dict) -> dict:
        if "caption" not in batch:
            raise UsageError(f"a CLIP pair trains on captioned images but the batches hold {sorted(batch)}; use a "
                             "captioned dataset (e.g. config.data.name='digits')")
        return tc.clip_caption_tokens(self.tokenizer, batch["caption"], self.text_ctx)


def init_params(model, config, rng: jax.Array):
    """Parameters of a `ClipPair` from dummy inputs of the config's shapes."""
    m = config.model
    x = jnp.zeros((1, m.image_size, m.image_size, m.image_channels), jnp.float32)
    tokens = jnp.zeros((1, m.text_ctx), jnp.int32)
    return model.init({"params": rng}, x, jnp.zeros((1,), jnp.int32), tokens, jnp.ones((1,), jnp.int32))["params"]


def clip_step(state: train_steps.TrainState, batch: dict, rng: jax.Array, *, model, schedule: Schedule,
              spec: train_steps.StepSpec, tx, layout: train_steps.Layout | None = None):
    """One optimizer step of the contrastive loss on noised images; returns (state, metrics).

    Args:
      batch: {"image": [B, H, W, C] in [-1, 1], "tokens": int32 [B, L], "lens": int32 [B]}.
      rng: the run's base key; the step uses `fold_in(rng, state.step)`.

    Returns:
      (state, metrics) with loss, image_loss, text_loss, acc (image -> own caption
      retrieval in the batch), acc_q (acc per quarter of t) and logit_scale.
    """
    t_rng, noise_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    x_start = batch["image"]
    t, _ = spec.sampler.sample(state.sampler_state, t_rng, x_start.shape[0])
    noise = jax.random.normal(noise_rng, x_start.shape, jnp.float32)
    micro = dict(x_t=gaussian.q_sample(schedule, x_start, t, noise), t=schedule.timestep_map[t],
                 tokens=batch["tokens"], lens=batch["lens"])

    def loss_fn(params, mb):
        image, text, scale = model.apply({"params": params}, mb["x_t"], mb["t"], mb["tokens"], mb["lens"])
        terms = objectives.clip_contrastive_loss(image, text, scale)
        hits = jnp.argmax(image @ (text / jnp.linalg.norm(text, axis=-1, keepdims=True)).T, axis=1)
        return terms.loss, (terms, (hits == jnp.arange(hits.shape[0])).astype(jnp.float32), scale)

    (loss, (terms, hits, scale)), grads = train_steps._accumulate(loss_fn, state.params, micro, 1, layout)
    metrics = dict(loss=loss, image_loss=terms.image_loss, text_loss=terms.text_loss, acc=terms.accuracy,
                   acc_q=train_steps.quartile_means(hits, t, schedule.num_timesteps), logit_scale=scale)
    return train_steps._apply(state, grads, loss, metrics, tx=tx, spec=spec, sampler_state=state.sampler_state)
