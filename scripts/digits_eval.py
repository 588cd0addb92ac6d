"""Shared helpers of the digits scripts: the digits splits, a clean digits classifier, FDD.

The clean classifier is a small Flax CNN trained on the digits *train* split
(uint8 8x8 images -> 10 classes) in about a minute on a CPU.  Its 64-wide
penultimate layer is the feature space of the "Fréchet digits distance"
(FDD): the Fréchet distance (Heusel et al. 2017, the formula of FID) between
Gaussian fits of the features of two image sets.  FDD is not FID: the
features come from this digits classifier, not from Inception.

  from digits_eval import digits_split, CleanClassifier
  clf = CleanClassifier.train_or_load("runs/clean_cnn.npz")
  fdd = clf.fdd(samples_u8, reference_u8); acc = clf.accuracy(samples_u8, labels)
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import metrics


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images `[N, 8, 8, 1]`, int labels `[N]`) of a digits split ("train" | "test")."""
    source = pipeline.make_source("digits", split)
    return np.asarray(source.arrays["image"]), np.asarray(source.arrays["label"])


class DigitsCNN(nn.Module):
    """conv3x3(32) - conv3x3/2(64) - dense(64) [features] - dense(10), ReLU between."""

    features: int = 64

    @nn.compact
    def __call__(self, x):  # x: [B, 8, 8, 1] in [-1, 1] -> (logits [B, 10], features [B, 64])
        h = nn.relu(nn.Conv(32, (3, 3))(x))
        h = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(h))
        feats = nn.relu(nn.Dense(self.features)(h.reshape(h.shape[0], -1)))
        return nn.Dense(10)(feats), feats


def _scale(images_u8) -> jax.Array:
    return jnp.asarray(images_u8, jnp.float32) / 127.5 - 1.0


class CleanClassifier:
    """A trained `DigitsCNN`: logits, penultimate features, accuracy and FDD of uint8 images."""

    def __init__(self, params):
        self.params = params
        self._apply = jax.jit(lambda p, x: DigitsCNN().apply({"params": p}, _scale(x)))

    @classmethod
    def train(cls, *, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> "CleanClassifier":
        """Adam on the digits train split (cross-entropy, random batches; no augmentation)."""
        x, y = digits_split("train")
        params = DigitsCNN().init(jax.random.key(seed), _scale(x[:1]))["params"]
        tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
        opt = tx.init(params)

        @jax.jit
        def step(params, opt, xb, yb):
            def loss(p):
                logits, _ = DigitsCNN().apply({"params": p}, _scale(xb))
                return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            grads = jax.grad(loss)(params)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt

        rs = np.random.RandomState(seed)
        for _ in range(steps):
            idx = rs.randint(0, len(x), batch_size)
            params, opt = step(params, opt, x[idx], y[idx])
        return cls(params)

    @classmethod
    def train_or_load(cls, path: str | None = None, **train_kwargs) -> "CleanClassifier":
        """Load params from an .npz (no pickle) written by an earlier call, else train and write it."""
        if path and os.path.exists(path):
            with np.load(path, allow_pickle=False) as f:
                flat = {tuple(k.split("/")): jnp.asarray(f[k]) for k in f.files}
            return cls(traverse_util.unflatten_dict(flat))
        clf = cls.train(**train_kwargs)
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            flat = traverse_util.flatten_dict(jax.device_get(clf.params))
            np.savez(path, **{"/".join(k): np.asarray(v) for k, v in flat.items()})
        return clf

    def logits_and_features(self, images_u8, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """(logits `[N, 10]`, features `[N, 64]`) as float64 NumPy."""
        outs = [self._apply(self.params, images_u8[i:i + batch_size]) for i in range(0, len(images_u8), batch_size)]
        return (np.concatenate([np.asarray(o[0], np.float64) for o in outs]),
                np.concatenate([np.asarray(o[1], np.float64) for o in outs]))

    def predict(self, images_u8) -> np.ndarray:
        return np.argmax(self.logits_and_features(images_u8)[0], -1)

    def accuracy(self, images_u8, labels) -> float:
        return float(np.mean(self.predict(images_u8) == np.asarray(labels)))

    def stats(self, images_u8) -> metrics.Stats:
        return metrics.feature_stats(self.logits_and_features(images_u8)[1])

    def fdd(self, images_u8, reference: metrics.Stats) -> float:
        """Fréchet digits distance of `images_u8` to the reference feature statistics."""
        return metrics.frechet_distance(self.stats(images_u8), reference)
