"""Streaming FID / sFID / Inception Score: running sums per batch, host memory O(batch), resumable.

FID needs only the mean and covariance of the features, so a run keeps, in
float64 on the host, the count n, Σf and Σf fᵀ of the pool features (and of
the spatial features for sFID): mu = Σf / n, sigma = (Σf fᵀ - n mu muᵀ) / (n - 1),
`np.cov`'s unbiased estimate.  The Inception Score of OpenAI's evaluator
averages exp(E_x KL(p(y|x) || p(y))) over consecutive splits of 5000 samples;
per split it needs only Σp and Σ_x Σ_y p log p:

    E_x KL = (1/m) Σ_x Σ_y p log p - Σ_y p̄ log p̄,   p̄ = Σp / m

(with OpenAI's `+ 1e-30` inside both logs).  Batches are added in sample
order, so the sums are a function of the samples and the batch boundaries
only; precision/recall need every feature at once and are not streamable.

`accumulate` runs the feature network on the devices on each `engine.Batch`
(images never leave the devices), gathers the features of every host, adds
them, and hands the sums to a callback (`save` on process 0 after every k
batches); `load` resumes from such a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import numpy as np

from diffusion_jax.evaluation import metrics
from diffusion_jax.runtime import parallel, resume

SPLIT_SIZE = 5000  # OpenAI's evaluator: Inception Score over splits of 5000 samples
EPS = 1e-30  # inside the logs, as OpenAI's evaluator


class Sums(NamedTuple):
    """Running sums over samples 0..count-1 (float64; empty arrays for metrics not computed)."""

    count: np.ndarray  # int64 []
    pool_sum: np.ndarray  # [D] Σf of the pool features (FID)
    pool_outer: np.ndarray  # [D, D] Σf fᵀ
    spatial_sum: np.ndarray  # [Ds] sFID's spatial features
    spatial_outer: np.ndarray  # [Ds, Ds]
    split_count: np.ndarray  # int64 [S] samples in each Inception Score split
    split_p: np.ndarray  # [S, K] Σp(y|x) per split
    split_plogp: np.ndarray  # [S] Σ_x Σ_y p log(p + EPS) per split


def empty(num_samples: int, *, pool_dim: int, spatial_dim: int, num_logits: int,
          split_size: int = SPLIT_SIZE) -> Sums:
    """Zero sums for `num_samples` samples; a dimension of 0 switches that metric off."""
    splits = -(-num_samples // split_size) if num_logits else 0
    z = lambda *shape: np.zeros(shape, np.float64)
    return Sums(np.zeros((), np.int64), z(pool_dim), z(pool_dim, pool_dim), z(spatial_dim),
                z(spatial_dim, spatial_dim), np.zeros((splits,), np.int64), z(splits, num_logits), z(splits))


def _add_moments(s: np.ndarray, q: np.ndarray, f) -> tuple[np.ndarray, np.ndarray]:
    if s.size == 0:
        return s, q
    f = np.asarray(f, np.float64)
    return s + f.sum(axis=0), q + f.T @ f


def add(sums: Sums, first: int, pool, spatial, logits, split_size: int = SPLIT_SIZE) -> Sums:
    """Add samples first..first+n-1 (their features, `[n, ...]`); a new `Sums`.

    Raises:
      ValueError: `first` is not the next sample (`sums.count`): batches must come in order.
    """
    if int(first) != int(sums.count):
        raise ValueError(f"batch starts at sample {first} but {int(sums.count)} samples were added")
    n = len(pool)
    pool_sum, pool_outer = _add_moments(sums.pool_sum, sums.pool_outer, pool)
    spatial_sum, spatial_outer = _add_moments(sums.spatial_sum, sums.spatial_outer, spatial)
    split_count, split_p, split_plogp = sums.split_count, sums.split_p, sums.split_plogp
    if split_p.size:
        p = metrics.softmax(logits)  # float64 [n, K]
        split = (first + np.arange(n)) // split_size
        split_count, split_p, split_plogp = split_count.copy(), split_p.copy(), split_plogp.copy()
        np.add.at(split_count, split, 1)
        np.add.at(split_p, split, p)
        np.add.at(split_plogp, split, np.sum(p * np.log(p + EPS), axis=1))
    return Sums(sums.count + n, pool_sum, pool_outer, spatial_sum, spatial_outer, split_count, split_p,
                split_plogp)


def stats(feature_sum: np.ndarray, outer: np.ndarray, count) -> metrics.Stats:
    """Mean and unbiased covariance from Σf, Σf fᵀ and n (what `metrics.feature_stats` gives for all rows)."""
    n = int(count)
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {n}")
    mu = feature_sum / n
    return metrics.Stats(mu, (outer - n * np.outer(mu, mu)) / (n - 1))


def inception_score(sums: Sums) -> float:
    """OpenAI's split-averaged Inception Score from the per-split sums (`metrics.inception_score`)."""
    scores = []
    for m, p_sum, plogp in zip(sums.split_count, sums.split_p, sums.split_plogp):
        if m:
            p_bar = p_sum / m
            scores.append(np.exp(plogp / m - np.sum(p_bar * np.log(p_bar + EPS))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- files
def save(path: str, sums: Sums, settings: dict) -> None:
    """Atomic write (tmp file + os.replace): a killed run leaves the previous file or the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, settings=np.array(json.dumps(settings, sort_keys=True)), **sums._asdict())
    os.replace(tmp, path)


def load(path: str, settings: dict, template: Sums, free: Iterable[str] = ()) -> Sums:
    """The sums saved at `path` for these settings, or `template` (zeros) when there is no file.

    Raises:
      ResumeError: the file was written with other settings (every difference
        listed, keys in `free` ignored) or holds differently shaped sums.
    """
    if not os.path.exists(path):
        return template
    with np.load(path, allow_pickle=False) as f:
        resume.check_settings(path, json.loads(str(f["settings"])), settings, free)
        sums = Sums(**{k: f[k] for k in Sums._fields})
    bad = [k for k, a, b in zip(Sums._fields, sums, template) if a.shape != b.shape]
    if bad:
        raise resume.ResumeError(f"{path}: saved sums {bad} have other shapes than this run's; delete {path}")
    return sums


# ----------------------------------------------------------------------------- the loop
def make_features_on_device(features_fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """jit `features_fn(params, images uint8 [B, H, W, C]) -> (pool, spatial, logits)` with the batch
    sharded over the mesh (inputs stay where the engine left them; outputs sharded the same way)."""
    batch = parallel.data_sharded(mesh)
    return jax.jit(features_fn, out_shardings=batch)


def accumulate(batches: Iterable, features_fn: Callable, params, sums: Sums, *, mesh: jax.sharding.Mesh,
               split_size: int = SPLIT_SIZE, on_batch: Callable[[Sums], None] | None = None) -> Sums:
    """Add the features of every `engine.Batch` (`first`, `count`, device `images`) in order.

    Args:
      batches: `engine.stream(...)` (or any iterable of objects with `first`,
        `count` and `images` uint8 `[B, H, W, C]` on the mesh), starting at
        sample `sums.count`.
      features_fn: traceable `(params, images) -> (pool [B, D], spatial [B, Ds],
        logits [B, K])` (Inception, or any stand-in); run on the devices.
      params: its parameters (replicated over the mesh).
      sums: the sums so far (`empty(...)` or `load(...)`).
      on_batch: called with the new sums after every batch (saving, progress).

    Returns:
      The sums over every sample.
    """
    from diffusion_jax.generation import engine

    features = make_features_on_device(features_fn, mesh)
    params = jax.tree.map(lambda a: parallel.put_global(mesh, np.asarray(a)), params)
    wanted = (sums.pool_sum.size > 0, sums.spatial_sum.size > 0, sums.split_p.size > 0)
    for b in batches:
        out = features(params, b.images)
        pool, spatial, logits = (engine.gather(f)[:b.count] if want else None for f, want in zip(out, wanted))
        sums = add(sums, b.first, pool if pool is not None else np.zeros((b.count, 0)), spatial, logits,
                   split_size)
        if on_batch is not None:
            on_batch(sums)
    return sums
