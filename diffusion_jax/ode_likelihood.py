r"""Probability-flow ODE log-likelihood of a discrete-time diffusion model (Song et al. 2021, Sec. 4.3, App. D.2).

Continuous time.  The model is trained at indices t = 0..K-1 of a chain with
cumulative products abar_k (OpenAI's t = 0 is the first noised latent).  We
give it a continuous time s in [0, K-1] in index units by interpolating
L(s) = log abar(s) between the knots L_k = log abar_k with the monotone
piecewise-cubic Hermite interpolant (PCHIP; Fritsch & Carlson 1980, scipy's
`PchipInterpolator`), so abar(k) = abar_k exactly, L is C^1 and never
increases, and beta(s) := -dL/ds >= 0 is continuous (close to -log(1 - beta_k)
inside the chain).  A log-linear interpolant would make beta(s) a staircase
whose jumps at every knot cost an ODE solver accuracy and many rejected steps.
The network receives s (times 1000 / K with rescale_timesteps), i.e. what
`Schedule.model_timesteps` gives at integers.

The ODE.  q(x_s | x_0) = N(sqrt(abar(s)) x_0, sigma(s)^2 I), sigma^2 = 1 - abar,
are the marginals of the VP SDE dx = -1/2 beta(s) x ds + sqrt(beta(s)) dw
(Song et al. 2021, Eq. 11, time s): with abar(s) = exp(-int_0^s beta), its mean
obeys dm/ds = -1/2 beta m and its variance dv/ds = -beta v + beta, solved by
v = 1 - abar.  Its probability flow (Eq. 13) is dx/ds = -1/2 beta(s) (x +
grad log q_s(x)), and with the network's noise prediction
eps_hat(x, s) ~ -sigma(s) grad log q_s(x) (Tweedie; Ho et al. 2020, Eq. 11),

    dx/ds = f(x, s) = -1/2 beta(s) (x - eps_hat(x, s) / sigma(s)).

Equivalently, in DDIM's variables xbar = x / sqrt(abar), sigmabar = sigma /
sqrt(abar): dxbar = eps_hat dsigmabar (Song et al. 2021a, Eq. 14), since
d sqrt(abar) = -1/2 beta sqrt(abar) ds and dsigmabar = beta / (2 abar sigmabar) ds
give dx = -1/2 beta x ds + sqrt(abar) eps_hat dsigmabar = f ds.  x_0- and
v-predicting models are turned into eps_hat first (`eps_from_output`).

Likelihood.  By the instantaneous change of variables (Chen et al. 2018,
Thm. 1), d log p_s(x(s)) / ds = -div f(x(s), s), so

    log p_0(x) = log p_{K-1}(x(K-1)) + int_0^{K-1} div f(x(s), s) ds,

solved as one augmented ODE [x, delta] with d delta / ds = div f.  The
divergence is exact (trace of the Jacobian from D vector-Jacobian products:
fine for 8x8x1 digits, 64 dims) or the Skilling–Hutchinson estimate
mean_p z_p^T (df/dx) z_p with P Rademacher probes z_p drawn once per
example and held fixed along the trajectory (Grathwohl et al. 2019), which
is unbiased for the integral since x(s) does not depend on z.

Neglected at the two ends, as in score_sde:
  * s = K-1: the prior is N(0, I), while the true marginal is N(sqrt(abar_{K-1})
    x_0, (1 - abar_{K-1}) I) with abar_{K-1} = 2.4e-9 (cosine) or 4.0e-5 (linear)
    at K = 1000: a mismatch far below the reported precision.
  * s = 0: the density computed is the model's density of the FIRST NOISED
    latent (OpenAI's x_t at t = 0, sigma_0 = sqrt(1 - abar_0) = 6.4e-3 cosine,
    1.0e-2 linear at K = 1000), evaluated at the (dequantized) data itself;
    nothing accounts for the step from the data to s = 0 (no decoder term
    like the VLB's L_0).  score_sde does the same starting at t = eps = 1e-5.

Dequantization and bits/dim (score_sde's `likelihood.py`).  A pixel value
v in {0..255} becomes x = (v + u) / 128 - 1 in [-1, 1) with u ~ U[0, 1), so its
bin has width 2/256 = 1/128 in [-1, 1] units.  Jensen's inequality gives
log P(v) >= E_u[log p(x)] + D log(1/128), hence

    bits/dim = -log p(x) / (D ln 2) + log2(128) = -log p(x) / (D ln 2) + 7

is, in expectation over u, an upper bound on the discrete model's NLL in
bits/dim (score_sde's offset `7 - inverse_scaler(-1)` = 7 for centered data; a
density uniform on [-1, 1]^D gives exactly 8 bits/dim).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffusion_jax import gaussian
from diffusion_jax.ode_solvers import OdeSolution, dopri5_solve, rk4_solve
from diffusion_jax.schedules import Schedule

SOLVERS = ("dopri5", "rk4")
BITS_OFFSET = 7.0  # -log2 of the bin width 2/256 of the uint8 grid mapped to [-1, 1]

# (x [N, H, W, C], float32 model timesteps [N], y [N] | None) -> model output [N, H, W, C or 2C]
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [H, W, C], s scalar) -> eps_hat [H, W, C]


@struct.dataclass
class FlowSchedule:
    """The continuous-time chain: log abar at the K integer knots, and what the network's time unit is."""

    log_alphas_cumprod: jax.Array  # float32 [K], from float64
    slopes: jax.Array  # float32 [K]: dL/ds at the knots (PCHIP, float64)
    time_scale: float = struct.field(pytree_node=False, default=1.0)  # model timestep = s * time_scale

    @property
    def t_max(self) -> float:
        """K - 1, the last index (static)."""
        return float(self.log_alphas_cumprod.shape[0] - 1)


class SolverOptions(NamedTuple):
    """Static ODE-solver settings (hashable)."""

    solver: str = "dopri5"  # "dopri5" (adaptive) | "rk4" (fixed grid)
    rtol: float = 1e-5  # dopri5 (score_sde's default)
    atol: float = 1e-5  # dopri5
    num_steps: int = 100  # rk4: steps, uniform in log-SNR
    max_steps: int = 4096  # dopri5: attempted steps before giving up


class OdeLikelihood(NamedTuple):
    """Per-example results, each `[B]` (scalars for one example)."""

    log_likelihood: jax.Array  # log p_0(x) in nats = prior_logp + delta_logp
    prior_logp: jax.Array  # log p_{K-1}(x(K-1))
    delta_logp: jax.Array  # int_0^{K-1} div f ds
    nfe: jax.Array  # int32: drift evaluations (each 1 forward pass + P or D VJPs)
    success: jax.Array  # bool: the solver reached s = K-1


def flow_schedule(schedule: Schedule) -> FlowSchedule:
    """The `FlowSchedule` of an unrespaced `Schedule` (host-side; log abar summed in float64).

    Raises:
      ValueError: the schedule is respaced (the ODE is that of the full chain) or has K < 2.
    """
    k = schedule.num_timesteps
    tmap = np.asarray(schedule.timestep_map)
    if k < 2 or not np.array_equal(tmap, np.arange(k)) or schedule.original_num_steps not in (0, k):
        raise ValueError("the probability-flow ODE is defined on the full, unrespaced chain (K >= 2 steps): "
                         "drop --timestep_respacing")
    log_abar = np.cumsum(np.log1p(-np.asarray(schedule.betas, np.float64)))
    scale = 1000.0 / k if schedule.rescale_timesteps else 1.0
    f32 = lambda a: jnp.asarray(a.astype(np.float32))
    return FlowSchedule(f32(log_abar), f32(pchip_slopes(log_abar)), time_scale=scale)


def _pchip_edge(d0: float, d1: float) -> float:
    """scipy's shape-preserving end slope from the first two secant slopes (unit spacing)."""
    m = (3.0 * d0 - d1) / 2.0
    if np.sign(m) != np.sign(d0):
        return 0.0
    if np.sign(d0) != np.sign(d1) and abs(m) > abs(3.0 * d0):
        return 3.0 * d0
    return m


def pchip_slopes(y: np.ndarray) -> np.ndarray:
    """Fritsch–Carlson slopes `[K]` of knots y `[K]` at 0..K-1 (float64; equals scipy's PchipInterpolator).

    Interior: the harmonic mean of the neighbouring secants (0 at a local
    extremum); ends: `_pchip_edge`.  The Hermite cubic with these slopes is
    monotone wherever the data are.
    """
    y = np.asarray(y, np.float64)
    d = np.diff(y)
    if d.size == 1:
        return np.full(2, d[0])
    m = np.zeros_like(y)
    same = d[:-1] * d[1:] > 0
    safe0, safe1 = np.where(same, d[:-1], 1.0), np.where(same, d[1:], 1.0)
    m[1:-1] = np.where(same, 2.0 / (1.0 / safe0 + 1.0 / safe1), 0.0)
    m[0], m[-1] = _pchip_edge(d[0], d[1]), _pchip_edge(d[-1], d[-2])
    return m


def log_alpha_bar(fs: FlowSchedule, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log abar(s), beta(s) = -d log abar / ds) at continuous s in [0, K-1] (PCHIP; see module doc)."""
    table, slopes = fs.log_alphas_cumprod, fs.slopes
    k = jnp.clip(jnp.floor(s), 0, table.shape[0] - 2).astype(jnp.int32)
    w = s - k
    y0, y1, m0, m1 = table[k], table[k + 1], slopes[k], slopes[k + 1]
    w2, w3 = w * w, w * w * w
    # Cubic Hermite basis on the unit interval, and its derivative.
    value = (2 * w3 - 3 * w2 + 1) * y0 + (w3 - 2 * w2 + w) * m0 + (3 * w2 - 2 * w3) * y1 + (w3 - w2) * m1
    deriv = (6 * w2 - 6 * w) * (y0 - y1) + (3 * w2 - 4 * w + 1) * m0 + (3 * w2 - 2 * w) * m1
    return value, -deriv


def eps_from_output(model_output: jax.Array, x: jax.Array, log_abar: jax.Array, *, mean_type: str,
                    var_type: str) -> jax.Array:
    """eps_hat from a network output at continuous time (the first C channels of learned-variance outputs).

    Args:
      model_output: `[..., C]` or `[..., 2C]` (learned variance: mean part first).
      x: `[..., C]` the network's input x_s.
      log_abar: log abar(s), broadcastable to x.
      mean_type: "epsilon", "start_x" (eps = (x - sqrt(abar) x0_hat) / sigma) or
        "v" (eps = sigma x + sqrt(abar) v_hat, Salimans & Ho 2022, App. D).

    Raises:
      ValueError: "previous_x" (a one-step mean, not defined in continuous time) or a bad shape.
    """
    gaussian.check_mean_type(mean_type)
    out, _ = gaussian.split_model_output(model_output, x, var_type)
    sqrt_abar, sigma = jnp.exp(0.5 * log_abar), jnp.sqrt(-jnp.expm1(log_abar))
    if mean_type == "epsilon":
        return out
    if mean_type == "start_x":
        return (x - sqrt_abar * out) / sigma
    if mean_type == "v":
        return sigma * x + sqrt_abar * out
    raise ValueError("mean_type 'previous_x' predicts a one-step posterior mean, which has no probability-flow "
                     "ODE; ODE likelihoods need an epsilon, start_x or v model")


def model_eps_fn(model_fn: ModelFn, fs: FlowSchedule, y, *, mean_type: str, var_type: str) -> EpsFn:
    """One example's `eps_hat(x [H, W, C], s)` from a batched `ModelFn` (y: a scalar label or None)."""

    def eps_fn(x, s):
        log_abar, _ = log_alpha_bar(fs, s)
        t = jnp.reshape(s * jnp.float32(fs.time_scale), (1,)).astype(jnp.float32)
        out = model_fn(x[None], t, None if y is None else jnp.reshape(y, (1,)))[0]
        return eps_from_output(out.astype(jnp.float32), x, log_abar, mean_type=mean_type, var_type=var_type)

    return eps_fn


def flow_drift(eps_fn: EpsFn, fs: FlowSchedule, x: jax.Array, s: jax.Array) -> jax.Array:
    """f(x, s) = -1/2 beta(s) (x - eps_hat(x, s) / sigma(s)), the probability-flow drift (module doc)."""
    log_abar, beta = log_alpha_bar(fs, s)
    sigma = jnp.sqrt(-jnp.expm1(log_abar))
    return -0.5 * beta * (x - eps_fn(x, s) / sigma)


def make_probes(rng: jax.Array, shape: tuple[int, ...], num_probes: int) -> jax.Array:
    """`[P, *shape]` Rademacher (+-1) probes; `num_probes == 0`: the D basis vectors (exact divergence)."""
    if num_probes < 0:
        raise ValueError(f"num_probes={num_probes} must be >= 0 (0: exact divergence)")
    if num_probes == 0:
        d = math.prod(shape)
        return jnp.eye(d, dtype=jnp.float32).reshape((d,) + tuple(shape))
    return jax.random.rademacher(rng, (num_probes,) + tuple(shape), jnp.float32)


def drift_and_divergence(f: Callable[[jax.Array], jax.Array], x: jax.Array, probes: jax.Array, *,
                         exact: bool) -> tuple[jax.Array, jax.Array]:
    """(f(x), div f(x)): one forward pass and one vector-Jacobian product per probe.

    exact: `probes` are the basis vectors and div = sum_i e_i^T J e_i = tr J;
    otherwise the Hutchinson estimate mean_p z_p^T J z_p (E[z z^T] = I).
    Reverse mode (z^T J z = (J^T z) . z), because the U-Net's fused kernels
    are `custom_vjp` functions, which forward mode cannot differentiate.
    """
    fx, f_vjp = jax.vjp(f, x)
    quad = jax.vmap(lambda z: jnp.sum(z * f_vjp(z)[0]))(probes)  # [P]
    return fx, jnp.sum(quad) if exact else jnp.mean(quad)


def log_snr_grid(fs: FlowSchedule, num_steps: int) -> jax.Array:
    """`[num_steps + 1]` times from 0 to K-1, uniform in log-SNR log(abar / (1 - abar)).

    Uniform steps in s would put ~one step across the last interval of a cosine
    chain, where beta(s) = 6.9 makes RK4 unstable; log-SNR spacing (DPM-Solver's
    default) keeps every step's h * beta small.
    """
    table = fs.log_alphas_cumprod
    lam = table - jnp.log(-jnp.expm1(table))  # decreasing in k
    targets = jnp.linspace(lam[0], lam[-1], num_steps + 1)
    knots = jnp.arange(table.shape[0], dtype=jnp.float32)
    s = jnp.interp(targets, lam[::-1], knots[::-1])  # approximate inverse; any increasing grid is valid
    return s.at[0].set(0.0).at[-1].set(fs.t_max)


def standard_normal_logp(z: jax.Array) -> jax.Array:
    """log N(z; 0, I) summed over all elements (score_sde's VP prior)."""
    return -0.5 * jnp.sum(jnp.square(z)) - 0.5 * z.size * math.log(2.0 * math.pi)


def solve(fn, y0: jax.Array, fs: FlowSchedule, options: SolverOptions) -> OdeSolution:
    """Integrate `fn` from s = 0 to K-1 with the solver `options` names."""
    if options.solver == "dopri5":
        return dopri5_solve(fn, y0, 0.0, fs.t_max, rtol=options.rtol, atol=options.atol,
                            max_steps=options.max_steps)
    if options.solver == "rk4":
        return rk4_solve(fn, y0, log_snr_grid(fs, options.num_steps))
    raise ValueError(f"unknown ODE solver {options.solver!r}; accepted: {', '.join(SOLVERS)}")


def example_log_likelihood(eps_fn: EpsFn, fs: FlowSchedule, x: jax.Array, probes: jax.Array, *, exact: bool,
                           options: SolverOptions,
                           prior_logp: Callable[[jax.Array], jax.Array] = standard_normal_logp) -> OdeLikelihood:
    """log p_0(x) of ONE example `x [H, W, C]` by the probability-flow ODE (module doc); scalar fields."""
    shape = x.shape

    def rhs(s, state):
        z = state[:-1].reshape(shape)
        f, div = drift_and_divergence(lambda v: flow_drift(eps_fn, fs, v, s), z, probes, exact=exact)
        return jnp.concatenate([f.reshape(-1), div[None]])

    y0 = jnp.concatenate([x.reshape(-1).astype(jnp.float32), jnp.zeros((1,), jnp.float32)])
    sol = solve(rhs, y0, fs, options)
    prior = prior_logp(sol.y[:-1].reshape(shape))
    delta = sol.y[-1]
    return OdeLikelihood(prior + delta, prior, delta, sol.nfe, sol.success)


def log_likelihood(model_fn: ModelFn, fs: FlowSchedule, x: jax.Array, y, probe_rngs: jax.Array, *,
                   mean_type: str, var_type: str, num_probes: int, options: SolverOptions,
                   prior_logp: Callable[[jax.Array], jax.Array] = standard_normal_logp) -> OdeLikelihood:
    """log p_0 of each example of `x [B, H, W, C]`, solved per example (vmap of one-example solves).

    Args:
      model_fn: batched network `(x, float timesteps, y) -> output`.
      y: `[B]` labels or None.
      probe_rngs: `[B]` keys; example i's probes come from probe_rngs[i] only.
      num_probes: Hutchinson probes per example; 0 = exact divergence (D VJPs per evaluation).

    Returns:
      `OdeLikelihood` with `[B]` fields.
    """
    if options.solver not in SOLVERS:
        raise ValueError(f"unknown ODE solver {options.solver!r}; accepted: {', '.join(SOLVERS)}")

    def one(xi, yi, key):
        eps_fn = model_eps_fn(model_fn, fs, yi, mean_type=mean_type, var_type=var_type)
        probes = make_probes(key, xi.shape, num_probes)
        return example_log_likelihood(eps_fn, fs, xi, probes, exact=num_probes == 0, options=options,
                                      prior_logp=prior_logp)

    return jax.vmap(one)(x, y, probe_rngs)


def dequantize(x: jax.Array, u: jax.Array) -> jax.Array:
    """(v + u) / 128 - 1 for data x = v / 127.5 - 1 on the uint8 grid v and noise u ~ U[0, 1) (module doc)."""
    v = jnp.round((x.astype(jnp.float32) + 1.0) * 127.5)
    return (v + u) / 128.0 - 1.0


def bits_per_dim(log_likelihood_nats: jax.Array, num_dims: int) -> jax.Array:
    """Dequantized bits/dim from log p of [-1, 1]-scaled data: -log p / (D ln 2) + 7 (module doc)."""
    return -log_likelihood_nats / (num_dims * math.log(2.0)) + BITS_OFFSET


def example_keys(rng: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(dequantization keys, probe keys) `[B]` of global example indices: split(fold_in(rng, i))."""
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(rng, i)))(index)
    return keys[:, 0], keys[:, 1]


def data_bits_per_dim(model_fn: ModelFn, fs: FlowSchedule, x: jax.Array, y, index: jax.Array, rng: jax.Array, *,
                      mean_type: str, var_type: str, num_probes: int,
                      options: SolverOptions) -> tuple[jax.Array, OdeLikelihood]:
    """score_sde's dequantized ODE bits/dim `[B]` of uint8-grid data `x [B, H, W, C]` in [-1, 1].

    Example i's dequantization noise and probes are keyed by (rng, index[i]),
    so its result depends only on (rng, index[i], x[i], y[i]).
    """
    u_rngs, probe_rngs = example_keys(rng, index)
    u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], jnp.float32))(u_rngs)
    ll = log_likelihood(model_fn, fs, dequantize(x, u), y, probe_rngs, mean_type=mean_type, var_type=var_type,
                        num_probes=num_probes, options=options)
    return bits_per_dim(ll.log_likelihood, math.prod(x.shape[1:])), ll


__all__ = [
    "BITS_OFFSET", "FlowSchedule", "OdeLikelihood", "SOLVERS", "SolverOptions", "bits_per_dim", "data_bits_per_dim",
    "dequantize", "drift_and_divergence", "eps_from_output", "example_keys", "example_log_likelihood",
    "flow_drift", "flow_schedule", "log_alpha_bar", "log_likelihood", "log_snr_grid", "make_probes",
    "model_eps_fn", "pchip_slopes", "standard_normal_logp",
]
