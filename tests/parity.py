"""Shared helpers for parity tests against OpenAI's outputs (tests/data/parity)."""
import functools
import os

import numpy as np

PARITY_DIR = os.path.join(os.path.dirname(__file__), "data", "parity")

# Settings of the diffusion cases in the parity files (manifest.json).
CASES = {
    "linear1000": dict(noise_schedule="linear", diffusion_steps=1000, timestep_respacing="",
                       rescale_timesteps=False),
    "cosine1000_r50": dict(noise_schedule="cosine", diffusion_steps=1000, timestep_respacing="50",
                           rescale_timesteps=True),
}


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    with np.load(os.path.join(PARITY_DIR, name)) as f:
        return {k: f[k] for k in f.files}


def nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW (or [K, N, C, H, W]) -> channels last."""
    x = np.asarray(x)
    return np.moveaxis(x, -3, -1)


def max_errors(got, want) -> tuple[float, float]:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    abs_err = np.abs(got - want)
    rel = abs_err / np.maximum(np.abs(want), 1e-30)
    return float(abs_err.max()), float(rel.max())
