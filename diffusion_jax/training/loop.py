"""The training program: config checks, state set-up, the loop, checkpoints, logs.

`train_and_evaluate(config, workdir)` is what `train.py` runs.  Every process
of a multi-host run executes it identically (same collectives, same
checkpoint calls); only process 0 writes logs, grids and JSON files.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import gaussian, models, objectives, schedules
from diffusion_jax.convert import kinds
from diffusion_jax.runtime import checkpoints
from diffusion_jax.runtime import parallel
from diffusion_jax.runtime import workdir as wd
from diffusion_jax.runtime.cli import UsageError
from diffusion_jax.training import clip as clip_train
from diffusion_jax.training import steps as train_steps
from diffusion_jax.runtime import text_conditioning as tc
from diffusion_jax.data import conditioning, pipeline


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/inf."""


# ----------------------------------------------------------------------------- config -> objects
def validate_config(config) -> None:
    """Cross-field checks with messages that say what to change."""
    if config.kind == "clip":  # the contrastive CLIP pair (training/clip.py)
        clip_train.validate_config(config)
        return _validate_loop_settings(config.train)
    m, d = config.model, config.data
    if m.image_size != d.image_size:
        raise ValueError(f"config.model.image_size={m.image_size} but config.data.image_size={d.image_size}; "
                         "set both to the size you train at")
    want_in = d.channels * (2 if config.kind == "super_res" else 1)  # SR: x beside the upsampled low_res
    if m.in_channels != want_in and not tc.is_text_kind(config.kind):
        raise ValueError(f"config.model.in_channels={m.in_channels} but a {config.kind!r} model on "
                         f"config.data.channels={d.channels} channels needs {want_in}")
    if config.kind == "super_res":
        _validate_super_res_config(config)
    if config.kind in ("unet", "super_res"):
        _validate_diffusion_config(config.diffusion)
        learned = config.diffusion.var_type in ("learned", "learned_range")
        want = (2 if learned else 1) * d.channels
        if m.out_channels != want:
            raise ValueError(f"config.model.out_channels={m.out_channels} but var_type "
                             f"{config.diffusion.var_type!r} needs {want}")
        if config.train.p_uncond > 0 and not (m.num_classes and m.null_label):
            raise ValueError("config.train.p_uncond > 0 (null-label dropout) needs a class-conditional model "
                             "with config.model.null_label=True")
    elif tc.is_text_kind(config.kind):
        _validate_diffusion_config(config.diffusion)
        _validate_text_config(config)
    elif config.kind != "classifier":
        raise ValueError(f"unknown config.kind {config.kind!r}; accepted: unet, super_res, classifier, "
                         f"{', '.join(tc.TRAINABLE_TEXT_KINDS)}")
    if config.train.microbatches < 1 or config.train.batch_size % config.train.microbatches:
        raise ValueError(f"config.train.batch_size={config.train.batch_size} must be a multiple of "
                         f"config.train.microbatches={config.train.microbatches}")
    _validate_loop_settings(config.train)


def _validate_diffusion_config(d) -> None:
    """mean_type / var_type / loss_type / snr_gamma, checked before anything compiles."""
    for name, accepted in (("mean_type", gaussian.MEAN_TYPES), ("var_type", gaussian.VAR_TYPES),
                           ("loss_type", objectives.LOSS_TYPES)):
        if d[name] not in accepted:
            raise UsageError(f"config.diffusion.{name}={d[name]!r} is not one of {', '.join(accepted)}")
    gamma = float(d.get("snr_gamma", 0.0))
    if gamma < 0:
        raise UsageError(f"config.diffusion.snr_gamma={gamma} must be >= 0 (0: off; 5 is Hang et al.'s value)")
    if gamma > 0 and d.mean_type not in objectives.MIN_SNR_MEAN_TYPES:
        raise UsageError(f"config.diffusion.snr_gamma={gamma} needs mean_type in "
                         f"{', '.join(objectives.MIN_SNR_MEAN_TYPES)}, not {d.mean_type!r} (set snr_gamma=0)")
    if gamma > 0 and d.loss_type in ("kl", "rescaled_kl"):
        raise UsageError(f"config.diffusion.snr_gamma={gamma} reweights the MSE term, but loss_type="
                         f"{d.loss_type!r} has none (set snr_gamma=0 or use 'mse' / 'rescaled_mse')")


def _validate_loop_settings(t) -> None:
    """Loop settings that would fail after compiling (`step % 0`) or delete a run's checkpoints."""
    why = {"keep_checkpoints": " (0 would delete every checkpoint of the run)"}
    for name in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if int(t[name]) < 1:
            raise UsageError(f"config.train.{name}={t[name]} must be at least 1{why.get(name, '')}")
    for name in ("num_steps", "sample_every", "eval_every"):
        if int(t[name]) < 0:
            raise UsageError(f"config.train.{name}={t[name]} must be >= 0")
    rates = [float(r) for r in t.ema_rates]
    if any(not 0 < r < 1 for r in rates) or len(set(rates)) != len(rates):
        raise UsageError(f"config.train.ema_rates={tuple(rates)} must be distinct rates in (0, 1), e.g. (0.9999,)")


def _validate_text_config(config) -> None:
    m, t = config.model, config.text
    if config.kind not in tc.TRAINABLE_TEXT_KINDS:
        raise ValueError(f"config.kind={config.kind!r} cannot be trained here; "
                         f"trainable text kinds: {tc.TRAINABLE_TEXT_KINDS}")
    want_in = tc.glide_in_channels(config.kind, config.data.channels)
    if config.diffusion.var_type not in ("learned", "learned_range") or m.out_channels != 2 * config.data.channels:
        raise ValueError(f"GLIDE models learn Sigma: set config.diffusion.var_type='learned_range' and "
                         f"config.model.out_channels={2 * config.data.channels} (got {config.diffusion.var_type!r}, "
                         f"{m.out_channels})")
    if m.in_channels != want_in:
        raise ValueError(f"config.model.in_channels={m.in_channels} but a {config.kind!r} model on "
                         f"{config.data.channels}-channel images needs {want_in}")
    if not m.xf_width:
        raise ValueError("config.model.xf_width=0 leaves the model without a text encoder")
    if t.text_ctx != m.text_ctx:
        raise ValueError(f"config.text.text_ctx={t.text_ctx} but config.model.text_ctx={m.text_ctx}; set both")
    if config.train.eval_every:
        raise ValueError("config.train.eval_every > 0: test bits/dim during training is not implemented for "
                         "text models; set config.train.eval_every=0")
    tc.check_tokenizer_fits(tc.tokenizer_from_config(config), m.n_vocab)


def _validate_super_res_config(config) -> None:
    small, size = super_res_small_size(config), config.model.image_size
    if not 0 < small < size:
        raise ValueError(f"config.super_res.small_size={small} must be smaller than config.model.image_size={size}")
    if config.train.eval_every:
        raise ValueError("config.train.eval_every > 0: test bits/dim during training is not implemented for "
                         "super-resolution models; set config.train.eval_every=0")


def super_res_small_size(config) -> int:
    """The low-resolution side a 'super_res' config trains on (`config.super_res.small_size`)."""
    if "super_res" not in config or "small_size" not in config.super_res:
        raise ValueError("a kind='super_res' config needs config.super_res.small_size (the low-res side), "
                         "see configs/digits_sr.py")
    return int(config.super_res.small_size)


def make_schedule(config, respacing: str | None = None) -> schedules.Schedule:
    d = config.diffusion
    return schedules.make_schedule(d.noise_schedule, d.diffusion_steps,
                                   d.timestep_respacing if respacing is None else respacing, d.rescale_timesteps)


def make_model(config):
    if config.kind == "clip":
        return kinds.build("clip", **config.model.to_dict())
    return models.build_model(config.kind, **config.model.to_dict())


def make_spec(config, schedule) -> train_steps.StepSpec:
    d, t = config.diffusion, config.train
    is_unet = config.kind in ("unet", "super_res")
    text = tc.is_text_kind(config.kind)
    return train_steps.StepSpec(
        kind=config.kind, mean_type=d.mean_type, var_type=d.var_type, loss_type=d.loss_type,
        snr_gamma=float(d.get("snr_gamma", 0.0)),
        sampler=objectives.make_timestep_sampler(d.schedule_sampler, schedule.num_timesteps),
        ema_rates=tuple(float(r) for r in t.ema_rates), ema_warmup=bool(t.ema_warmup),
        microbatches=int(t.microbatches),
        num_classes=config.model.num_classes if is_unet else None,
        null_label=bool(config.model.null_label) if is_unet else False, p_uncond=float(t.p_uncond),
        text=text, end_token=int(tc.tokenizer_from_config(config).end_token) if text else 0,
        inpaint=config.kind in tc.INPAINT_KINDS)


def init_params(model, config, rng):
    if config.kind == "clip":
        return clip_train.init_params(model, config, rng)
    s = config.model.image_size
    x = jnp.zeros((1, s, s, config.model.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    if config.kind == "classifier":
        return model.init({"params": rng}, x, t)["params"]
    if tc.is_text_kind(config.kind):
        x = x[..., :config.data.channels]
        ctx = config.model.text_ctx
        kw = {"tokens": jnp.zeros((1, ctx), jnp.int32), "mask": jnp.ones((1, ctx), bool)}
        if config.kind in tc.UPSAMPLE_KINDS:
            kw["low_res"] = jnp.zeros((1, s // tc.LOW_RES_FACTOR, s // tc.LOW_RES_FACTOR, config.data.channels))
        if config.kind in tc.INPAINT_KINDS:
            kw.update(inpaint_image=jnp.zeros_like(x), inpaint_mask=jnp.ones_like(x[..., :1]))
        return model.init({"params": rng}, x, t, **kw)["params"]
    y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
    if config.kind == "super_res":
        x, small = x[..., :config.data.channels], super_res_small_size(config)
        return model.init({"params": rng}, x, t, jnp.zeros((1, small, small, x.shape[-1])), y)["params"]
    return model.init({"params": rng}, x, t, y)["params"]


def _uses_labels(config) -> bool:
    return config.kind == "classifier" or (config.kind in ("unet", "super_res")
                                            and config.model.num_classes is not None)


def _data_iterator(config, with_labels: bool):
    d = config.data
    source = pipeline.make_source(d.name, d.train_split, data_dir=d.data_dir)
    num_classes = config.model.out_channels if config.kind == "classifier" else config.model.get("num_classes")
    if with_labels:
        _check_labels(source, num_classes)
    with_captions = tc.is_text_kind(config.kind) or config.kind == "clip"
    if with_captions:
        _check_captions(source, d.name)
    return pipeline.make_train_iterator(
        source, global_batch_size=config.train.batch_size, image_size=d.image_size, channels=d.channels,
        seed=config.seed % 2**32, random_flip=d.random_flip, worker_count=d.worker_count,
        with_labels=with_labels, with_captions=with_captions)


def _check_captions(source, name: str) -> None:
    probe = source[0]
    if "caption" not in probe:
        raise ValueError(f"the model is text-conditional (a GLIDE kind) but dataset {name!r} has no captions "
                         f"(its examples hold {sorted(probe)}); use a captioned dataset (e.g. 'digits', or a TFDS "
                         "dataset with a 'caption' string feature) or a class-conditional kind='unet' model")


def _check_labels(source, num_classes: int) -> None:
    """Labels must exist and fit the model's classes (checked on the first records)."""
    probe = source[0]
    if "label" not in probe:
        raise ValueError("the model is class-conditional (or a classifier) but the dataset has no labels; "
                         "use an unconditional model (config.model.num_classes=None) or a labelled dataset")
    n = min(len(source), 2048)
    labels = np.array([int(source[i]["label"]) for i in range(0, len(source), max(1, len(source) // n))])
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"dataset labels reach {labels.max()} but the model has {num_classes} classes; "
                         f"set config.model.num_classes (or out_channels for classifiers) to at least {labels.max() + 1}")


# ----------------------------------------------------------------------------- logging
class MetricWriter:
    """metrics.jsonl + TensorBoard events, process 0 only."""

    def __init__(self, workdir: str, purge_step: int | None = None):
        self.enabled = parallel.is_main_process()
        self._file = self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                # purge_step: TensorBoard hides events of steps >= it written before a resume.
                self._tb = SummaryWriter(logdir=workdir, purge_step=purge_step)
            except ImportError:  # TensorBoard is optional; JSON lines always work.
                self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def summarize(history: list[dict]) -> dict:
    """Average per-step device metrics over a log interval; quartiles become *_q0..*_q3."""
    host = jax.device_get(history)
    out = {}
    for key in host[0]:
        vals = np.stack([np.asarray(h[key], np.float64) for h in host])
        counts = np.isfinite(vals).sum(axis=0)
        # Quartiles without samples this interval stay NaN (written as null).
        mean = np.where(counts > 0, np.nansum(np.where(np.isfinite(vals), vals, 0.0), axis=0) / np.maximum(counts, 1),
                        np.nan)
        if mean.ndim:
            for i, v in enumerate(mean):
                out[f"{key[:-2]}_q{i}"] = float(v)
        else:
            out[key] = float(mean)
    return out


# ----------------------------------------------------------------------------- the loop
_Preemption = wd.StopRequests  # SIGTERM / first Ctrl-C: checkpoint and stop; second Ctrl-C: exit at once.


def _check_finite(state, last_good: int | None) -> None:
    bad = int(jax.device_get(state.first_nonfinite))
    if bad >= 0:
        where = f"the last good checkpoint (step {last_good}) is intact" if last_good is not None else \
            "no checkpoint was written"
        raise NonFiniteError(
            f"non-finite loss or gradients at step {bad}; the run stopped and {where}. "
            "Lower config.optim.lr, set config.optim.grad_clip, or check the data for NaNs.")


def _parallel(config) -> dict:
    """config.parallel with defaults (configs written before the group existed train replicated)."""
    group = config.parallel.to_dict() if "parallel" in config else {}
    return {"fsdp": int(group.get("fsdp", 1)), "fsdp_min_size": int(group.get("fsdp_min_size", 2**12))}


def train_and_evaluate(config, workdir: str) -> dict:
    """Train `config` in `workdir`, resuming from its newest checkpoint; returns the last metrics.

    Everything that can be checked is checked before the workdir is touched
    or anything compiles (config, batch layout, data split, the workdir's
    stored model); then process 0 locks the workdir for the run.
    """
    validate_config(config)
    mesh = parallel.make_mesh(fsdp=_parallel(config)["fsdp"])
    parallel.check_batch_divisible(config.train.batch_size, mesh, "config.train.batch_size")
    cfg_dict = checkpoints.config_to_dict(config)
    wd.check_workdir(workdir)
    checkpoints.check_workdir_config(workdir, cfg_dict)
    data_it = _data_iterator(config, _uses_labels(config))
    os.makedirs(workdir, exist_ok=True)
    lock = wd.lock_workdir(workdir, is_main=parallel.is_main_process(), broadcast=_broadcast_from_0())
    try:
        return _train(config, workdir, mesh, cfg_dict, data_it, lock)
    finally:
        if lock is not None:
            lock.release()


def _broadcast_from_0():
    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    return lambda x: int(multihost_utils.broadcast_one_to_all(np.int32(x)))


def _resume_bookkeeping(workdir: str, cfg_dict: dict, restored_step, lock) -> None:
    """After the resume decision: config.json, metrics rows past the restored step trimmed, lock owner."""
    checkpoints.write_config(workdir, cfg_dict)
    if not parallel.is_main_process():
        return
    removed = wd.trim_metrics(workdir, restored_step or 0)
    if removed:
        wd.warn(f"{workdir}/metrics.jsonl: dropped {removed} rows past step {restored_step or 0} "
                "(those steps are trained again)")
    if lock is not None:
        lock.write_owner()


def _train(config, workdir: str, mesh, cfg_dict: dict, data_it, lock) -> dict:
    schedule = make_schedule(config)
    spec = make_spec(config, schedule)
    model = make_model(config)
    tx, lr_fn = train_steps.make_optimizer(num_steps=config.train.num_steps, **config.optim.to_dict())
    with_labels = _uses_labels(config)
    text = (_TextBatcher.from_config(config) or _LowResBatcher.from_config(config)
            or clip_train.CaptionBatcher.from_config(config))

    min_size = _parallel(config)["fsdp_min_size"]
    state = train_steps.create_state(mesh, lambda key: train_steps.init_state(init_params(model, config, key), tx, spec),
                                     jax.random.key(config.seed), min_size=min_size)
    manager = checkpoints.make_manager(workdir, keep=config.train.keep_checkpoints)
    restored, restored_step = checkpoints.restore_latest(manager, state, data_it, ema_rates=spec.ema_rates,
                                                         config=cfg_dict)
    if restored is not None:
        state = restored
        print(f"resumed from {workdir}/checkpoints at step {restored_step}", flush=True)
    elif os.path.exists(os.path.join(workdir, checkpoints.CONFIG_FILE)) and parallel.is_main_process():
        wd.warn(f"{workdir} has a config.json but no checkpoint: training starts at step 0")
    _resume_bookkeeping(workdir, cfg_dict, restored_step, lock)
    step_fn = train_steps.compile_step(mesh, model=model, schedule=schedule, spec=spec, tx=tx,
                                       state_sharding=train_steps.state_shardings(mesh, state, min_size=min_size),
                                       step_fn=clip_train.clip_step if config.kind == "clip" else None)
    hooks = _Hooks(config, workdir, mesh, model, schedule)
    writer = MetricWriter(workdir, purge_step=(restored_step or 0) + 1)
    rng = parallel.replicated_key(mesh, config.seed + 1)
    start = int(jax.device_get(state.step))
    last_good = restored_step
    history, last = [], {}
    t_log = time.perf_counter()
    progress = _progress(start, config.train.num_steps)
    try:
        with _Preemption() as preempt:
            for step in range(start, config.train.num_steps):
                batch = parallel.global_batch(mesh, _batch_arrays(next(data_it), with_labels, text))
                state, metrics = step_fn(state, batch, rng)
                history.append(metrics)
                done = step + 1
                if done % config.train.log_every == 0 or done == config.train.num_steps:
                    _check_finite(state, last_good)
                    elapsed = time.perf_counter() - t_log
                    last = dict(summarize(history), lr=float(lr_fn(done - 1)), steps_per_sec=len(history) / elapsed,
                                images_per_sec=len(history) * config.train.batch_size / elapsed)
                    writer.write(done, last)
                    progress.set_postfix(loss=f"{last['loss']:.4f}")
                    history, t_log = [], time.perf_counter()
                progress.update(1)
                if done % config.train.checkpoint_every == 0 or done == config.train.num_steps or preempt.requested:
                    _check_finite(state, last_good)
                    checkpoints.save(manager, done, state, data_it, cfg_dict)
                    last_good = done
                hooks.after_step(done, state, writer)
                if preempt.requested:
                    print(f"{preempt.signal_name}: checkpointed step {done} and stopped; re-run to resume",
                          flush=True)
                    break
        if not preempt.requested:  # Stopping on a signal: no end-of-run grid (a compile), just exit.
            hooks.at_end(int(jax.device_get(state.step)), state, writer)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        progress.close()
    return last


def _batch_arrays(batch: dict, with_labels: bool, text=None) -> dict:
    out = {"image": np.asarray(batch["image"], np.float32)}
    if with_labels:
        out["label"] = np.asarray(batch["label"], np.int32)
    if text is not None:
        out.update(text(batch))
    return out


class _TextBatcher:
    """Host-side captions -> {"tokens", "mask"} (+ "low_res" for upsamplers) for each batch."""

    def __init__(self, tokenizer, text_ctx: int, low_res: bool):
        self.tokenizer, self.text_ctx, self.low_res = tokenizer, text_ctx, low_res

    @classmethod
    def from_config(cls, config):
        if not tc.is_text_kind(config.kind):
            return None
        return cls(tc.tokenizer_from_config(config), config.text.text_ctx, config.kind in tc.UPSAMPLE_KINDS)

    def __call__(self, batch: dict) -> dict:
        out = tc.caption_batch(self.tokenizer, batch["caption"], self.text_ctx)
        if self.low_res:
            out["low_res"] = tc.low_res_of(np.asarray(batch["image"], np.float32))
        return out


class _LowResBatcher:
    """'super_res' kinds: the batch's images area-downsampled to `low_res` (guided-diffusion's
    `super_res_train.py`: `F.interpolate(large_batch, small_size, mode="area")`, not quantised)."""

    def __init__(self, small_size: int):
        self.small_size = small_size

    @classmethod
    def from_config(cls, config):
        return cls(super_res_small_size(config)) if config.kind == "super_res" else None

    def __call__(self, batch: dict) -> dict:
        return {"low_res": conditioning.area_downsample(np.asarray(batch["image"], np.float32), self.small_size)}


def _progress(start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", disable=not parallel.is_main_process(),
                dynamic_ncols=True, mininterval=1.0)


class _Hooks:
    """Periodic sample grids and bits/dim estimates (orchestration around the step)."""

    def __init__(self, config, workdir, mesh, model, schedule):
        self.config, self.workdir, self.mesh, self.model, self.schedule = config, workdir, mesh, model, schedule
        self._eval = None
        # Grids: diffusion U-Nets, and text models with prompts (upsamplers would need low-res inputs).
        self._grids = config.kind == "unet" or (config.kind == "glide" and bool(config.text.grid_prompts))

    def after_step(self, step: int, state, writer) -> None:
        t = self.config.train
        if self._grids and t.sample_every and step % t.sample_every == 0:
            self.sample_grid(step, state)
        if t.eval_every and step % t.eval_every == 0:
            writer.write(step, self.evaluate(state))

    def at_end(self, step: int, state, writer) -> None:
        t = self.config.train
        if self._grids and not (t.sample_every and step % t.sample_every == 0) and step > 0:
            self.sample_grid(step, state)

    def sample_grid(self, step: int, state) -> None:
        from diffusion_jax.training import grids as train_samples

        if self.config.kind == "unet":
            train_samples.write_grid(self.config, self.workdir, self.mesh, self.model, state, step)
        else:
            train_samples.write_text_grid(self.config, self.workdir, self.mesh, self.model, state, step)

    def evaluate(self, state) -> dict:
        from diffusion_jax.training import evaluator as train_eval

        if self._eval is None:
            self._eval = train_eval.Evaluator(self.config, self.mesh, self.model)
        return self._eval(state)
