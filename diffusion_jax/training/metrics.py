"""Training logs: ``metrics.jsonl`` + TensorBoard events (``MetricWriter``), interval averages
(``summarize``) and the progress bar; process 0 writes, the others stay silent."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from diffusion_jax.runtime import parallel


class MetricWriter:
    """metrics.jsonl + TensorBoard events, process 0 only."""

    def __init__(self, workdir: str, purge_step: int | None = None):
        self.enabled = parallel.is_main_process()
        self._file = self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                # purge_step: TensorBoard hides events of steps >= it written before a resume.
                self._tb = SummaryWriter(logdir=workdir, purge_step=purge_step)
            except ImportError:  # TensorBoard is optional; JSON lines always work.
                self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def summarize(history: list[dict]) -> dict:
    """Average per-step device metrics over a log interval; quartiles become *_q0..*_q3."""
    host = jax.device_get(history)
    out = {}
    for key in host[0]:
        vals = np.stack([np.asarray(h[key], np.float64) for h in host])
        counts = np.isfinite(vals).sum(axis=0)
        # Quartiles without samples this interval stay NaN (written as null).
        mean = np.where(counts > 0, np.nansum(np.where(np.isfinite(vals), vals, 0.0), axis=0) / np.maximum(counts, 1),
                        np.nan)
        if mean.ndim:
            for i, v in enumerate(mean):
                out[f"{key[:-2]}_q{i}"] = float(v)
        else:
            out[key] = float(mean)
    return out


def progress_bar(start: int, total: int):
    """The training progress bar (tqdm), shown on process 0 only."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", disable=not parallel.is_main_process(),
                dynamic_ncols=True, mininterval=1.0)
