"""Resuming interrupted runs: the settings a partial result was computed with must match the rerun's.

Used by evaluate.py's NLL loop and streaming FID (`evaluation.run`,
`evaluation.streaming`) and by sample.py's sample shards
(`generation.shards`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable


class ResumeError(ValueError):
    """A partial result exists but was produced with other settings."""


def settings_differences(stored: dict, current: dict, free: Iterable[str] = ()) -> list[str]:
    """Human-readable differences of two settings dicts, ignoring the keys in `free`."""
    keys = sorted((set(stored) | set(current)) - set(free))
    return [f"{k}: stored {stored.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
            for k in keys if stored.get(k) != current.get(k)]


def check_settings(path: str, stored: dict, current: dict, free: Iterable[str] = ()) -> None:
    """Raise `ResumeError` listing every difference unless `current` (as JSON would store it) matches `stored`."""
    diffs = settings_differences(stored, json.loads(json.dumps(current)), free)
    if diffs:
        raise ResumeError(
            f"{path} holds partial results computed with other settings; refusing to resume:\n  "
            + "\n  ".join(diffs) + f"\nUse the same settings, another --out, or delete {path}.")
