"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) as pure functions of arrays.

A student that samples in N deterministic DDIM steps learns, at each of its
grid points t, to do in one step what its teacher does in two on a grid of
2N points (t -> t - 1/2N -> t - 1/N).  The grids are `schedules`' "distillN"
respacings: the student's N points are the teacher's odd-indexed ones, so
student index t is teacher index 2t + 1, the midpoint 2t, and both chains
end at the same level (student index t - 1 = teacher index 2t - 1, or the
data at t = 0).

Notation as in the paper: z_t = alpha_t x + sigma_t eps with alpha_t =
sqrt(abar_t), sigma_t = sqrt(1 - abar_t); t' the midpoint, t'' the target
level.  The teacher's output is turned into x_hat with `gaussian.p_mean_variance`
(whatever its parameterisation), and one DDIM step (eta = 0) is
z_s = alpha_s x_hat + (sigma_s / sigma_t) (z_t - alpha_t x_hat).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import gaussian, likelihood, objectives
from diffusion_jax.gaussian import extract
from diffusion_jax.schedules import DISTILL_SPACING, Schedule


class DistillTarget(NamedTuple):
    """The student's regression targets at (z_t, t); all `[B, H, W, C]`."""

    x: jax.Array  # x~: the x whose DDIM step t -> t'' lands on z_t'' (Alg. 2)
    v: jax.Array  # v~ = (alpha_t z_t - x~) / sigma_t: the same target in v-space
    z: jax.Array  # z_t'': the teacher's two-step result


def grid_steps(respacing: str) -> int | None:
    """N of a "distillN" respacing, None for any other respacing."""
    text = str(respacing).strip()
    rest = text[len(DISTILL_SPACING):]
    return int(rest) if text.startswith(DISTILL_SPACING) and rest.isdigit() else None


def check_nested(student: Schedule, teacher: Schedule) -> None:
    """The student's grid must be the teacher's odd-indexed points (host-side check).

    Raises:
      ValueError: the teacher does not have 2N steps, or the grids are not nested.
    """
    s, t = np.asarray(student.timestep_map), np.asarray(teacher.timestep_map)
    if t.shape[0] != 2 * s.shape[0] or not np.array_equal(t[1::2], s):
        raise ValueError(f"the student's {s.shape[0]}-step grid is not every other step of the teacher's "
                         f"{t.shape[0]}-step grid; use respacings 'distillN' and 'distill2N'")


def ddim_step(schedule: Schedule, z_t: jax.Array, t: jax.Array, pred_xstart: jax.Array) -> jax.Array:
    """One deterministic DDIM step from level t to level t - 1 of `schedule` (Song et al. 2021, Eq. 12).

    z_s = alpha_s x_hat + (sigma_s / sigma_t) (z_t - alpha_t x_hat) with abar_s =
    `alphas_cumprod_prev[t]` (1 at t = 0: the step lands on x_hat).

    Args:
      z_t: `[B, H, W, C]`; t: int32 `[B]`; pred_xstart: x_hat `[B, H, W, C]`.

    Returns:
      z_s `[B, H, W, C]`.
    """
    shape = z_t.shape
    alpha_t = extract(schedule.sqrt_alphas_cumprod, t, shape)
    sigma_t = extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape)
    abar_s = extract(schedule.alphas_cumprod_prev, t, shape)
    return jnp.sqrt(abar_s) * pred_xstart + jnp.sqrt(1.0 - abar_s) / sigma_t * (z_t - alpha_t * pred_xstart)


def teacher_ddim_step(schedule: Schedule, teacher_fn, z_t: jax.Array, t: jax.Array, y=None, *, mean_type: str,
                      var_type: str, clip_denoised: bool = True) -> jax.Array:
    """One teacher DDIM step on its own grid: x_hat from its output (any parameterisation), then `ddim_step`.

    Args:
      teacher_fn: `(x, model_timesteps [B], y) -> [B, H, W, C or 2C]`.
      clip_denoised: clip x_hat to [-1, 1] (what the teacher's DDIM sampler does by default).
    """
    out = teacher_fn(z_t, schedule.model_timesteps(t), y)
    x_hat = gaussian.p_mean_variance(schedule, out, z_t, t, mean_type=mean_type, var_type=var_type,
                                     clip_denoised=clip_denoised).pred_xstart
    return ddim_step(schedule, z_t, t, x_hat)


def two_step_target(student: Schedule, teacher: Schedule, teacher_fn, z_t: jax.Array, t: jax.Array, y=None, *,
                    mean_type: str, var_type: str, clip_denoised: bool = True) -> DistillTarget:
    """The distillation target at student level t: two teacher DDIM steps, solved for x~ (Alg. 2).

    z_t' and z_t'' are the teacher's steps from teacher index 2t + 1 (= student
    index t) to 2t and on to 2t - 1 (or the data).  The student's single DDIM
    step lands on z_t'' iff its x_hat is
      x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),
    and, as x_hat = alpha_t z_t - sigma_t v, iff its v is v~ = (alpha_t z_t - x~) / sigma_t.

    Args:
      student: the student's N-step schedule ("distillN"); teacher: its 2N-step one
        ("distill2N"); see `check_nested`.
      teacher_fn: `(x, model_timesteps [B], y) -> output`; mean_type / var_type its parameterisation.
      z_t: `[B, H, W, C]` at student level t (int32 `[B]`).

    Returns:
      DistillTarget(x~, v~, z_t''), all `[B, H, W, C]`; no gradient flows into them.
    """
    step = lambda z, i: teacher_ddim_step(teacher, teacher_fn, z, i, y, mean_type=mean_type, var_type=var_type,
                                          clip_denoised=clip_denoised)
    # One scanned body for both steps: the teacher network is traced (and compiled) once.
    z_tpp, _ = jax.lax.scan(lambda z, i: (step(z, i), None), z_t, jnp.stack([2 * t + 1, 2 * t]))
    shape = z_t.shape
    alpha_t = extract(student.sqrt_alphas_cumprod, t, shape)
    sigma_t = extract(student.sqrt_one_minus_alphas_cumprod, t, shape)
    abar_tpp = extract(student.alphas_cumprod_prev, t, shape)
    ratio = jnp.sqrt(1.0 - abar_tpp) / sigma_t  # sigma_t'' / sigma_t (0 on the last step: x~ = z_t'')
    x_target = (z_tpp - ratio * z_t) / (jnp.sqrt(abar_tpp) - ratio * alpha_t)
    v_target = (alpha_t * z_t - x_target) / sigma_t
    return jax.lax.stop_gradient(DistillTarget(x_target, v_target, z_tpp))


def distillation_loss(schedule: Schedule, v_pred: jax.Array, z_t: jax.Array, t: jax.Array,
                      target: DistillTarget) -> tuple[jax.Array, jax.Array]:
    """Truncated-SNR weighted x-space loss of a v-parameterised student (Salimans & Ho 2022, Sec. 4).

    L = max(SNR_t, 1) ||x~ - x_hat||^2 with x_hat = alpha_t z_t - sigma_t v_pred;
    equal to max(alpha_t^2, sigma_t^2) ||v~ - v_pred||^2.

    Args:
      schedule: the student's schedule; v_pred: its output `[B, H, W, C]`; z_t, t as for the target.

    Returns:
      (loss [B], mse [B]): the weighted loss and the unweighted v-space MSE, both means over pixels.
    """
    x_hat = gaussian.predict_xstart_from_v(schedule, z_t, t, v_pred)
    weight = jnp.maximum(objectives.snr(schedule, t), 1.0)
    loss = weight * likelihood.mean_flat((target.x - x_hat) ** 2)
    return loss, likelihood.mean_flat((target.v - v_pred) ** 2)
