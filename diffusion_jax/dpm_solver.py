"""DPM-Solver and DPM-Solver++ on the discrete grid of a respaced schedule.

Lu et al. (2022a, "DPM-Solver", NeurIPS) and Lu et al. (2022b, "DPM-Solver++")
integrate the probability-flow ODE in lambda = log(alpha / sigma) (alpha =
sqrt(abar), sigma = sqrt(1 - abar)) with the linear part solved exactly:

  noise prediction ("dpmsolver"):  x_b = (alpha_b / alpha_a) x_a - alpha_b int_a^b e^-lam eps(lam) dlam
  data prediction ("dpmsolver++"): x_b = (sigma_b / sigma_a) x_a + sigma_b int_a^b e^lam x0(lam) dlam

and the remaining integral from a Taylor expansion of the model output M(lam)
(eps or x0) at lam_a, with h = lam_b - lam_a:

  ++:    x_b = (sigma_b / sigma_a) x_a + alpha_b [-phi1 M + phi2 (h M') - phi3 (h^2 M'')],
         phi1 = expm1(-h), phi2 = phi1 / h + 1, phi3 = phi2 / h - 1/2;
  noise: x_b = (alpha_b / alpha_a) x_a - sigma_b [phi1 M + phi2 (h M') + phi3 (h^2 M'')],
         phi1 = expm1(h),  phi2 = phi1 / h - 1, phi3 = phi2 / h - 1/2.

The derivatives come from divided differences of earlier model outputs
(multistep, Adams-Bashforth-like; DPM-Solver++ Alg. 2) or of intermediate
evaluations inside one step (singlestep, Runge-Kutta-like; DPM-Solver Algs.
1-2, DPM-Solver++ Alg. 1).  Second-order updates use the papers' form, phi2
replaced by -phi1 / 2 (++) or phi1 / 2 (noise), in DPM-Solver(++)-2M and -2S;
third-order updates (3M, 3S) and the second-order inner step of 3S use the
Taylor coefficients above.  (Lu et al.'s reference 3M code weights h^2 M'' by
phi3 / 2, which leaves a second-order error term: measured order 2.0 instead
of 3.4 in this module's order test.)

The grid: position p = 0..K-1 is respaced index t = K-1-p, where the model is
evaluated (so it only ever sees `schedule.model_timesteps(t)`, exactly like
`ddim_sample_loop`); position K is abar = 1 (sigma = 0, lambda = +inf).  Every
step k moves the solver state from position k to k+1 with one model
evaluation, so K respaced steps cost K evaluations for every method and order.
Singlestep intermediate points are therefore grid points: a singlestep order-m
group spans m consecutive grid intervals, r1 = (lam_{s1} - lam_s) / h and r2
are read off the grid (not 1/2, or 1/3 and 2/3).  For third order with any
(r1, r2) the 3S final update integrates the quadratic through all three
outputs and the inner step's derivative term is scaled by
2 (r2 - r1) / (r2 (2 - 3 r1)) (= 1 at Lu et al.'s r1 = 1/3, r2 = 2/3): the
Runge-Kutta condition b3 a32 c2 = 1/6 for nodes (0, r1, r2).  The last step,
to sigma = 0, is always first order (h = +inf leaves no room for derivative
terms): it returns the model's x0 prediction at t = 0, exactly as DDIM does.

The zeroth-order part of both algorithms is evaluated as DDIM writes it,
alpha_b x0_a + sigma_b eps_a with the anchor's consistent (x0, eps) pair
(equal to the exp-integrator forms above), so order 1 *is* DDIM with eta = 0
for both algorithms, and the noise-prediction update does not amplify
rounding by alpha_b / alpha_a (~10^3 on the first cosine step).

On grids respaced evenly in t (OpenAI's "K" and "ddimK"), the lambda steps
at both ends do not shrink like 1/K (cosine: ~log((k+1)/k) near abar = 0,
plus the beta <= 0.999 clip; every schedule: 0.5 log(T/K) into t = 0), so
high orders pay off only in the middle of the chain; tests/dpm_solver_test.py
measures the stated orders on a lambda-uniform grid.  The respacings
"logsnrK" / "quadK" (`schedules.solver_timesteps`) keep K original timesteps
spaced uniformly in lambda / quadratically in t for the solver;
scripts/dpm_toy_mixture.py and scripts/digits_steps_table.py compare them
with the even grid.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import chain, gaussian
from diffusion_jax.schedules import Schedule

ALGORITHMS = ("dpmsolver", "dpmsolver++")
METHODS = ("multistep", "singlestep")
ORDERS = (1, 2, 3)
# Lu et al.'s `lower_order_final`: below this many steps the multistep solver
# also lowers the order of the last steps (third order on very few steps is
# unstable); the step to sigma = 0 is first order in any case.
LOWER_ORDER_FINAL_BELOW = 15


class SolverPlan(NamedTuple):
    """Static (NumPy) description of every step k of a K-step solve.

    Step k evaluates the model at grid position k and moves to position k+1 by
    combining the outputs at positions `nodes[k, :num_nodes[k]]` (the first
    node is the anchor) with the state at position `anchor[k]`.
    """

    anchor: np.ndarray  # int [K], grid position of the state the update starts from
    nodes: np.ndarray  # int [K, 3], grid positions of the model outputs used (anchor first)
    num_nodes: np.ndarray  # int [K], 1..3: the order of the step's Taylor expansion
    paper_second_order: np.ndarray  # bool [K], phi2 -> -/+phi1 / 2 (2M, 2S) instead of Taylor
    inner_of_three: np.ndarray  # bool [K], the second-order inner step of a 3S group
    ends_group: np.ndarray  # bool [K], the new state is a new anchor (always for multistep)


def check_options(*, order: int, method: str, algorithm: str, mean_type: str) -> None:
    """Raise a ValueError naming the fix for an unsupported solver configuration."""
    if order not in ORDERS:
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order!r}")
    if method not in METHODS:
        raise ValueError(f"unknown DPM-Solver method {method!r}; use 'multistep' or 'singlestep'")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DPM-Solver algorithm {algorithm!r}; use 'dpmsolver++' (data prediction) "
                         "or 'dpmsolver' (noise prediction)")
    if mean_type == "previous_x":
        raise ValueError("DPM-Solver needs an eps, x0 or v prediction, not mean_type='previous_x' (a posterior "
                         "mean of one discrete step); sample such a model with p_sample_loop or ddim_sample_loop")


def multistep_orders(num_steps: int, order: int) -> list[int]:
    """Order of each multistep step: warm-up 1, 2, .., order; first order into sigma = 0.

    With fewer than `LOWER_ORDER_FINAL_BELOW` steps the final steps also count
    down (order min(order, K - k)), as Lu et al.'s `lower_order_final`.
    """
    orders = [min(order, k + 1) for k in range(num_steps)]
    if num_steps < LOWER_ORDER_FINAL_BELOW:
        orders = [min(o, num_steps - k) for k, o in enumerate(orders)]
    orders[-1] = 1
    return orders


def singlestep_groups(num_steps: int, order: int) -> list[int]:
    """Sizes of the singlestep groups (each of m grid intervals, order m); they sum to K.

    The first and the last interval are first-order groups of their own: the
    last goes into sigma = 0; the first, on OpenAI's cosine schedule, spans
    lambda from about -10 to -3 at any K (the beta <= 0.999 clip), and a
    higher-order noise-prediction step across it overshoots by ~e^h (measured:
    DPM-Solver-2 at 20 cosine steps is 4.0 off on Gaussian data with it, 0.04
    without).  This is the singlestep counterpart of the multistep warm-up.
    The K - 2 intervals between are split into groups of `order` with the
    remainder as one lower-order group at the end (Lu et al.'s order lists),
    except that a third-order split with remainder 1 ends in 2 + 2 rather than
    3 + 1: one first-order step (local error O(h^2)) would cap the global
    order at 2.
    """
    if num_steps == 1 or order == 1:
        return [1] * num_steps
    rest = num_steps - 2
    groups = [order] * (rest // order)
    if rest % order:
        groups.append(rest % order)
    if order == 3 and rest % 3 == 1 and rest > 3:
        groups[-2:] = [2, 2]
    return [1] + groups + [1]


def make_plan(num_steps: int, *, order: int, method: str) -> SolverPlan:
    """The `SolverPlan` of a K-step solve (see the module docstring)."""
    if num_steps < 1:
        raise ValueError(f"DPM-Solver needs at least one step, got {num_steps}")
    anchor, nodes, num_nodes, paper, inner, ends = [], [], [], [], [], []
    if method == "multistep":
        for k, o in enumerate(multistep_orders(num_steps, order)):
            anchor.append(k)
            nodes.append([k - i if i < o else k for i in range(3)])
            num_nodes.append(o)
            paper.append(o == 2)
            inner.append(False)
            ends.append(True)
    else:
        start = 0
        for m in singlestep_groups(num_steps, order):
            for j in range(m):
                anchor.append(start)
                nodes.append([start + i if i <= j else start for i in range(3)])
                num_nodes.append(j + 1)
                paper.append(m == 2 and j == 1)
                inner.append(m == 3 and j == 1)
                ends.append(j == m - 1)
            start += m
    return SolverPlan(np.array(anchor), np.array(nodes), np.array(num_nodes), np.array(paper), np.array(inner),
                      np.array(ends))


def grid(schedule: Schedule) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(alpha, sigma, lambda) `[K + 1]` at grid positions p = 0..K (t = K-1-p; p = K is abar = 1).

    Read from the schedule's float64-built tables (sqrt(abar), sqrt(1 - abar)),
    so sigma stays accurate where abar is close to 1.  lambda[K] = +inf.
    """
    alpha = jnp.asarray(schedule.sqrt_alphas_cumprod)[::-1]
    sigma = jnp.asarray(schedule.sqrt_one_minus_alphas_cumprod)[::-1]
    alpha = jnp.concatenate([alpha, jnp.ones((1,), alpha.dtype)])
    sigma = jnp.concatenate([sigma, jnp.zeros((1,), sigma.dtype)])
    return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)


def _derivative_weights(u1: jax.Array, u2: jax.Array, num_nodes: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Weights `[K, 3]` on the node outputs of h M'(lam_a) and h^2 M''(lam_a).

    Nodes sit at u = 0, u1, u2 (units of h, relative to the anchor); Newton's
    divided differences of the interpolating polynomial through the first
    `num_nodes` of them (one node: both zero).
    """
    two, three = jnp.asarray(num_nodes >= 2), jnp.asarray(num_nodes == 3)
    u1 = jnp.where(two, u1, 1.0)
    u2 = jnp.where(three, u2, 2.0)
    zero = jnp.zeros_like(u1)
    # f01 = (M1 - M0) / u1;  f12 = (M2 - M1) / (u2 - u1);  dd2 = (f12 - f01) / u2.
    f01 = jnp.stack([-1 / u1, 1 / u1, zero], axis=-1)
    f12 = jnp.stack([zero, -1 / (u2 - u1), 1 / (u2 - u1)], axis=-1)
    dd2 = (f12 - f01) / u2[:, None]
    first = jnp.where(three[:, None], f01 - u1[:, None] * dd2, f01)  # h M' = f01 - u1 dd2 (quadratic)
    first = jnp.where(two[:, None], first, 0.0)
    second = jnp.where(three[:, None], 2 * dd2, 0.0)  # h^2 M'' = 2 dd2
    return first, second


def _inner_of_three_scale(lam: jax.Array, plan: SolverPlan) -> jax.Array:
    """`[K]`: 2 (r2 - r1) / (r2 (2 - 3 r1)) on 3S inner steps (r from the group's grid points), else 1."""
    inner = jnp.asarray(plan.inner_of_three)
    a = plan.anchor
    ends = np.minimum(a + 3, lam.shape[0] - 1)
    h = jnp.where(inner, lam[ends] - lam[a], 1.0)
    r1 = jnp.where(inner, (lam[np.minimum(a + 1, ends)] - lam[a]) / h, 1 / 3)
    r2 = jnp.where(inner, (lam[np.minimum(a + 2, ends)] - lam[a]) / h, 2 / 3)
    return jnp.where(inner, 2 * (r2 - r1) / (r2 * (2 - 3 * r1)), 1.0)


def coefficients(schedule: Schedule, plan: SolverPlan, *,
                 algorithm: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-step update coefficients: x_{k+1} = alpha_b x0_a + sigma_b eps_a + sum_d c[k, d] M_{k-d}.

    (x0_a, eps_a) are the anchor's x0 and eps predictions, consistent at x_a
    (x_a = alpha_a x0_a + sigma_a eps_a), so alpha_b x0_a + sigma_b eps_a is
    the first-order update of both algorithms ((sigma_b / sigma_a) x_a -
    alpha_b phi1 x0_a, resp. (alpha_b / alpha_a) x_a - sigma_b phi1 eps_a),
    written as DDIM writes it: no 1 / alpha_a amplification of rounding, and
    finite on the step into sigma = 0.  M_{k-d} is the model output (x0 for
    "dpmsolver++", eps for "dpmsolver") at grid position k - d, d evaluations
    ago; c holds the derivative terms (module docstring).

    Returns:
      (alpha_b `[K]`, sigma_b `[K]`, c `[K, 3]`) in the dtype of the schedule's
      tables; alpha_b, sigma_b are sqrt(abar_prev), sqrt(1 - abar_prev) as
      `sampling.ddim_sample` forms them.
    """
    alpha, sigma, lam = grid(schedule)
    k = np.arange(plan.anchor.shape[0])
    a_idx, b_idx = plan.anchor, k + 1
    final = jnp.asarray(b_idx == k.shape[0])
    h = jnp.where(final, 1.0, lam[b_idx] - lam[a_idx])  # h = inf into sigma = 0, where only order 1 runs
    u = (lam[plan.nodes] - lam[a_idx][:, None]) / h[:, None]
    first, second = _derivative_weights(u[:, 1], u[:, 2], plan.num_nodes)
    first = first * _inner_of_three_scale(lam, plan)[:, None]
    paper = jnp.asarray(plan.paper_second_order)
    if algorithm == "dpmsolver++":
        phi1 = jnp.expm1(-h)
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - 0.5
        w2 = jnp.where(paper, -phi1 / 2, phi2)
        node_w = alpha[b_idx][:, None] * (w2[:, None] * first - phi3[:, None] * second)
    else:
        phi1 = jnp.expm1(h)
        phi2 = phi1 / h - 1
        phi3 = phi2 / h - 0.5
        w2 = jnp.where(paper, phi1 / 2, phi2)
        node_w = -sigma[b_idx][:, None] * (w2[:, None] * first + phi3[:, None] * second)
    # Node i at grid position q sits in history slot k - q (slot 0 = this step's output).
    slots = k[:, None] - plan.nodes
    c = jnp.zeros((k.shape[0], 3), node_w.dtype).at[k[:, None], slots].add(node_w)
    abar_prev = jnp.asarray(schedule.alphas_cumprod_prev)[::-1]
    return jnp.sqrt(abar_prev), jnp.sqrt(1 - abar_prev), c


def dpm_solver_sample_loop(rng: jax.Array, model_fn, schedule: Schedule, shape: tuple[int, ...], *, order: int = 2,
                           method: str = "multistep", algorithm: str = "dpmsolver++", mean_type: str, var_type: str,
                           clip_denoised: bool = False, cond_fn=None, y=None, denoised_fn=None,
                           sample_ids: jax.Array | None = None, x_T: jax.Array | None = None, progress: bool = False,
                           return_trajectory: bool = False):
    """DPM-Solver(++) sampling over the whole respaced grid as one `lax.scan`.

    Lu et al. (2022a) / (2022b): see the module docstring for the updates and
    the grid.  K = schedule.num_timesteps steps, K model evaluations at
    `schedule.model_timesteps(t)`, t = K-1..0, the last step into abar = 1.
    Randomness as in `sampling.p_sample_loop`: x_T of sample i is drawn from
    `fold_in(rng, sample_ids[i])` (the same draw as the other loops use), and
    nothing else is random.

    Args:
      rng: a typed key (`jax.random.key(seed)`).
      model_fn, cond_fn, y, denoised_fn: as in `sampling.ddim_sample`
        (`cond_fn` shifts the score: eps - sqrt(1 - abar_t) grad).
      schedule: the (respaced) schedule.
      shape: `(B, H, W, C)`.
      order: 1, 2 or 3.  Order 1 is DDIM with eta = 0.
      method: "multistep" (one evaluation per step, earlier outputs reused;
        orders ramp up 1, 2, .. at the start) or "singlestep" (groups of
        `order` grid intervals with intermediate evaluations at grid points).
      algorithm: "dpmsolver++" (data prediction, Lu et al. 2022b) or
        "dpmsolver" (noise prediction, Lu et al. 2022a).
      mean_type, var_type: the model's parameterisation ("epsilon", "start_x"
        or "v"; learned-variance channels are ignored).
      clip_denoised: clamp each x0 prediction to [-1, 1] (default off: the
        ODE solvers are analysed without thresholding).
      sample_ids: int `[B]` global sample indices; default `arange(B)`.
      x_T: optional `[B, H, W, C]` starting noise instead of the drawn one.
      progress: show a tqdm bar.
      return_trajectory: also return the state after every step and every
        step's x0 prediction.

    Returns:
      The final sample `[B, H, W, C]`, or a `chain.Trajectory`.

    Raises:
      ValueError: unsupported order, method, algorithm or mean type.
    """

    check_options(order=order, method=method, algorithm=algorithm, mean_type=mean_type)
    gaussian.check_mean_type(mean_type)
    gaussian.check_var_type(var_type)
    shape = tuple(int(d) for d in shape)
    sample_ids = jnp.arange(shape[0], dtype=jnp.int32) if sample_ids is None else jnp.asarray(sample_ids)
    chain.check_loop_shapes(shape, sample_ids, x_T)
    dtype = jnp.asarray(schedule.alphas_cumprod).dtype
    if x_T is None:
        x_T = chain.initial_noise(chain.sample_keys(rng, sample_ids), shape)
    x = jnp.asarray(x_T, dtype)

    num_steps = schedule.num_timesteps
    plan = make_plan(num_steps, order=order, method=method)
    alpha_next, sigma_next, c = coefficients(schedule, plan, algorithm=algorithm)
    denoise = lambda x, t: chain.predict_x0_eps(schedule, model_fn, x, t, mean_type=mean_type, var_type=var_type,
                                                clip_denoised=clip_denoised, cond_fn=cond_fn, y=y,
                                                denoised_fn=denoised_fn)
    report = chain.progress_reporter(num_steps) if progress else None
    starts_group = np.append(True, plan.ends_group[:-1])

    def body(carry, xs):
        x, history, x0_anchor, eps_anchor = carry
        k, alpha_b, sigma_b, c_k, is_anchor = xs
        x0, eps = denoise(x, jnp.full((x.shape[0],), num_steps - 1 - k, jnp.int32))
        m = x0 if algorithm == "dpmsolver++" else eps
        history = jnp.concatenate([m[None].astype(history.dtype), history[:2]])  # newest first
        x0_anchor = jnp.where(is_anchor, x0, x0_anchor)
        eps_anchor = jnp.where(is_anchor, eps, eps_anchor)
        x = (x0_anchor * alpha_b + sigma_b * eps_anchor
             + (c_k[0] * history[0] + c_k[1] * history[1] + c_k[2] * history[2]))
        if report is not None:
            report(k)
        return (x, history, x0_anchor, eps_anchor), ((x, x0) if return_trajectory else None)

    ks = jnp.arange(num_steps, dtype=jnp.int32)
    zeros = jnp.zeros(x.shape, x.dtype)
    init = (x, jnp.zeros((3,) + x.shape, x.dtype), zeros, zeros)
    (x, *_), traj = jax.lax.scan(body, init, (ks, alpha_next, sigma_next, c, jnp.asarray(starts_group)))
    if return_trajectory:
        return chain.Trajectory(x, traj[0], traj[1])
    return x
