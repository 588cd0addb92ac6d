"""The train state, the optimizer and the compiled data-parallel train steps.

One step = one optimizer update on a global batch: timesteps, noise and label
(or caption) dropout drawn at global batch shape from `fold_in(rng, step)` (so the result
does not depend on the device count), optional gradient accumulation over
microbatches (averaged), AdamW, one EMA per rate, the importance-sampler
history, and a non-finite guard that records the first bad step.

Sharding: the batch is split over every device; the state is replicated, or
with FSDP (`state_shardings` on a mesh whose 'fsdp' axis is > 1) its
parameters, Adam moments and EMAs are split leaf by leaf.  The step then
all-gathers the parameters for the forward/backward pass (`_gather`) and
constrains the gradients back to the parameters' layout (`_scatter`: XLA's
reduce-scatter), so the update and the EMAs run on 1/fsdp of each leaf.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from diffusion_jax import gaussian, objectives
from diffusion_jax.convert import kinds
from diffusion_jax.data import conditioning
from diffusion_jax.runtime import parallel
from diffusion_jax.schedules import Schedule


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    ema_params: tuple  # one params tree per EMA rate
    sampler_state: Any  # timestep-sampler state (loss history for importance sampling)
    first_nonfinite: jax.Array  # int32 scalar: first step with a non-finite loss/grad, -1 if none


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static settings of a train step (hashable)."""

    kind: str  # "unet" | "super_res" | "classifier" | a GLIDE kind
    mean_type: str
    var_type: str
    loss_type: str
    sampler: Any  # objectives.UniformSampler | LossSecondMomentSampler
    snr_gamma: float = 0.0  # min-SNR-gamma weight of the MSE term (objectives.training_losses); 0 = off
    ema_rates: tuple = ()
    ema_warmup: bool = False  # rate_t = min(rate, (1 + step) / (10 + step)): short runs forget the init
    microbatches: int = 1
    num_classes: int | None = None
    null_label: bool = False
    p_uncond: float = 0.0
    text: bool = False  # GLIDE kinds: batches carry "tokens"/"mask" (and "low_res" for upsamplers).
    inpaint: bool = False  # GLIDE inpainting kinds: random masks per example (data.conditioning).
    end_token: int = 0  # The tokenizer's padding id: the null caption is all end tokens, mask all False.


def learning_rate_schedule(lr: float, warmup_steps: int, anneal: bool, num_steps: int):
    """Linear warm-up to `lr`, then constant or a linear anneal to 0 at `num_steps`."""
    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (count + 1) / max(warmup_steps, 1)) if warmup_steps else 1.0
        decay = jnp.maximum(0.0, 1.0 - count / max(num_steps, 1)) if anneal else 1.0
        return lr * warm * decay
    return schedule


def make_optimizer(*, lr, weight_decay, b1, b2, eps, warmup_steps, anneal, grad_clip, num_steps):
    """optax AdamW with optional global-norm clipping and the schedule above."""
    schedule = learning_rate_schedule(lr, warmup_steps, anneal, num_steps)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip else adamw
    return tx, schedule


class Layout(NamedTuple):
    """Where the parameters live inside an FSDP step (None layout: replicated state)."""

    gathered: Any  # NamedSharding P(): the parameters as the model sees them.
    params: Any  # tree of NamedSharding like the params: their stored (split) layout.


def _gather(params, layout: Layout | None):
    """All-gather split parameters for compute (its transpose reduce-scatters the gradients)."""
    return params if layout is None else jax.lax.with_sharding_constraint(params, layout.gathered)


def _scatter(grads, layout: Layout | None):
    return grads if layout is None else jax.lax.with_sharding_constraint(grads, layout.params)


def init_state(params, tx, spec: StepSpec) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        # Copies, not aliases: donating the state twice would fail otherwise.
        ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in spec.ema_rates),
        sampler_state=spec.sampler.init(), first_nonfinite=jnp.full((), -1, jnp.int32))


def quartile_means(values: jax.Array, t: jax.Array, num_timesteps: int) -> jax.Array:
    """Mean of `values` within each quarter of [0, K) by t, `[4]` (NaN if empty); OpenAI's `_q0.._q3`."""
    q = jnp.minimum((4 * t) // num_timesteps, 3)
    sums = jax.ops.segment_sum(values.astype(jnp.float32), q, num_segments=4)
    counts = jax.ops.segment_sum(jnp.ones_like(values, jnp.float32), q, num_segments=4)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), jnp.nan)


def drop_labels(rng: jax.Array, labels: jax.Array, p_uncond: float, null_label: int) -> jax.Array:
    """Replace each label by the null label with probability p_uncond (Ho & Salimans 2021)."""
    if p_uncond <= 0:
        return labels
    drop = jax.random.bernoulli(rng, p_uncond, labels.shape)
    return jnp.where(drop, null_label, labels)


def drop_captions(rng: jax.Array, tokens: jax.Array, mask: jax.Array, p_uncond: float, *,
                  end_token: int) -> tuple[jax.Array, jax.Array]:
    """Replace each caption by the empty one with probability p_uncond (GLIDE's CFG training).

    Args:
      tokens: int [B, L]; mask: bool [B, L] (False = padding).
      end_token: the padding id; the empty caption is `end_token` everywhere with mask all False,
        the same row `text_conditioning.null_caption` gives `guidance.classifier_free`.

    Returns:
      (tokens, mask) with dropped rows replaced.
    """
    if p_uncond <= 0:
        return tokens, mask
    drop = jax.random.bernoulli(rng, p_uncond, tokens.shape[:1])[:, None]
    return (jnp.where(drop, jnp.asarray(end_token, tokens.dtype), tokens),
            jnp.where(drop, False, mask))


def _apply_model(model, params, x_t, timesteps, mb: dict, rngs: dict, *, text: bool):
    """The network on a microbatch: `y` positionally (class labels; after `low_res` for
    super-resolution U-Nets), or GLIDE's keyword inputs."""
    if not text:
        lr = (mb["low_res"],) if "low_res" in mb else ()
        return model.apply({"params": params}, x_t, timesteps, *lr, mb.get("y"), train=True, rngs=rngs)
    kw = dict(mb["y"])
    for name in ("low_res", "inpaint_image", "inpaint_mask"):
        if name in mb:
            kw[name] = mb[name]
    return model.apply({"params": params}, x_t, timesteps, train=True, rngs=rngs, **kw)


def _split_micro(tree, m: int):
    """[B, ...] -> [m, B/m, ...] taking strided rows, so each device's rows split evenly."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1), tree)


def _accumulate(loss_fn, params, micro: dict, m: int, layout: Layout | None = None):
    """Average gradients (and aux) of `loss_fn` over m microbatches (gradients in `layout`)."""
    grad_fn = jax.value_and_grad(lambda p, mb: loss_fn(_gather(p, layout), mb), has_aux=True)
    if m == 1:
        out, grads = grad_fn(params, micro)
        return out, _scatter(grads, layout)
    chunks = _split_micro(micro, m)

    def body(acc, chunk):
        (loss, aux), grads = grad_fn(params, chunk)
        acc = jax.tree.map(lambda a, g: a + g / m, acc, _scatter(grads, layout))
        return acc, (loss, aux)

    zeros = _scatter(jax.tree.map(jnp.zeros_like, params), layout)
    grads, (losses, auxes) = jax.lax.scan(body, zeros, chunks)
    # aux entries are per-example [m, B/m]: undo the strided split.
    aux = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), auxes)
    return (jnp.mean(losses), aux), grads


def _diffusion_inputs(state: TrainState, batch: dict, rng, *, schedule: Schedule, spec: StepSpec,
                      mask_rng) -> tuple[dict, jax.Array]:
    """Everything random, drawn at global batch shape: t, weights, noise, x_t, labels (, masks)."""
    t_rng, noise_rng, label_rng, drop_rng = jax.random.split(rng, 4)
    x_start = batch["image"]
    t, weights = spec.sampler.sample(state.sampler_state, t_rng, x_start.shape[0])
    noise = jax.random.normal(noise_rng, x_start.shape, jnp.float32)
    micro = dict(x_start=x_start, t=t, weights=weights, noise=noise,
                 x_t=gaussian.q_sample(schedule, x_start, t, noise))
    if spec.text:
        tokens, mask = drop_captions(label_rng, batch["tokens"], batch["mask"], spec.p_uncond,
                                     end_token=spec.end_token)
        micro["y"] = {"tokens": tokens, "mask": mask}
    elif spec.num_classes is not None:
        micro["y"] = drop_labels(label_rng, batch["label"], spec.p_uncond if spec.null_label else 0.0,
                                 spec.num_classes)
    if "low_res" in batch:
        micro["low_res"] = batch["low_res"]
    if spec.inpaint:  # GLIDE: the model sees image * mask and the mask; example k of step s is s * B + k.
        b, h, w = x_start.shape[:3]
        micro["inpaint_image"] = x_start
        ids = state.step.astype(jnp.uint32) * b + jnp.arange(b, dtype=jnp.uint32)  # uint32, as fold_in takes
        micro["inpaint_mask"] = conditioning.inpaint_masks(mask_rng, ids, h, w)
    return micro, drop_rng


def diffusion_step(state: TrainState, batch: dict, rng: jax.Array, *, model, schedule: Schedule,
                   spec: StepSpec, tx, layout: Layout | None = None) -> tuple[TrainState, dict]:
    """One optimizer step of the diffusion objective; returns (state, metrics)."""
    mask_rng = jax.random.fold_in(rng, conditioning.MASK_STREAM)  # masks: (seed, example index) only
    rng = jax.random.fold_in(rng, state.step)
    micro, drop_rng = _diffusion_inputs(state, batch, rng, schedule=schedule, spec=spec, mask_rng=mask_rng)
    micro["index"] = jnp.arange(micro["t"].shape[0])

    def loss_fn(params, mb):
        out = _apply_model(model, params, mb["x_t"], schedule.model_timesteps(mb["t"]), mb,
                           {"dropout": jax.random.fold_in(drop_rng, mb["index"][0])}, text=spec.text)
        terms = objectives.training_losses(schedule, out, mb["x_start"], mb["x_t"], mb["t"], mb["noise"],
                                           mean_type=spec.mean_type, var_type=spec.var_type,
                                           loss_type=spec.loss_type, snr_gamma=spec.snr_gamma)
        return jnp.mean(terms.loss * mb["weights"]), terms

    (loss, terms), grads = _accumulate(loss_fn, state.params, micro, spec.microbatches, layout)
    sampler_state = spec.sampler.update(state.sampler_state, micro["t"], jax.lax.stop_gradient(terms.loss))
    k = schedule.num_timesteps
    metrics = dict(loss=loss, mse=jnp.mean(terms.mse), vb=jnp.mean(terms.vb))
    for name in ("loss", "mse", "vb"):
        metrics[f"{name}_q"] = quartile_means(getattr(terms, name), micro["t"], k)
    return _apply(state, grads, loss, metrics, tx=tx, spec=spec, sampler_state=sampler_state)


def classifier_step(state: TrainState, batch: dict, rng: jax.Array, *, model, schedule: Schedule,
                    spec: StepSpec, tx, layout: Layout | None = None) -> tuple[TrainState, dict]:
    """One step of noisy-classifier training (guided-diffusion's classifier_train)."""
    rng = jax.random.fold_in(rng, state.step)
    t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
    x_start, labels = batch["image"], batch["label"]
    t, _ = spec.sampler.sample(state.sampler_state, t_rng, x_start.shape[0])
    noise = jax.random.normal(noise_rng, x_start.shape, jnp.float32)
    micro = dict(x_t=gaussian.q_sample(schedule, x_start, t, noise), t=t, y=labels,
                 index=jnp.arange(t.shape[0]))

    def loss_fn(params, mb):
        logits = model.apply({"params": params}, mb["x_t"], schedule.model_timesteps(mb["t"]), train=True,
                             rngs={"dropout": jax.random.fold_in(drop_rng, mb["index"][0])})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, mb["y"])
        return jnp.mean(ce), (ce, logits)

    (loss, (ce, logits)), grads = _accumulate(loss_fn, state.params, micro, spec.microbatches, layout)
    acc1, acc5 = topk_accuracy(logits, labels)
    k = schedule.num_timesteps
    metrics = dict(loss=loss, acc1=jnp.mean(acc1), acc5=jnp.mean(acc5), loss_q=quartile_means(ce, t, k),
                   acc1_q=quartile_means(acc1, t, k))
    return _apply(state, grads, loss, metrics, tx=tx, spec=spec, sampler_state=state.sampler_state)


def topk_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example top-1 and top-5 hits (float32 [B])."""
    k = min(5, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    hits = top == labels[:, None]
    return hits[:, 0].astype(jnp.float32), jnp.any(hits, axis=-1).astype(jnp.float32)


def _apply(state: TrainState, grads, loss, metrics: dict, *, tx, spec: StepSpec, sampler_state):
    """Optimizer update, EMAs and the non-finite guard."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step.astype(jnp.float32)
        ema = tuple(optax.incremental_update(params, e, step_size=1.0 - _ema_rate(rate, step, spec.ema_warmup))
                    for e, rate in zip(state.ema_params, spec.ema_rates))
        return state.replace(params=params, opt_state=opt_state, ema_params=ema, sampler_state=sampler_state)

    # A non-finite step changes nothing but the counters; the host stops the run. A cond, not a
    # per-leaf select: selecting between old and new leaves made XLA copy every donated
    # parameter, moment and EMA leaf first (~2x the update's cost on CPU).
    kept = jax.lax.cond(finite, update, lambda s: s, state)
    kept = kept.replace(step=state.step + 1, first_nonfinite=jnp.where(
        (~finite) & (state.first_nonfinite < 0), state.step, state.first_nonfinite))
    metrics = dict(metrics, grad_norm=grad_norm)
    return kept, metrics


def _ema_rate(rate: float, step: jax.Array, warmup: bool) -> jax.Array:
    """OpenAI's fixed EMA rate, or with warm-up min(rate, (1 + step) / (10 + step))."""
    return jnp.minimum(rate, (1.0 + step) / (10.0 + step)) if warmup else jnp.asarray(rate, jnp.float32)


def state_shardings(mesh, state_shapes: TrainState, *, min_size: int = 2**12) -> TrainState:
    """Shardings of a train state on `mesh`: params, optimizer state and EMAs by the FSDP rule.

    Args:
      mesh: a `parallel.make_mesh` mesh; with fsdp = 1 every leaf is replicated.
      state_shapes: the state or its `jax.eval_shape` (ShapeDtypeStructs).
      min_size: leaves with fewer elements stay replicated (`parallel.fsdp_spec`).

    Returns:
      A TrainState of NamedShardings (the counters and sampler history replicated).
    """
    repl = parallel.replicated(mesh)
    split = functools.partial(parallel.fsdp_shardings, mesh, min_size=min_size)
    return TrainState(step=repl, params=split(state_shapes.params), opt_state=split(state_shapes.opt_state),
                      ema_params=split(state_shapes.ema_params),
                      sampler_state=jax.tree.map(lambda _: repl, state_shapes.sampler_state), first_nonfinite=repl)


def create_state(mesh, make_state, rng: jax.Array, *, min_size: int = 2**12) -> TrainState:
    """`make_state(rng)` (params -> `init_state`) built directly in its sharded layout.

    The state is never materialised whole on one device: its shapes come from
    `jax.eval_shape`, and one jit writes each leaf straight into its shards.
    """
    shardings = state_shardings(mesh, jax.eval_shape(make_state, rng), min_size=min_size)
    return jax.jit(make_state, out_shardings=shardings)(rng)


def compile_step(mesh, *, model, schedule: Schedule, spec: StepSpec, tx, state_sharding: TrainState | None = None,
                 step_fn=None):
    """The compiled step: batch split over every device, key replicated, state donated.

    Args:
      state_sharding: the state's shardings (`state_shardings`); None: replicated.
        With split parameters, the step gathers them for compute and
        reduce-scatters the gradients.
      step_fn: a step with `diffusion_step`'s signature (e.g. `training.clip.clip_step`);
        None picks `classifier_step` or `diffusion_step` by the role of `spec.kind`.

    Returns:
      jit(state, batch, rng) -> (state, metrics) with the state kept in its layout.
    """
    fn = step_fn or (classifier_step if kinds.get(spec.kind).role == "classifier" else diffusion_step)
    repl, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
    if state_sharding is None:
        state_sharding = jax.tree.map(lambda _: repl, TrainState(*([0] * 6)))
    split = any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(state_sharding.params))
    layout = Layout(gathered=repl, params=state_sharding.params) if split else None
    return jax.jit(functools.partial(fn, model=model, schedule=schedule, spec=spec, tx=tx, layout=layout),
                   in_shardings=(state_sharding, data, repl), out_shardings=(state_sharding, repl),
                   donate_argnums=0)
