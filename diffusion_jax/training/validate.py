"""Training config checks (before anything compiles or the workdir is touched), and the kind questions
the training program asks of ``convert.kinds``.

Messages name the field to change; ``validate_config(config)`` is what
``training.loop.train_and_evaluate`` runs first.
"""

from __future__ import annotations

from diffusion_jax import distillation, gaussian, objectives
from diffusion_jax.convert import glide, kinds
from diffusion_jax.runtime import text_conditioning as tc
from diffusion_jax.runtime.cli import UsageError
from diffusion_jax.training import clip as clip_train


def validate_config(config) -> None:
    """Cross-field checks of a training config with messages that say what to change.

    Raises:
      ValueError / UsageError: a kind ``train.py`` cannot train, sizes or channel counts that
        disagree, diffusion / loop settings out of range, text settings that do not fit.
    """
    spec = kinds.check_trainable(config.kind)
    if spec.role == "clip":  # the contrastive CLIP pair (training/clip.py)
        clip_train.validate_config(config)
        return _validate_loop_settings(config.train)
    m, d = config.model, config.data
    if m.image_size != d.image_size:
        raise ValueError(f"config.model.image_size={m.image_size} but config.data.image_size={d.image_size}; "
                         "set both to the size you train at")
    want_in = d.channels * (2 if is_adm_super_res(config) else 1)  # SR: x beside the upsampled low_res
    if m.in_channels != want_in and not is_text(config):
        raise ValueError(f"config.model.in_channels={m.in_channels} but a {config.kind!r} model on "
                         f"config.data.channels={d.channels} channels needs {want_in}")
    if is_adm_super_res(config):
        _validate_super_res_config(config)
    if is_adm_denoiser(config):
        _validate_diffusion_config(config.diffusion)
        learned = config.diffusion.var_type in ("learned", "learned_range")
        want = (2 if learned else 1) * d.channels
        if m.out_channels != want:
            raise ValueError(f"config.model.out_channels={m.out_channels} but var_type "
                             f"{config.diffusion.var_type!r} needs {want}")
        if config.train.p_uncond > 0 and not (m.num_classes and m.null_label):
            raise ValueError("config.train.p_uncond > 0 (null-label dropout) needs a class-conditional model "
                             "with config.model.null_label=True")
    elif is_text(config):
        _validate_diffusion_config(config.diffusion)
        _validate_text_config(config)
    if is_distill_student(config):
        _validate_distill_config(config)
    if config.train.microbatches < 1 or config.train.batch_size % config.train.microbatches:
        raise ValueError(f"config.train.batch_size={config.train.batch_size} must be a multiple of "
                         f"config.train.microbatches={config.train.microbatches}")
    _validate_loop_settings(config.train)


def is_text(config) -> bool:
    """A text-conditional (GLIDE) kind: captions -> tokens."""
    return kinds.takes(config.kind, "tokens")


def is_adm_denoiser(config) -> bool:
    """An ADM U-Net ('unet', 'super_res'): optional class labels, no captions."""
    return kinds.takes(config.kind, "labels")


def is_adm_super_res(config) -> bool:
    """ADM's super-resolution U-Net: low_res from `config.super_res.small_size`, no captions."""
    return kinds.takes(config.kind, "low_res") and not is_text(config)


def is_distill_student(config) -> bool:
    """A progressive-distillation stage (`config.distill.teacher_workdir` set; training/distill.py)."""
    return "distill" in config and bool(config.distill.teacher_workdir)


def _validate_distill_config(config) -> None:
    """A student: an ADM U-Net, v-parameterised, fixed variance, on "distillN" with a 2N-step teacher."""
    d, dist = config.diffusion, config.distill
    if not kinds.denoiser_taking(config.kind, "labels"):
        raise UsageError(f"config.distill.teacher_workdir is set but config.kind={config.kind!r}: progressive "
                         "distillation trains 'unet' students")
    if d.mean_type != "v":
        raise UsageError(f"config.diffusion.mean_type={d.mean_type!r}: a distillation student is v-parameterised "
                         "(Salimans & Ho 2022, Sec. 4); set mean_type='v'")
    if d.var_type in gaussian.LEARNED_VAR_TYPES:
        raise UsageError(f"config.diffusion.var_type={d.var_type!r}: the student learns DDIM steps, which never "
                         "read a variance; set var_type='fixed_small' and model.out_channels=data.channels")
    n = distillation.grid_steps(d.timestep_respacing)
    if n is None:
        raise UsageError(f"config.diffusion.timestep_respacing={d.timestep_respacing!r}: a student trains and "
                         "samples on its grid; set it to 'distillN' (N = its sampling steps)")
    if int(dist.teacher_steps) != 2 * n:
        raise UsageError(f"config.distill.teacher_steps={dist.teacher_steps} but the student samples in {n} steps: "
                         f"each stage halves the grid (teacher_steps={2 * n}, or student 'distill"
                         f"{int(dist.teacher_steps) // 2}')")
    if 2 * n > int(d.diffusion_steps):
        raise UsageError(f"config.distill.teacher_steps={2 * n} exceeds config.diffusion.diffusion_steps="
                         f"{d.diffusion_steps}")
    if dist.teacher_mean_type not in gaussian.MEAN_TYPES:
        raise UsageError(f"config.distill.teacher_mean_type={dist.teacher_mean_type!r} is not one of "
                         f"{', '.join(gaussian.MEAN_TYPES)}")
    if float(d.snr_gamma) != 0:
        raise UsageError(f"config.diffusion.snr_gamma={d.snr_gamma}: the distillation loss has its own weight "
                         "(truncated SNR); set snr_gamma=0")


def _validate_diffusion_config(d) -> None:
    """mean_type / var_type / loss_type / snr_gamma, checked before anything compiles."""
    for name, accepted in (("mean_type", gaussian.MEAN_TYPES), ("var_type", gaussian.VAR_TYPES),
                           ("loss_type", objectives.LOSS_TYPES)):
        if d[name] not in accepted:
            raise UsageError(f"config.diffusion.{name}={d[name]!r} is not one of {', '.join(accepted)}")
    gamma = float(d.snr_gamma)
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
    want_in = glide.glide_in_channels(config.kind, config.data.channels)
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
