"""Sample-quality metrics with the definitions of guided-diffusion's `evaluations/evaluator.py`.

FID / sFID: Frechet distance of Gaussians fitted to features (float64 host
maths, scipy's sqrtm).  IS: exp E_x KL(p(y|x) || p(y)) on softmax outputs,
averaged over splits of `split_size` (OpenAI: 5000, i.e. 10 splits of 50k).
Precision / recall: Kynkaenniemi et al. (2019) with k = 3 nearest neighbours,
squared Euclidean distances computed block by block.

Every function takes feature arrays, so the same metrics work in any
feature space: Inception (`inception.py`) or, offline, a small classifier
trained on digits (`feature_metrics`).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Stats(NamedTuple):
    mu: np.ndarray  # [D]
    sigma: np.ndarray  # [D, D]


def feature_stats(features) -> Stats:
    """Mean and covariance (rows are examples) in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got {f.shape}")
    return Stats(f.mean(axis=0), np.cov(f, rowvar=False))


def frechet_distance(a: Stats, b: Stats, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    s1, s2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps  # OpenAI's fallback for singular products
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(probs, split_size: int = 5000) -> float:
    """exp(E KL(p(y|x) || p(y))) averaged over consecutive splits of `split_size` rows."""
    p = np.asarray(probs, np.float64)
    scores = []
    for lo in range(0, len(p), split_size):
        part = p[lo:lo + split_size]
        kl = part * (np.log(part + 1e-30) - np.log(np.mean(part, axis=0, keepdims=True) + 1e-30))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def softmax(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def manifold_radii(features, k: int = 3, block: int = 10000) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point `[N]`."""
    f = np.asarray(features, np.float32)
    if len(f) <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {len(f)}")
    radii = np.empty(len(f), np.float32)
    for lo in range(0, len(f), block):
        d = _sq_distances(f[lo:lo + block], f)
        radii[lo:lo + block] = np.partition(d, k, axis=1)[:, k]  # column 0 is the point itself
    return radii


def _inside(points, centres, radii, block: int) -> np.ndarray:
    """Whether each point lies within some centre's radius (the k-NN manifold)."""
    out = np.zeros(len(points), bool)
    for lo in range(0, len(points), block):
        d = _sq_distances(points[lo:lo + block], centres)
        out[lo:lo + block] = (d <= radii[None, :]).any(axis=1)
    return out


def precision_recall(ref_features, sample_features, k: int = 3, block: int = 10000) -> tuple[float, float]:
    """Improved precision (samples inside the reference manifold) and recall (vice versa)."""
    ref = np.asarray(ref_features, np.float32)
    sam = np.asarray(sample_features, np.float32)
    precision = _inside(sam, ref, manifold_radii(ref, k, block), block).mean()
    recall = _inside(ref, sam, manifold_radii(sam, k, block), block).mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------- reference batches
def load_reference(path: str, *, feature_dims=(2048, 2023)) -> dict:
    """Read an OpenAI `VIRTUAL_*.npz`: {"mu", "sigma", "mu_s", "sigma_s"} and/or "images" (arr_0).

    Raises:
      ValueError: not an .npz, neither images nor statistics, or wrongly
        shaped ones, naming the file, the key and the shapes.
    """
    layout = (f"OpenAI's VIRTUAL_*.npz layout: arr_0 uint8 images [N, H, W, 3] and/or mu [{feature_dims[0]}], "
              f"sigma [{feature_dims[0]}, {feature_dims[0]}] (optionally mu_s, sigma_s)")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array")
        with f:
            data = {k: f[k] for k in f.files}
    except (ValueError, EOFError, zipfile.BadZipFile) as e:  # a pickle, object arrays, not NumPy's format
        raise ValueError(f"{path} is not a readable .npz file ({e}); pass a reference batch in {layout}") from e
    out = {}
    if "arr_0" in data:
        images = data["arr_0"]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{path}: arr_0 must be uint8 images [N, H, W, 3], got {images.shape}")
        out["images"] = images
    for mu_key, sigma_key, dim in (("mu", "sigma", feature_dims[0]), ("mu_s", "sigma_s", feature_dims[1])):
        if mu_key in data:
            mu, sigma = data[mu_key], data.get(sigma_key)
            if mu.shape != (dim,) or sigma is None or sigma.shape != (dim, dim):
                raise ValueError(
                    f"{path}: expected {mu_key} [{dim}] and {sigma_key} [{dim}, {dim}] (Inception pool_3 / "
                    f"mixed_6 statistics), got {mu.shape} and {None if sigma is None else sigma.shape}")
            out[mu_key.replace("mu", "stats")] = Stats(mu.astype(np.float64), sigma.astype(np.float64))
    if not out:
        raise ValueError(f"{path} has neither arr_0 images nor mu/sigma statistics (keys: {sorted(data)}); "
                         f"pass a reference batch in {layout}")
    return out


def feature_metrics(ref_features, sample_features, *, k: int = 3) -> dict:
    """FID and precision/recall between two feature sets (any feature space)."""
    precision, recall = precision_recall(ref_features, sample_features, k=k)
    return {"fid": frechet_distance(feature_stats(ref_features), feature_stats(sample_features)),
            "precision": precision, "recall": recall}


def classifier_accuracy(logits_fn: Callable, images, labels, batch_size: int = 256) -> float:
    """Fraction of conditional samples that a classifier assigns their intended label."""
    hits = 0
    for lo in range(0, len(images), batch_size):
        pred = np.argmax(np.asarray(logits_fn(images[lo:lo + batch_size])), axis=-1)
        hits += int(np.sum(pred == np.asarray(labels[lo:lo + batch_size])))
    return hits / len(images)


def sample_metrics(features_fn: Callable, samples, ref: dict, *, k: int = 3, split_size: int = 5000) -> dict:
    """guided-diffusion's evaluator: IS, FID, sFID, precision, recall of `samples` vs `ref`.

    Args:
      features_fn: images -> `InceptionFeatures` (pool, spatial, logits).
      samples: uint8 [N, H, W, 3].
      ref: `load_reference(...)` output; P/R need its images, FID/sFID use its
        statistics when present (else the images').
    """
    s = features_fn(samples)
    out = {"num_samples": len(samples), "inception_score": inception_score(softmax(s.logits), split_size)}
    r = features_fn(ref["images"]) if "images" in ref else None
    ref_pool = ref.get("stats") or feature_stats(r.pool)
    ref_spatial = ref.get("stats_s") or (feature_stats(r.spatial) if r is not None else None)
    out["fid"] = frechet_distance(ref_pool, feature_stats(s.pool))
    if ref_spatial is not None:
        out["sfid"] = frechet_distance(ref_spatial, feature_stats(s.spatial))
    if r is not None:
        out["precision"], out["recall"] = precision_recall(r.pool, s.pool, k=k)
    return out
