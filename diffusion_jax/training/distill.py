"""One stage of progressive distillation (Salimans & Ho 2022, Alg. 2) inside `train.py`.

A stage is an ordinary training run whose config has `distill.teacher_workdir`
set (configs/digits_distill.py): `load_teacher` checks the teacher's stored
config against the student's and loads its params (before the workdir is
touched), `student_params` initialises the student from them, and
`compile_step` builds the train step whose loss is
`distillation.distillation_loss` against `distillation.two_step_target`.
Everything else (data, optimizer, EMAs, checkpoints, resume, metrics, grids)
is `training.loop`'s.

The student is a v-parameterised U-Net with a fixed variance and C output
channels.  A learned-Sigma teacher has 2C: the student keeps the mean half of
the output conv and drops the variance half, since DDIM, the sampler it is
trained to match, never reads a variance (and so the loss would never train
that half).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import distillation, schedules
from diffusion_jax.convert import kinds
from diffusion_jax.runtime import checkpoints, config_io, parallel
from diffusion_jax.runtime.cli import UsageError
from diffusion_jax.training import steps as train_steps

# Model fields that may differ between teacher and student (the output width: 2C -> C).
_FREE_MODEL_FIELDS = ("out_channels", "dropout", "use_checkpoint", "dtype")


class Teacher(NamedTuple):
    """A loaded teacher: its network, params (numpy), 2N-step schedule and parameterisation."""

    module: Any
    params: Any
    schedule: schedules.Schedule
    mean_type: str
    var_type: str
    workdir: str


def _teacher_config(config) -> dict:
    """The teacher's filled config (dict), or a UsageError naming what is missing."""
    path = config.distill.teacher_workdir
    if not os.path.isdir(path):
        raise UsageError(f"config.distill.teacher_workdir={path}: no such directory; train the teacher first "
                         "(python train.py, or the previous stage of scripts/digits_distill.py)")
    if not os.path.exists(os.path.join(path, checkpoints.CONFIG_FILE)):
        raise UsageError(f"config.distill.teacher_workdir={path} has no {checkpoints.CONFIG_FILE}: not a "
                         "training workdir")
    if not checkpoints.has_checkpoints(path) and not os.path.exists(os.path.join(path, "params.safetensors")):
        raise UsageError(f"config.distill.teacher_workdir={path} holds no checkpoint yet; train it first")
    return config_io.load_config(path).to_dict()


def check_teacher(config, teacher_cfg: dict) -> None:
    """The teacher must be the student's architecture, process and parameterisation, on a 2N grid.

    Raises:
      UsageError: naming the first field that differs.
    """
    where = f"the teacher {config.distill.teacher_workdir}"
    tm = teacher_cfg["model"]
    sm = config_io.config_from_dict(checkpoints.config_to_dict(config)).model.to_dict()  # defaults filled as tm
    if not kinds.denoiser_taking(teacher_cfg["kind"], "labels"):
        raise UsageError(f"{where} is a {teacher_cfg['kind']!r} model; students distil 'unet' teachers")
    for key in sorted(set(tm) | set(sm)):
        if key not in _FREE_MODEL_FIELDS and checkpoints._plain(tm.get(key)) != checkpoints._plain(sm.get(key)):
            raise UsageError(f"{where} has model.{key}={tm.get(key)!r} but this config has {sm.get(key)!r}; "
                             "the student starts from the teacher's weights, so they must match")
    td, sd = teacher_cfg["diffusion"], config.diffusion
    for key in ("noise_schedule", "diffusion_steps", "rescale_timesteps"):
        if td[key] != sd[key]:
            raise UsageError(f"{where} has diffusion.{key}={td[key]!r} but this config has {sd[key]!r}")
    if td["mean_type"] != config.distill.teacher_mean_type:
        raise UsageError(f"{where} predicts mean_type={td['mean_type']!r} but config.distill.teacher_mean_type="
                         f"{config.distill.teacher_mean_type!r}; set it to the teacher's")
    own = distillation.grid_steps(td["timestep_respacing"])  # a student of an earlier stage
    if own is not None and own != int(config.distill.teacher_steps):
        raise UsageError(f"{where} was distilled to {own} steps but config.distill.teacher_steps="
                         f"{config.distill.teacher_steps}: each stage halves its teacher's grid (student "
                         f"'distill{own // 2}', teacher_steps={own})")


def load_teacher(config) -> Teacher:
    """Check and load the teacher of a student config (nothing is written).

    Params: the EMA `config.distill.teacher_ema_rate` of the newest checkpoint
    (None: the checkpoint's first EMA, what `sample.py` samples; 0: the raw params).
    """
    teacher_cfg = _teacher_config(config)
    check_teacher(config, teacher_cfg)
    module, params, _ = checkpoints.load_for_inference(config.distill.teacher_workdir,
                                                      ema_rate=config.distill.teacher_ema_rate)
    d = config.diffusion
    schedule = schedules.make_schedule(d.noise_schedule, d.diffusion_steps,
                                       f"{schedules.DISTILL_SPACING}{int(config.distill.teacher_steps)}",
                                       d.rescale_timesteps)
    td = teacher_cfg["diffusion"]
    return Teacher(module, params, schedule, td["mean_type"], td["var_type"], config.distill.teacher_workdir)


def student_params(teacher_params, student_shapes):
    """The student's initial params: the teacher's, the output conv cut to the mean half.

    Args:
      teacher_params: the teacher's params tree (arrays).
      student_shapes: the student's params tree of arrays or ShapeDtypeStructs.

    Returns:
      A params tree shaped like `student_shapes` (float32 numpy).

    Raises:
      ValueError: a leaf that differs other than by a halved last axis.
    """
    def take(path, t, s):
        t = np.asarray(t, np.float32)
        if t.shape == tuple(s.shape):
            return t
        if t.shape[:-1] == tuple(s.shape[:-1]) and t.shape[-1] == 2 * s.shape[-1]:
            return t[..., :s.shape[-1]]  # eps / mean half of [mean, variance values]
        raise ValueError(f"teacher param {jax.tree_util.keystr(path)} has shape {t.shape}, the student's "
                         f"{tuple(s.shape)}")

    return jax.tree_util.tree_map_with_path(take, teacher_params, student_shapes)


def distill_step(state, batch: dict, rng: jax.Array, teacher_params, *, model, schedule, spec, tx, teacher: Teacher,
                 clip_denoised: bool, layout=None):
    """One optimizer step of the distillation loss; returns (state, metrics).

    t, the noise and label dropout are drawn as in `steps.diffusion_step` (the
    teacher sees the same, possibly null, labels); the teacher's two DDIM
    steps run once on the whole batch, outside the gradient.
    """
    mask_rng = jax.random.fold_in(rng, 0)  # unused: students take no inpainting masks
    rng = jax.random.fold_in(rng, state.step)
    micro, drop_rng = train_steps._diffusion_inputs(state, batch, rng, schedule=schedule, spec=spec,
                                                    mask_rng=mask_rng)
    teacher_fn = lambda x, ts, y: teacher.module.apply({"params": teacher_params}, x, ts, y)
    target = distillation.two_step_target(schedule, teacher.schedule, teacher_fn, micro["x_t"], micro["t"],
                                          micro.get("y"), mean_type=teacher.mean_type, var_type=teacher.var_type,
                                          clip_denoised=clip_denoised)
    micro = dict(micro, x_target=target.x, v_target=target.v, index=jnp.arange(micro["t"].shape[0]))
    micro.pop("noise")

    def loss_fn(params, mb):
        v_pred = train_steps._apply_model(model, params, mb["x_t"], schedule.model_timesteps(mb["t"]), mb,
                                          {"dropout": jax.random.fold_in(drop_rng, mb["index"][0])}, text=False)
        target_mb = distillation.DistillTarget(mb["x_target"], mb["v_target"], mb["x_target"])
        loss, mse = distillation.distillation_loss(schedule, v_pred, mb["x_t"], mb["t"], target_mb)
        return jnp.mean(loss * mb["weights"]), (loss, mse)

    (loss, (losses, mse)), grads = train_steps._accumulate(loss_fn, state.params, micro, spec.microbatches, layout)
    sampler_state = spec.sampler.update(state.sampler_state, micro["t"], jax.lax.stop_gradient(losses))
    k = schedule.num_timesteps
    metrics = dict(loss=loss, mse=jnp.mean(mse), loss_q=train_steps.quartile_means(losses, micro["t"], k),
                   mse_q=train_steps.quartile_means(mse, micro["t"], k))
    return train_steps._apply(state, grads, loss, metrics, tx=tx, spec=spec, sampler_state=sampler_state)


def compile_step(mesh, *, model, schedule, spec, tx, teacher: Teacher, clip_denoised: bool, state_sharding):
    """The compiled distillation step, called like `steps.compile_step`'s: `fn(state, batch, rng)`.

    The teacher's params are a replicated argument of the jit (not constants baked into it).
    """
    distillation.check_nested(schedule, teacher.schedule)
    repl, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
    split = any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(state_sharding.params))
    layout = train_steps.Layout(gathered=repl, params=state_sharding.params) if split else None
    fn = functools.partial(distill_step, model=model, schedule=schedule, spec=spec, tx=tx,
                           teacher=teacher._replace(params=None),
                           clip_denoised=clip_denoised, layout=layout)
    jitted = jax.jit(fn, in_shardings=(state_sharding, data, repl, repl), out_shardings=(state_sharding, repl),
                     donate_argnums=0)
    params = jax.device_put(jax.tree.map(jnp.asarray, teacher.params), repl)
    return lambda state, batch, rng: jitted(state, batch, rng, params)
