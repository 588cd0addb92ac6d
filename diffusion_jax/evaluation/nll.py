"""Exact NLL in bits/dim (OpenAI's `calc_bpd_loop`), fast, plus a K-step estimate.

The variational bound of a discrete diffusion is (Ho et al. 2020, Eq. 5;
Nichol & Dhariwal 2021, Sec. 2)

    bpd(x_0) = sum_{t=0}^{K-1} L_t(x_0, eps_t) + L_prior(x_0),

with L_0 the discretized Gaussian decoder NLL, L_t (t > 0) the analytic KL
between q(x_{t-1} | x_t, x_0) and the model, and each term evaluated at
x_t = q_sample(x_0, t, eps_t).  Every term depends only on (x_0, t, eps_t), so
instead of OpenAI's K sequential forward passes we tile the batch over a chunk
of `t_chunk` timesteps (one forward pass of B * t_chunk images) and scan over
the chunks.  The noise of example i at timestep t is
`normal(fold_in(fold_in(rng, i), t))`, so results depend neither on the batch
size, the chunk size nor the number of devices.

The per-t quantities are exactly `calc_bpd_loop`'s: `vb` (bits/dim), `xstart_mse`
and `mse` (eps re-derived from the clipped pred_xstart vs the true noise), all
from `likelihood.bpd_terms`.  A guided chain's bound takes a guided model
function (classifier-free guidance) and/or a `cond_fn` that shifts the mean at
every t (classifier guidance); see `evaluation.nll_guidance`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import gaussian, likelihood
from diffusion_jax.chain import CondFn
from diffusion_jax.runtime.parallel import batch_spec, data_sharded, global_batch, make_mesh  # make_mesh re-exported
from diffusion_jax.schedules import Schedule

# (params, x [N, H, W, C], model timesteps [N], y [N] | None) -> model output [N, H, W, C or 2C]
ApplyFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
# (params, x_t [N, H, W, C], model timesteps [N], y [N]) -> s * grad_x log p(y | x_t), classifier guidance
CondApplyFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]
TERMS = ("vb", "mse", "xstart_mse")
NUM_QUARTILES = 4


class ChainTerms(NamedTuple):
    """Every term of the full chain: `[B, K]` per t (column t), `[B]` totals."""

    vb: jax.Array
    xstart_mse: jax.Array
    mse: jax.Array
    prior: jax.Array
    total: jax.Array


class NllBatch(NamedTuple):
    """What the runner keeps of one batch (small enough to gather to every host).

    Per example `[B]` / `[B, 4]`: the total bits/dim, the prior term and the
    per-t-quartile sums of each term.  Per timestep `[K]`: sums over the
    batch's valid examples (padding rows excluded).
    """

    total: jax.Array
    prior: jax.Array
    vb_q: jax.Array
    mse_q: jax.Array
    xstart_mse_q: jax.Array
    vb_t: jax.Array
    mse_t: jax.Array
    xstart_mse_t: jax.Array


def module_apply(module) -> ApplyFn:
    """`ApplyFn` of a Flax diffusion model (`UNet`: y passed only when class-conditional)."""

    def apply(params, x, timesteps, y):
        if getattr(module, "num_classes", None) is None:
            return module.apply({"params": params}, x, timesteps)
        return module.apply({"params": params}, x, timesteps, y)

    return apply


def example_noise(rng: jax.Array, index: jax.Array, t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """eps for one (example, timestep): `normal(fold_in(fold_in(rng, index), t), shape)`."""
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, index), t), shape, jnp.float32)


def terms_at(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array, y, index: jax.Array,
             t: jax.Array, rng: jax.Array, *, mean_type: str, var_type: str,
             clip_denoised: bool = True, cond_fn: CondFn | None = None) -> likelihood.BpdTerms:
    """`calc_bpd_loop`'s terms of each example at several timesteps in one forward pass.

    Args:
      model_fn: `(x_t [N,H,W,C], model timesteps [N], y [N] | None) -> output`.
      schedule: the (possibly respaced) process.
      x_start: `[B, H, W, C]` data in [-1, 1] (uint8 mapped by v / 127.5 - 1).
      y: `[B]` labels or None.
      index: `[B]` int32 global example indices (they key the noise).
      t: `[B, S]` int32 timesteps to evaluate for each example.
      rng: base key; eps of (i, t) is `example_noise(rng, index[i], t)`.
      cond_fn: optional classifier guidance `(x_t, model timesteps, y) -> s * grad log p(y | x_t)`;
        the bound is then that of `p_sample(..., cond_fn=cond_fn)`'s chain (`likelihood.vb_terms_bpd`).

    Returns:
      `BpdTerms` with fields `[B, S]`.
    """
    b, s = t.shape
    # Tile along a new minor axis and merge it into the batch axis, so a batch
    # sharded over devices stays sharded the same way ([B, S] -> [B * S]).
    x0 = jnp.broadcast_to(x_start[:, None], (b, s) + x_start.shape[1:]).reshape((b * s,) + x_start.shape[1:])
    tt = t.reshape(b * s).astype(jnp.int32)
    ii = jnp.broadcast_to(index[:, None], (b, s)).reshape(b * s)
    yy = None if y is None else jnp.broadcast_to(y[:, None], (b, s)).reshape(b * s)
    noise = jax.vmap(lambda i, tk: example_noise(rng, i, tk, x_start.shape[1:]))(ii, tt)
    x_t = gaussian.q_sample(schedule, x0, tt, noise)
    out = model_fn(x_t, schedule.model_timesteps(tt), yy)
    terms = likelihood.bpd_terms(schedule, out, x0, x_t, tt, noise, mean_type=mean_type, var_type=var_type,
                                 clip_denoised=clip_denoised, cond_fn=cond_fn, y=yy)
    return likelihood.BpdTerms(*(v.reshape(b, s) for v in terms))


def chain_terms(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array, y, index: jax.Array,
                rng: jax.Array, *, t_chunk: int, mean_type: str, var_type: str,
                clip_denoised: bool = True, cond_fn: CondFn | None = None) -> ChainTerms:
    """The full bound, every t, `t_chunk` timesteps per forward pass (`lax.map` over chunks).

    Equal to OpenAI's `calc_bpd_loop` (Nichol & Dhariwal 2021, Sec. 2) with
    eps_t = `example_noise(rng, index, t)`; with `cond_fn`, the bound of the
    classifier-guided chain (see `terms_at`).  Returns `ChainTerms` ([B, K] per t
    in ascending t; OpenAI stacks descending t).
    """
    k = schedule.num_timesteps
    t_chunk = max(1, min(int(t_chunk), k))
    n_chunks = -(-k // t_chunk)
    # The last chunk is padded with t = K - 1 repeats; their columns are dropped.
    ts = jnp.minimum(jnp.arange(n_chunks * t_chunk, dtype=jnp.int32), k - 1).reshape(n_chunks, t_chunk)
    b = x_start.shape[0]

    def one_chunk(tc):
        return terms_at(model_fn, schedule, x_start, y, index, jnp.broadcast_to(tc, (b, t_chunk)), rng,
                        mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised, cond_fn=cond_fn)

    stacked = jax.lax.map(one_chunk, ts)  # fields [n_chunks, B, t_chunk]
    per_t = [jnp.moveaxis(v, 0, 1).reshape(b, n_chunks * t_chunk)[:, :k] for v in stacked]
    vb, xstart_mse, mse = per_t
    prior = likelihood.prior_bpd(schedule, x_start)
    return ChainTerms(vb, xstart_mse, mse, prior, likelihood.total_bpd(vb, prior))


def quartile_of(t: np.ndarray | jax.Array, num_timesteps: int):
    """OpenAI's logging bucket `int(4 * t / K)` of each timestep."""
    return (NUM_QUARTILES * t) // num_timesteps


def reduce_chain(terms: ChainTerms, valid: jax.Array) -> NllBatch:
    """Per-example totals and quartile sums, per-t sums over valid examples."""
    k = terms.vb.shape[1]
    onehot = jax.nn.one_hot(quartile_of(jnp.arange(k), k), NUM_QUARTILES, dtype=jnp.float32)  # [K, 4]
    w = valid.astype(jnp.float32)[:, None]
    return NllBatch(
        total=terms.total, prior=terms.prior,
        vb_q=terms.vb @ onehot, mse_q=terms.mse @ onehot, xstart_mse_q=terms.xstart_mse @ onehot,
        vb_t=jnp.sum(terms.vb * w, 0), mse_t=jnp.sum(terms.mse * w, 0),
        xstart_mse_t=jnp.sum(terms.xstart_mse * w, 0))


def _batch_parts(batch: dict):
    x = batch["image"]
    y = batch.get("label")
    index = batch.get("index")
    if index is None:
        raise ValueError("the batch needs 'index' [B] (global example indices; they key the noise)")
    return x, y, jnp.asarray(index, jnp.int32)


def make_chain_fn(apply_fn: ApplyFn, schedule: Schedule, *, mesh: jax.sharding.Mesh, t_chunk: int,
                  mean_type: str, var_type: str, clip_denoised: bool = True, class_cond: bool = False,
                  cond_apply_fn: CondApplyFn | None = None):
    """The jitted full-chain step of the NLL runner, its batch split over every axis of `mesh` (data and fsdp).

    Args:
      apply_fn: `(params, x, model timesteps, y) -> output`; a classifier-free
        guided one for the bound of a CFG chain.
      class_cond: pass the labels to `apply_fn`.
      cond_apply_fn: optional classifier guidance `(params, x_t, model
        timesteps, y) -> s * grad log p(y | x_t)`, the labels being the
        batch's true ones; `params` is the same (replicated) pytree
        `apply_fn` gets, e.g. (model params, classifier params).

    Returns:
      `step(params, batch, rng) -> (NllBatch, index [B], valid [B])`, all
      replicated (every host can read them).  `batch` is
      {"image" [B,H,W,C], "index" [B], "valid" [B], "label" [B] if
      `class_cond` or `cond_apply_fn`} with B a multiple of the mesh size;
      params and rng are replicated.
    """
    gaussian.check_mean_type(mean_type)
    gaussian.check_var_type(var_type)

    with_labels = class_cond or cond_apply_fn is not None

    def local(params, batch, rng):
        x, y, index = _batch_parts(batch)
        model_fn = lambda xt, ts, yy: apply_fn(params, xt, ts, yy if class_cond else None)
        cond_fn = None if cond_apply_fn is None else (lambda xt, ts, yy: cond_apply_fn(params, xt, ts, yy))
        terms = chain_terms(model_fn, schedule, x, y if with_labels else None, index, rng, t_chunk=t_chunk,
                            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised, cond_fn=cond_fn)
        out = reduce_chain(terms, batch["valid"])
        # Per-t sums are the only cross-device reduction.
        out = out._replace(vb_t=jax.lax.psum(out.vb_t, axes), mse_t=jax.lax.psum(out.mse_t, axes),
                           xstart_mse_t=jax.lax.psum(out.xstart_mse_t, axes))
        return out, index, batch["valid"]

    rows = batch_spec(mesh)  # the batch over all devices: an FSDP mesh repeats no example
    axes = tuple(mesh.axis_names)
    out_specs = (NllBatch(*([rows] * 5 + [P()] * 3)), rows, rows)

    def step(params, batch, rng):
        batch = {k: batch[k] for k in ("image", "index", "valid") + (("label",) if with_labels else ())}
        in_specs = (P(), {k: rows for k in batch}, P())
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(params, batch, rng)

    repl = NamedSharding(mesh, P())
    return jax.jit(step, out_shardings=(NllBatch(*([repl] * 8)), repl, repl))


# ----------------------------------------------------------------------------- K-step estimate
def proposal_from_profile(vb_per_t, uniform_mix: float = 0.1) -> np.ndarray:
    """p(t) ∝ a per-t vb profile (e.g. a previous run's mean vb), mixed with uniform.

    The uniform share keeps p(t) > 0 everywhere, which unbiasedness needs.
    """
    w = np.abs(np.asarray(vb_per_t, np.float64))
    if w.ndim != 1 or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("the vb profile must be a finite 1-D array with a positive sum")
    return (1.0 - uniform_mix) * w / w.sum() + uniform_mix / w.shape[0]


def _check_proposal(proposal, k: int) -> np.ndarray:
    p = np.full(k, 1.0 / k) if proposal is None else np.asarray(proposal, np.float64)
    if p.shape != (k,):
        raise ValueError(f"proposal must have shape [{k}] (one weight per timestep), got {p.shape}")
    if not np.all(p > 0) or not np.all(np.isfinite(p)):
        raise ValueError("every timestep needs proposal weight > 0 for an unbiased estimate "
                         "(use proposal_from_profile to mix in a uniform share)")
    return p / p.sum()


def importance_sampled_bpd(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array, y, index: jax.Array,
                           rng: jax.Array, *, proposal: jax.Array, num_draws: int, mean_type: str,
                           var_type: str, clip_denoised: bool = True) -> jax.Array:
    """Unbiased estimate `[B]` of the full bound from `num_draws` timesteps per example.

    t_1..t_D ~ p(t) i.i.d. and bpd_hat = mean_d vb_{t_d} / p(t_d) + prior, so
    E[bpd_hat] = sum_t E[vb_t] + prior (importance sampling over t, Nichol &
    Dhariwal 2021, Sec. 3.3).  With `t_rng, noise_rng = split(rng)`, the
    timesteps of example i come from `fold_in(t_rng, index[i])` and eps of
    (i, t) is `example_noise(noise_rng, index[i], t)`, i.e. the noise the
    full chain `chain_terms(..., noise_rng)` uses: given the noise, the
    estimate's mean over t-draws is exactly that chain's total.
    """
    t_rng, noise_rng = jax.random.split(rng)
    k = schedule.num_timesteps
    draw = lambda i: jax.random.choice(jax.random.fold_in(t_rng, i), k, (num_draws,), p=proposal)
    t = jax.vmap(draw)(index).astype(jnp.int32)  # [B, D]
    terms = terms_at(model_fn, schedule, x_start, y, index, t, noise_rng, mean_type=mean_type,
                     var_type=var_type, clip_denoised=clip_denoised)
    return jnp.mean(terms.vb / proposal[t], axis=1) + likelihood.prior_bpd(schedule, x_start)


def make_nll_estimator(apply_fn: ApplyFn, schedule: Schedule, *, mean_type: str, var_type: str,
                       clip_denoised: bool = True, num_draws: int = 8, proposal=None,
                       class_cond: bool = False, mesh: jax.sharding.Mesh | None = None):
    """A jitted `(params, batch, rng) -> [B]` unbiased bits/dim estimate, for logging in training.

    Args:
      apply_fn: `(params, x, model_timesteps, y) -> output`; see `module_apply`.
      schedule: the process whose bound is estimated (usually the training one).
      num_draws: timesteps per example (cost: `num_draws` forward passes of B).
      proposal: p(t) `[K]` (normalised here), e.g. `proposal_from_profile(...)`
        or a `LossSecondMomentSampler`'s weights; None = uniform.
      class_cond: pass `batch["label"]` to the model.
      mesh: split the batch over every axis of this mesh (None: plain jit,
        shardings follow the inputs).

    Returns:
      `estimate(params, batch, rng)`; `batch` has "image" [B,H,W,C] in [-1, 1],
      optional "index" [B] (global example ids; default arange(B)) and "label".
      The mean over a test set estimates its bits/dim without bias.
    """
    gaussian.check_mean_type(mean_type)
    gaussian.check_var_type(var_type)
    p = jnp.asarray(_check_proposal(proposal, schedule.num_timesteps), jnp.float32)

    def estimate(params, batch, rng):
        x = batch["image"]
        index = batch.get("index")
        index = jnp.arange(x.shape[0], dtype=jnp.int32) if index is None else jnp.asarray(index, jnp.int32)
        y = batch.get("label") if class_cond else None
        model_fn = lambda xt, ts, yy: apply_fn(params, xt, ts, yy)
        return importance_sampled_bpd(model_fn, schedule, x, y, index, rng, proposal=p, num_draws=num_draws,
                                      mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)

    if mesh is None:
        return jax.jit(estimate)
    return jax.jit(estimate, out_shardings=data_sharded(mesh))


__all__ = [
    "ChainTerms", "NllBatch", "chain_terms", "example_noise", "global_batch", "importance_sampled_bpd",
    "make_chain_fn", "make_mesh", "make_nll_estimator", "module_apply", "proposal_from_profile",
    "quartile_of", "reduce_chain", "terms_at",
]
