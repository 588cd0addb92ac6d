"""One-trajectory ODE solvers for `ode_likelihood`: adaptive Dormand–Prince 5(4) and fixed-grid RK4.

Both integrate `dy/dt = fn(t, y)` for ONE flat float32 state `y [N]` and
report how many times they called `fn` (NFE).  They are written for one
example and meant to be `jax.vmap`ped: the adaptive solver is a
`lax.while_loop` whose step sizes, acceptances and stopping depend only on
its own trajectory (a vmapped while loop keeps finished examples frozen), so
an example's result does not depend on what else is in the batch.

The Runge–Kutta stages run as a `lax.scan` over the rows of the Butcher
tableau, so `fn` (a U-Net forward pass and its VJPs) is traced and compiled
once per solver rather than once per stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

OdeFn = Callable[[jax.Array, jax.Array], jax.Array]  # (t scalar, y [N]) -> dy/dt [N]

# Dormand & Prince (1980), the RK5(4)7M pair (scipy's RK45, torchdiffeq's dopri5).  Row 6 of A is the
# 5th-order solution's weights, so stage 6 is f at the new point, reused as stage 0 of the next step (FSAL).
_DOPRI_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])
_DOPRI_A = np.zeros((7, 7))
for _i, _row in enumerate((
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)), start=1):
    _DOPRI_A[_i, :len(_row)] = _row
# 5th- minus embedded 4th-order weights over the 7 stages: the local error estimate is h * E . k.
_DOPRI_E = np.array([71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])
_RK4_C = np.array([0.0, 0.5, 0.5, 1.0])
_RK4_A = np.array([[0.0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1.0, 0]])
_RK4_B = np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6])
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


class OdeSolution(NamedTuple):
    """The state at the end time and the cost of getting there (scalars per trajectory)."""

    y: jax.Array  # [N] state at t1
    nfe: jax.Array  # int32: calls of fn
    num_steps: jax.Array  # int32: attempted steps (adaptive: accepted + rejected)
    success: jax.Array  # bool: reached t1 within max_steps


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _stages(fn: OdeFn, t, y, h, k: jax.Array, a: np.ndarray, c: np.ndarray, first: int) -> jax.Array:
    """Rows first.. of the stage buffer `k [S, N]`: k_i = fn(t + c_i h, y + h sum_{j<i} a_ij k_j)."""
    a32, c32 = jnp.asarray(a, jnp.float32), jnp.asarray(c, jnp.float32)

    def body(k, i):
        return k.at[i].set(fn(t + c32[i] * h, y + h * (a32[i] @ k))), None

    k, _ = jax.lax.scan(body, k, jnp.arange(first, a.shape[0]))
    return k


def _start(fn: OdeFn, t0, y0, t1, rtol: float, atol: float):
    """(f0 = fn(t0, y0), initial step): Hairer, Nørsett & Wanner (1993), Sec. II.4 (scipy's
    `select_initial_step`), with its two calls of fn in one scan (traced once)."""
    scale = atol + rtol * jnp.abs(y0)
    d0 = _rms(y0 / scale)
    first_guess = lambda f0: jnp.where((d0 < 1e-5) | (_rms(f0 / scale) < 1e-5), 1e-6,
                                       0.01 * d0 / jnp.maximum(_rms(f0 / scale), 1e-30))

    def body(f0, i):  # i = 0: f0 = fn(t0, y0); i = 1: fn at an explicit Euler step of size h0
        h0 = jnp.where(i == 0, 0.0, first_guess(f0))
        f = fn(t0 + h0, y0 + h0 * f0)
        return jnp.where(i == 0, f, f0), f

    f0, fs = jax.lax.scan(body, jnp.zeros_like(y0), jnp.arange(2))
    h0 = first_guess(f0)
    d1, d2 = _rms(f0 / scale), _rms((fs[1] - f0) / scale) / h0
    dmax = jnp.maximum(d1, d2)
    h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / jnp.maximum(dmax, 1e-30)) ** (1 / 5))
    return f0, jnp.minimum(jnp.minimum(100.0 * h0, h1), t1 - t0)


def dopri5_solve(fn: OdeFn, y0: jax.Array, t0: float, t1: float, *, rtol: float, atol: float,
                 max_steps: int = 4096) -> OdeSolution:
    """Adaptive RK5(4) from t0 to t1 > t0 (Dormand & Prince 1980), error per step <= tolerance.

    A step is accepted when the RMS over components of
    `err / (atol + rtol * max(|y|, |y_new|))` is at most 1; the next step size
    is `h * clip(0.9 * norm^(-1/5), 0.2, 10)` (scipy's RK45 control).  The
    last step is shortened to land exactly on t1.

    Args:
      fn: `(t, y [N]) -> dy/dt [N]`.
      y0: `[N]` float32 initial state.
      t0, t1: integration interval (forward only).
      rtol, atol: tolerances (> 0).
      max_steps: give up (success False) after this many attempted steps.

    Returns:
      `OdeSolution`; NFE = 2 (start and initial-step probe) + 6 per attempted step.
    """
    t0, t1 = jnp.float32(t0), jnp.float32(t1)
    f0, h = _start(fn, t0, y0, t1, rtol, atol)

    def cond(carry):
        t, _, _, _, steps = carry
        return (t < t1) & (steps < max_steps)

    def body(carry):
        t, y, f, h, steps = carry
        last = h >= t1 - t
        h_used = jnp.where(last, t1 - t, h)
        k = _stages(fn, t, y, h_used, jnp.zeros((7,) + y.shape, y.dtype).at[0].set(f), _DOPRI_A, _DOPRI_C, 1)
        y_new = y + h_used * (jnp.asarray(_DOPRI_A[6], jnp.float32) @ k)
        err = h_used * (jnp.asarray(_DOPRI_E, jnp.float32) @ k)
        norm = _rms(err / (atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new))))
        accept = norm <= 1.0
        factor = jnp.where(norm == 0.0, _MAX_FACTOR,
                           jnp.clip(_SAFETY * jnp.maximum(norm, 1e-30) ** (-1 / 5), _MIN_FACTOR, _MAX_FACTOR))
        factor = jnp.where(accept, factor, jnp.minimum(factor, 1.0))  # a rejected step never grows h
        t_new = jnp.where(accept, jnp.where(last, t1, t + h_used), t)
        return (t_new, jnp.where(accept, y_new, y), jnp.where(accept, k[6], f), h_used * factor, steps + 1)

    t, y, _, _, steps = jax.lax.while_loop(cond, body, (t0, y0, f0, h, jnp.int32(0)))
    return OdeSolution(y, 2 + 6 * steps, steps, t >= t1)


def rk4_solve(fn: OdeFn, y0: jax.Array, ts: jax.Array) -> OdeSolution:
    """Classical 4th-order Runge–Kutta over the increasing grid `ts [n + 1]` (n steps, 4n calls of fn).

    Args:
      fn: `(t, y [N]) -> dy/dt [N]`.
      y0: `[N]` state at ts[0].
      ts: `[n + 1]` float32 time grid, ts[0] the start and ts[-1] the end.
    """

    def step(y, t_pair):
        t, t_next = t_pair
        h = t_next - t
        k = _stages(fn, t, y, h, jnp.zeros((4,) + y.shape, y.dtype), _RK4_A, _RK4_C, 0)
        return y + h * (jnp.asarray(_RK4_B, jnp.float32) @ k), None

    ts = jnp.asarray(ts, jnp.float32)
    y, _ = jax.lax.scan(step, y0, (ts[:-1], ts[1:]))
    n = ts.shape[0] - 1
    return OdeSolution(y, jnp.int32(4 * n), jnp.int32(n), jnp.bool_(True))


__all__ = ["OdeFn", "OdeSolution", "dopri5_solve", "rk4_solve"]
