"""Stochastic few-step samplers on the respaced grid: DPM-Solver++(2M) SDE and EDM's churned Heun sampler.

Both work on the grid of `dpm_solver.grid`: position p = 0..K-1 is respaced
index t = K-1-p (alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda =
log(alpha / sigma)), position K is abar = 1; step k moves the state from
position k to k+1.  Sample i draws x_T and the noise of every step from its
own key `fold_in(rng, sample_ids[i])` (`chain.sample_keys`, `chain.step_noise`
with the respaced t of the step, the draws `sampling.p_sample_loop` uses), so
it does not depend on the batch it is in.

DPM-Solver++(2M) SDE (Lu et al. 2022b, the SDE variant of DPM-Solver++; the
form of k-diffusion's `sample_dpmpp_2m_sde` with its `eta`): the reverse SDE in
data prediction D = x0_theta has the exact linear part

  x_b = (sigma_b / sigma_a) e^{-eta h} x_a + alpha_b (1 - e^{-(1+eta) h}) D_a
        + w alpha_b (D_a - D_{a-1}) / r + sigma_b sqrt(1 - e^{-2 eta h}) s_noise z,

h = lambda_b - lambda_a, r = (lambda_a - lambda_{a-1}) / h, with the
second-order (multistep) correction weight w = (1 - e^{-g}) / 2 ("midpoint",
the 2M paper form) or 1 + expm1(-g) / g ("heun", the Taylor coefficient),
g = (1 + eta) h.  eta = 1 is the reverse SDE, eta = 0 the probability-flow ODE:
exactly DPM-Solver++(2M) (`dpm_solver`, order 2 multistep).  The zeroth-order
part is evaluated as DDIM writes it, alpha_b x0_a + sigma_b e^{-eta h} eps_a (the
same value for the consistent pair x_a = alpha_a x0_a + sigma_a eps_a), so the
first-order update *is* DDIM with sigma_DDIM^2 = sigma_b^2 (1 - e^{-2 eta h});
at eta = 1 that is OpenAI's DDIM eta = 1 (the ancestral step with the posterior
variance).  The step into sigma = 0 returns x0, as every solver here.

EDM (Karras et al. 2022, Alg. 2) in EDM's variable xhat = x / alpha with noise
level s = sigma / alpha = e^{-lambda}; step k: gamma = min(S_churn / K,
sqrt(2) - 1) where S_tmin <= s_k <= S_tmax (else 0), churn s_k -> shat =
s_k (1 + gamma) by adding sqrt(shat^2 - s_k^2) S_noise z, an Euler step to
s_{k+1} (in the VP variable exactly a DDIM step from the churned point:
x = alpha_{k+1} x0 + sigma_{k+1} eps) and, unless s_{k+1} = 0, Heun's
correction x += alpha_{k+1} (s_{k+1} - shat) (eps' - eps) / 2 with eps' at
(x, s_{k+1}).  The network sees grid timesteps, except at churned levels:
like EDM's `round_sigma` for discrete (ADM) models, shat is rounded to the
*nearest original timestep* t* (found by interpolating the original
timesteps of the two neighbouring grid levels linearly in log s) and the
churn goes to that level's s, itself interpolated in log s between the grid
levels (exact for an unrespaced grid; the respaced tables do not hold the
original levels in between).  Heun makes EDM cost 2K - 2 network calls on K
respaced steps (the other samplers: K), so compare it with them at equal calls:
the first step (from the top level) is Euler, like the last (into s = 0): on
OpenAI's cosine grid it spans s from ~2e4 to ~4 at any K (the beta <= 0.999
clip), where Heun's trapezoid in s overshoots by a factor ~30 on Gaussian data
(`dpm_solver.singlestep_groups` keeps first order there for the same reason).
S_churn = 0 is EDM's deterministic Heun sampler (Alg. 1), second order.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import chain, dpm_solver, gaussian
from diffusion_jax.schedules import Schedule

SDE_SOLVER_TYPES = ("midpoint", "heun")
# EDM Table 5, the pre-trained ADM model on ImageNet-64 (discrete VP timesteps, as ours).
EDM_DEFAULTS = {"s_churn": 80.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}


def check_sde_options(*, eta: float, s_noise: float, solver_type: str, order: int, mean_type: str) -> None:
    """Raise a ValueError naming the fix for a bad DPM-Solver++(2M) SDE option."""
    if not (eta >= 0 and s_noise >= 0):
        raise ValueError(f"dpm++2m-sde needs eta >= 0 and s_noise >= 0, got eta={eta}, s_noise={s_noise}")
    if solver_type not in SDE_SOLVER_TYPES:
        raise ValueError(f"unknown dpm++2m-sde solver_type {solver_type!r}; use 'midpoint' or 'heun'")
    if order not in (1, 2):
        raise ValueError(f"dpm++2m-sde order must be 1 or 2, got {order!r}")
    _check_mean_type(mean_type)


def check_edm_options(*, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float, mean_type: str) -> None:
    """Raise a ValueError naming the fix for a bad EDM sampler option."""
    if not (s_churn >= 0 and s_noise >= 0 and 0 <= s_tmin <= s_tmax):
        raise ValueError(f"edm needs s_churn >= 0, s_noise >= 0 and 0 <= s_tmin <= s_tmax, got s_churn={s_churn}, "
                         f"s_tmin={s_tmin}, s_tmax={s_tmax}, s_noise={s_noise}")
    _check_mean_type(mean_type)


def _check_mean_type(mean_type: str) -> None:
    gaussian.check_mean_type(mean_type)
    if mean_type == "previous_x":
        raise ValueError("the SDE solvers need an eps, x0 or v prediction, not mean_type='previous_x'; sample such "
                         "a model with p_sample_loop or ddim_sample_loop")


def _start(rng, schedule: Schedule, shape, sample_ids, x_T):
    """(per-sample keys `[B]`, x_T `[B, ...]` in the schedule's dtype, shape) as every loop starts."""
    shape = tuple(int(d) for d in shape)
    sample_ids = jnp.arange(shape[0], dtype=jnp.int32) if sample_ids is None else jnp.asarray(sample_ids)
    chain.check_loop_shapes(shape, sample_ids, x_T)
    keys = chain.sample_keys(rng, sample_ids)
    x = chain.initial_noise(keys, shape) if x_T is None else x_T
    return keys, jnp.asarray(x, jnp.asarray(schedule.alphas_cumprod).dtype), shape


def _finish(x, traj, return_trajectory: bool):
    return chain.Trajectory(x, traj[0], traj[1]) if return_trajectory else x


# ----------------------------------------------------------------------------- DPM-Solver++(2M) SDE
def sde_coefficients(schedule: Schedule, *, eta: float, s_noise: float, solver_type: str, order: int = 2):
    """Per-step coefficients `[K]` of x_{k+1} = alpha_b x0 + e eps + c (x0 - x0_prev) + n z (module docstring).

    Returns:
      (alpha_b, e = sigma_b e^{-eta h}, c = w alpha_b / r (0 on first-order steps),
      n = sigma_b sqrt(1 - e^{-2 eta h}) s_noise), in the dtype of the schedule's tables;
      alpha_b, sigma_b are sqrt(abar_prev), sqrt(1 - abar_prev) as `dpm_solver.coefficients` forms them.
    """
    _, _, lam = dpm_solver.grid(schedule)
    num_steps = schedule.num_timesteps
    k = np.arange(num_steps)
    final = jnp.asarray(k + 1 == num_steps)
    h = jnp.where(final, 1.0, lam[k + 1] - lam[k])  # h = inf into sigma = 0, where only x0 is returned
    abar_prev = jnp.asarray(schedule.alphas_cumprod_prev)[::-1]
    alpha_b, sigma_b = jnp.sqrt(abar_prev), jnp.sqrt(1 - abar_prev)
    g = (1 + eta) * h
    w = -jnp.expm1(-g) / 2 if solver_type == "midpoint" else 1 + jnp.expm1(-g) / g
    second = jnp.asarray(np.array(dpm_solver.multistep_orders(num_steps, order)) == 2)
    r = (lam[k] - lam[np.maximum(k - 1, 0)]) / h
    c = jnp.where(second, w * alpha_b / jnp.where(second, r, 1.0), 0.0)
    e = jnp.where(final, 0.0, sigma_b * jnp.exp(-eta * h))
    n = jnp.where(final, 0.0, sigma_b * jnp.sqrt(-jnp.expm1(-2 * eta * h)) * s_noise)
    return alpha_b, e, c, n


def dpmpp_2m_sde_sample_loop(rng: jax.Array, model_fn, schedule: Schedule, shape: tuple[int, ...], *,
                             eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint", order: int = 2,
                             mean_type: str, var_type: str, clip_denoised: bool = False, cond_fn=None, y=None,
                             denoised_fn=None, sample_ids: jax.Array | None = None, x_T: jax.Array | None = None,
                             progress: bool = False, return_trajectory: bool = False):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b) over the respaced grid as one `lax.scan`; K network calls.

    Args:
      rng: a typed key; sample i draws x_T and each step's z from `fold_in(rng, sample_ids[i])`.
      model_fn, cond_fn, y, denoised_fn, mean_type, var_type, clip_denoised,
        sample_ids, x_T, progress, return_trajectory: as in `dpm_solver.dpm_solver_sample_loop`
        (`cond_fn` shifts the score, eps - sqrt(1 - abar_t) grad).
      schedule: the (respaced) schedule, K steps.
      shape: `(B, H, W, C)`.
      eta: 1 the reverse SDE, 0 the probability-flow ODE (= DPM-Solver++(2M)),
        in between k-diffusion's interpolation.
      s_noise: multiplies the injected noise (0: the SDE's drift alone).
      solver_type: "midpoint" or "heun" second-order weight (module docstring).
      order: 2, or 1 (DDIM with sigma_DDIM^2 = sigma_b^2 (1 - e^{-2 eta h})).

    Returns:
      The final sample `[B, H, W, C]`, or a `chain.Trajectory`.

    Raises:
      ValueError: a bad option or mean type.
    """
    check_sde_options(eta=eta, s_noise=s_noise, solver_type=solver_type, order=order, mean_type=mean_type)
    gaussian.check_var_type(var_type)
    keys, x, shape = _start(rng, schedule, shape, sample_ids, x_T)
    num_steps = schedule.num_timesteps
    coefs = sde_coefficients(schedule, eta=eta, s_noise=s_noise, solver_type=solver_type, order=order)
    denoise = lambda x, t: chain.predict_x0_eps(schedule, model_fn, x, t, mean_type=mean_type, var_type=var_type,
                                                clip_denoised=clip_denoised, cond_fn=cond_fn, y=y,
                                                denoised_fn=denoised_fn)
    report = chain.progress_reporter(num_steps) if progress else None

    def body(carry, xs):
        x, x0_prev = carry
        k, alpha_b, e, c, n = xs
        t = num_steps - 1 - k
        x0, eps = denoise(x, jnp.full((x.shape[0],), t, jnp.int32))
        z = chain.step_noise(keys, t, shape).astype(x.dtype)
        x = alpha_b * x0 + e * eps + c * (x0 - x0_prev) + n * z
        if report is not None:
            report(k)
        return (x, x0), ((x, x0) if return_trajectory else None)

    ks = jnp.arange(num_steps, dtype=jnp.int32)
    (x, _), traj = jax.lax.scan(body, (x, jnp.zeros_like(x)), (ks, *coefs))
    return _finish(x, traj, return_trajectory)


# ----------------------------------------------------------------------------- EDM (Karras et al. 2022, Alg. 2)
def edm_levels(schedule: Schedule, *, s_churn: float, s_tmin: float, s_tmax: float):
    """The churned levels of the K steps (module docstring), all `[K]`.

    Returns:
      (churned bool, s_hat, model_t: what the network sees at the churned
      point, alpha_hat, sigma_hat: the VP (sqrt(abar), sqrt(1 - abar)) of
      s_hat, churn: sqrt(s_hat^2 - s^2), the std of the added noise in s
      units).  Unchurned steps keep the grid's values exactly (churn 0).
    """
    num_steps = schedule.num_timesteps
    alpha, sigma, _ = dpm_solver.grid(schedule)
    s_grid = sigma[:num_steps] / alpha[:num_steps]  # position p = 0..K-1, decreasing
    gamma = jnp.where((s_tmin <= s_grid) & (s_grid <= s_tmax), min(s_churn / num_steps, math.sqrt(2) - 1), 0.0)
    # Original timesteps against log s in increasing order (respaced t = 0..K-1).
    log_s, t_orig = jnp.log(s_grid[::-1]), jnp.asarray(schedule.timestep_map).astype(s_grid.dtype)
    t_star = jnp.round(jnp.interp(jnp.log(s_grid * (1 + gamma)), log_s, t_orig))  # clamped to the top level
    t_grid = t_orig[::-1]
    churned = t_star > t_grid
    s_hat = jnp.where(churned, jnp.exp(jnp.interp(t_star, t_orig, log_s)), s_grid)
    alpha_hat = jnp.where(churned, 1 / jnp.sqrt(1 + s_hat**2), alpha[:num_steps])
    sigma_hat = jnp.where(churned, s_hat * alpha_hat, sigma[:num_steps])
    t_model = schedule.model_timesteps(jnp.arange(num_steps - 1, -1, -1))
    if schedule.rescale_timesteps:
        t_star = t_star * (1000.0 / schedule.original_num_steps)
    model_t = jnp.where(churned, t_star.astype(t_model.dtype), t_model)
    churn = jnp.sqrt(jnp.where(churned, s_hat**2 - s_grid**2, 0.0))
    return churned, s_hat, model_t, alpha_hat, sigma_hat, churn


def _denoise_at(model_fn, x, model_t, alpha, sigma, *, mean_type, var_type, clip_denoised, cond_fn, y, denoised_fn):
    """(x0, eps) at a noise level given by (alpha, sigma) (scalars) and the network timestep `model_t` `[B]`.

    `chain.predict_x0_eps` off the grid: the same steps (learned-variance
    channels dropped, `denoised_fn`, clipping, eps re-derived from x0, then
    `cond_fn` shifting eps by -sigma grad and x0 re-derived, unclipped).
    """
    out, _ = gaussian.split_model_output(model_fn(x, model_t, y), x, var_type)
    out = out.astype(x.dtype)
    if mean_type == "start_x":
        x0 = out
    elif mean_type == "v":
        x0 = alpha * x - sigma * out
    else:
        x0 = (x - sigma * out) / alpha
    if denoised_fn is not None:
        x0 = denoised_fn(x0)
    if clip_denoised:
        x0 = jnp.clip(x0, -1, 1)
    eps = (x - alpha * x0) / sigma
    if cond_fn is not None:
        eps = eps - sigma * cond_fn(x, model_t, y).astype(x.dtype)
        x0 = (x - sigma * eps) / alpha
    return x0, eps


def edm_sample_loop(rng: jax.Array, model_fn, schedule: Schedule, shape: tuple[int, ...], *,
                    s_churn: float = EDM_DEFAULTS["s_churn"], s_tmin: float = EDM_DEFAULTS["s_tmin"],
                    s_tmax: float = EDM_DEFAULTS["s_tmax"], s_noise: float = EDM_DEFAULTS["s_noise"],
                    mean_type: str, var_type: str, clip_denoised: bool = False, cond_fn=None, y=None,
                    denoised_fn=None, sample_ids: jax.Array | None = None, x_T: jax.Array | None = None,
                    progress: bool = False, return_trajectory: bool = False):
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2) on the respaced grid as one `lax.scan`.

    K steps, 2K - 2 network calls (Heun; the first step, from the top level,
    and the last, into sigma = 0, are Euler; the last returns x0).  Churned levels and their network timesteps:
    `edm_levels` / module docstring.

    Args:
      s_churn, s_tmin, s_tmax, s_noise: EDM's S_churn, S_tmin, S_tmax, S_noise
        (levels in s = sigma / alpha); defaults `EDM_DEFAULTS`.  s_churn = 0 is
        the deterministic Heun sampler.
      the rest: as in `dpmpp_2m_sde_sample_loop`; `cond_fn` shifts eps by
        -sigma grad at the level the network sees.

    Returns:
      The final sample `[B, H, W, C]`, or a `chain.Trajectory` (x after each
      step, the x0 prediction at each step's churned point).

    Raises:
      ValueError: a bad option or mean type.
    """
    check_edm_options(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, mean_type=mean_type)
    gaussian.check_var_type(var_type)
    keys, x, shape = _start(rng, schedule, shape, sample_ids, x_T)
    num_steps = schedule.num_timesteps
    alpha, sigma, _ = dpm_solver.grid(schedule)
    s_grid = sigma / alpha
    _, s_hat, model_t, alpha_hat, sigma_hat, churn = edm_levels(schedule, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax)
    t_next = schedule.model_timesteps(jnp.maximum(jnp.arange(num_steps - 2, -2, -1), 0))  # grid level p + 1
    denoise = lambda x, mt, a, s: _denoise_at(model_fn, x, jnp.full((x.shape[0],), mt), a, s, mean_type=mean_type,
                                              var_type=var_type, clip_denoised=clip_denoised, cond_fn=cond_fn, y=y,
                                              denoised_fn=denoised_fn)
    report = chain.progress_reporter(num_steps) if progress else None

    def body(x, xs):
        k, s_b, sh, churn_k, mt, ah, sgh, a_k, a_b, sg_b, mt_b = xs
        z = chain.step_noise(keys, num_steps - 1 - k, shape).astype(x.dtype)
        x_hat = (ah / a_k) * x + (ah * churn_k * s_noise) * z  # = x where not churned
        x0, eps = denoise(x_hat, mt, ah, sgh)
        x_next = a_b * x0 + sg_b * eps  # Euler (DDIM) from the churned point

        def heun(x_next):
            _, eps_b = denoise(x_next, mt_b, a_b, sg_b)
            return x_next + a_b * (s_b - sh) * (eps_b - eps) / 2

        x_next = jax.lax.cond((k > 0) & (k < num_steps - 1), heun, lambda x: x, x_next)
        if report is not None:
            report(k)
        return x_next, ((x_next, x0) if return_trajectory else None)

    ks = jnp.arange(num_steps, dtype=jnp.int32)
    xs = (ks, s_grid[1:], s_hat, churn, model_t, alpha_hat, sigma_hat, alpha[:-1], alpha[1:], sigma[1:], t_next)
    x, traj = jax.lax.scan(body, x, xs)
    return _finish(x, traj, return_trajectory)
