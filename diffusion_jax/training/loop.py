"""The training program: state set-up, the resume decision, the loop, checkpoints, hooks.

Config checks live in `training.validate`, logs in `training.metrics`.

`train_and_evaluate(config, workdir)` is what `train.py` runs.  Every process
of a multi-host run executes it identically (same collectives, same
checkpoint calls); only process 0 writes logs, grids and JSON files.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import objectives, schedules
from diffusion_jax.convert import kinds
from diffusion_jax.runtime import checkpoints
from diffusion_jax.runtime import parallel
from diffusion_jax.runtime import workdir as wd
from diffusion_jax.training import clip as clip_train
from diffusion_jax.training import distill
from diffusion_jax.training import metrics as metrics_io
from diffusion_jax.training import steps as train_steps
from diffusion_jax.training.validate import (  # noqa: F401  (validate_config: part of this module's API)
    is_adm_denoiser, is_adm_super_res, is_distill_student, is_text, super_res_small_size, validate_config)
from diffusion_jax.runtime import text_conditioning as tc
from diffusion_jax.data import conditioning, pipeline


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/inf."""


def make_schedule(config, respacing: str | None = None) -> schedules.Schedule:
    d = config.diffusion
    return schedules.make_schedule(d.noise_schedule, d.diffusion_steps,
                                   d.timestep_respacing if respacing is None else respacing, d.rescale_timesteps)


def make_model(config):
    return kinds.build(config.kind, **config.model.to_dict())


def make_spec(config, schedule) -> train_steps.StepSpec:
    d, t = config.diffusion, config.train
    is_unet, text = is_adm_denoiser(config), is_text(config)
    return train_steps.StepSpec(
        kind=config.kind, mean_type=d.mean_type, var_type=d.var_type, loss_type=d.loss_type,
        snr_gamma=float(d.snr_gamma),
        sampler=objectives.make_timestep_sampler(d.schedule_sampler, schedule.num_timesteps),
        ema_rates=tuple(float(r) for r in t.ema_rates), ema_warmup=bool(t.ema_warmup),
        microbatches=int(t.microbatches),
        num_classes=config.model.num_classes if is_unet else None,
        null_label=bool(config.model.null_label) if is_unet else False, p_uncond=float(t.p_uncond),
        text=text, end_token=int(tc.tokenizer_from_config(config).end_token) if text else 0,
        inpaint=kinds.takes(config.kind, "inpaint"))


def init_params(model, config, rng):
    role = kinds.get(config.kind).role
    if role == "clip":
        return clip_train.init_params(model, config, rng)
    s = config.model.image_size
    x = jnp.zeros((1, s, s, config.model.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    if role == "classifier":
        return model.init({"params": rng}, x, t)["params"]
    if is_text(config):
        x = x[..., :config.data.channels]
        ctx = config.model.text_ctx
        kw = {"tokens": jnp.zeros((1, ctx), jnp.int32), "mask": jnp.ones((1, ctx), bool)}
        if kinds.takes(config.kind, "low_res"):
            kw["low_res"] = jnp.zeros((1, s // tc.LOW_RES_FACTOR, s // tc.LOW_RES_FACTOR, config.data.channels))
        if kinds.takes(config.kind, "inpaint"):
            kw.update(inpaint_image=jnp.zeros_like(x), inpaint_mask=jnp.ones_like(x[..., :1]))
        return model.init({"params": rng}, x, t, **kw)["params"]
    y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
    if is_adm_super_res(config):
        x, small = x[..., :config.data.channels], super_res_small_size(config)
        return model.init({"params": rng}, x, t, jnp.zeros((1, small, small, x.shape[-1])), y)["params"]
    return model.init({"params": rng}, x, t, y)["params"]


def _uses_labels(config) -> bool:
    return kinds.get(config.kind).role == "classifier" or (is_adm_denoiser(config)
                                                           and config.model.num_classes is not None)


def _data_iterator(config, with_labels: bool):
    d = config.data
    source = pipeline.make_source(d.name, d.train_split, data_dir=d.data_dir)
    role = kinds.get(config.kind).role
    num_classes = config.model.out_channels if role == "classifier" else config.model.get("num_classes")
    if with_labels:
        _check_labels(source, num_classes)
    with_captions = is_text(config) or role == "clip"
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


# ----------------------------------------------------------------------------- the loop
_Preemption = wd.StopRequests  # SIGTERM / first Ctrl-C: checkpoint and stop (all hosts at one step); 2nd Ctrl-C: exit.


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
    teacher = distill.load_teacher(config) if is_distill_student(config) else None  # checked, read-only
    mesh = parallel.make_mesh(fsdp=_parallel(config)["fsdp"])
    parallel.check_batch_divisible(config.train.batch_size, mesh, "config.train.batch_size")
    cfg_dict = checkpoints.config_to_dict(config)
    wd.check_workdir(workdir)
    checkpoints.check_workdir_config(workdir, cfg_dict)
    data_it = _data_iterator(config, _uses_labels(config))
    os.makedirs(workdir, exist_ok=True)
    lock = wd.lock_workdir(workdir, is_main=parallel.is_main_process(), broadcast=_broadcast_from_0())
    try:
        return _train(config, workdir, mesh, cfg_dict, data_it, lock, teacher)
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


def _train(config, workdir: str, mesh, cfg_dict: dict, data_it, lock, teacher=None) -> dict:
    schedule = make_schedule(config)
    spec = make_spec(config, schedule)
    model = make_model(config)
    tx, lr_fn = train_steps.make_optimizer(num_steps=config.train.num_steps, **config.optim.to_dict())
    with_labels = _uses_labels(config)
    text = (_TextBatcher.from_config(config) or _LowResBatcher.from_config(config)
            or clip_train.CaptionBatcher.from_config(config))

    min_size = _parallel(config)["fsdp_min_size"]
    make_params = lambda key: init_params(model, config, key)
    if teacher is not None:  # a distillation student starts from its teacher (training/distill.py)
        first = distill.student_params(teacher.params, jax.eval_shape(make_params, jax.random.key(0)))
        make_params = lambda key: jax.tree.map(jnp.asarray, first)
    state = train_steps.create_state(mesh, lambda key: train_steps.init_state(make_params(key), tx, spec),
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
    state_sharding = train_steps.state_shardings(mesh, state, min_size=min_size)
    if teacher is not None:
        step_fn = distill.compile_step(mesh, model=model, schedule=schedule, spec=spec, tx=tx, teacher=teacher,
                                       clip_denoised=bool(config.distill.clip_denoised), state_sharding=state_sharding)
    else:
        step_fn = train_steps.compile_step(mesh, model=model, schedule=schedule, spec=spec, tx=tx,
                                           state_sharding=state_sharding,
                                           step_fn=clip_train.clip_step if kinds.get(config.kind).role == "clip" else None)
    hooks = _Hooks(config, workdir, mesh, model, schedule)
    writer = metrics_io.MetricWriter(workdir, purge_step=(restored_step or 0) + 1)
    rng = parallel.replicated_key(mesh, config.seed + 1)
    start = int(jax.device_get(state.step))
    last_good = restored_step
    history, last = [], {}
    t_log = time.perf_counter()
    progress = metrics_io.progress_bar(start, config.train.num_steps)
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
                    last = dict(metrics_io.summarize(history), lr=float(lr_fn(done - 1)), steps_per_sec=len(history) / elapsed,
                                images_per_sec=len(history) * config.train.batch_size / elapsed)
                    writer.write(done, last)
                    progress.set_postfix(loss=f"{last['loss']:.4f}")
                    history, t_log = [], time.perf_counter()
                progress.update(1)
                stop = preempt.should_stop(done)  # every process, every step: they stop at the same one
                if done % config.train.checkpoint_every == 0 or done == config.train.num_steps or stop:
                    _check_finite(state, last_good)
                    checkpoints.save(manager, done, state, data_it, cfg_dict)
                    last_good = done
                hooks.after_step(done, state, writer)
                if stop:
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
        if not is_text(config):
            return None
        return cls(tc.tokenizer_from_config(config), config.text.text_ctx, kinds.takes(config.kind, "low_res"))

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
        return cls(super_res_small_size(config)) if is_adm_super_res(config) else None

    def __call__(self, batch: dict) -> dict:
        return {"low_res": conditioning.area_downsample(np.asarray(batch["image"], np.float32), self.small_size)}


class _Hooks:
    """Periodic sample grids and bits/dim estimates (orchestration around the step)."""

    def __init__(self, config, workdir, mesh, model, schedule):
        self.config, self.workdir, self.mesh, self.model, self.schedule = config, workdir, mesh, model, schedule
        self._eval = self._grid_job = None
        # Grids: diffusion U-Nets, and text models with prompts (upsamplers would need low-res inputs).
        spec = kinds.get(config.kind)
        self._grids = spec.from_noise and ("tokens" not in spec.inputs or bool(config.text.grid_prompts))

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
        from diffusion_jax.training import grids

        if self._grid_job is None:  # built once, so its sampler compiles once per run
            self._grid_job = (grids.text_grid if is_text(self.config) else grids.class_grid)(self.config, self.model)
        grids.write(self._grid_job, self.config, self.workdir, self.mesh, state, step)

    def evaluate(self, state) -> dict:
        from diffusion_jax.training import evaluator as train_eval

        if self._eval is None:
            self._eval = train_eval.Evaluator(self.config, self.mesh, self.model)
        return self._eval(state)
