"""One grain input pipeline for every source (TFDS, `digits`, image folders).

Sources are random-access (`len(source)`, `source[i]` -> dict with a uint8
"image" [H, W, C], optional "label" and "caption").

Training data is one global stream, independent of the topology: the
concatenation of one permutation of all records per (seed, epoch), cut into
global batches of B, so global batch k holds the same records in the same
order whatever the process and device counts.  Process p of P reads rows
[p B/P, (p+1) B/P) of each global batch (grain `MapDataset` whose element k is
this process's part of batch k, read and preprocessed in one call; worker
processes and prefetch threads build batches ahead).  Random flips are a
function of (seed, position in the stream).  The iterator's state is the
stream position (examples consumed by all processes together), a small JSON
dict that restores on any topology:

    state = it.get_state()       # {"position": k * B, ...}
    it.set_state(state)          # on any process count, with any batch size

Pixels are mapped from uint8 to float32 exactly as `x / 127.5 - 1`, so 0 ->
-1.0 and 255 -> 1.0 exactly and the discretized Gaussian decoder's edge bins
line up with the data (Ho et al. 2020, Eq. 13; Nichol & Dhariwal 2021 §2).
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np
from absl import flags

from diffusion_jax.data.stream import TrainStream, _ReadGlobalRows, flip_mask, stream_records  # noqa: F401
from diffusion_jax.data.sources import (  # noqa: F401 - re-exported
    FOLDER_PREFIX,
    ArraySource,
    _as_image,
    _as_str,
    load_in_memory,
    make_source,
    resize_uint8,
    uint8_to_float,
)


def _read_examples(source, indices: np.ndarray) -> dict[str, Any]:
    """Fields of `source` at `indices`: stacked arrays, or lists when ragged."""
    if hasattr(source, "read_batch"):
        return source.read_batch(indices)
    examples = [source[int(i)] for i in indices]
    return {k: [e[k] for e in examples] for k in examples[0]}


class _ReadBatch:
    """Record indices [b] -> a preprocessed batch (resize, [-1, 1], labels).

    Works on whole batches so the per-example Python overhead is one resize at
    most; with an `ArraySource` at the native size there is no per-example work.
    """

    def __init__(self, source, *, image_size: int, with_labels: bool, with_captions: bool):
        self.source = source
        self.image_size = image_size
        self.with_labels = with_labels
        self.with_captions = with_captions

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        fields = _read_examples(self.source, np.asarray(indices, np.int64))
        size = (self.image_size, self.image_size)
        images = [_as_image(x) for x in fields["image"]]
        images = np.stack(
            [x if x.shape[:2] == size else resize_uint8(x, self.image_size) for x in images]
        )
        out = {"image": uint8_to_float(images)}
        if self.with_labels:
            out["label"] = np.asarray(fields["label"]).astype(np.int32)
        if self.with_captions:
            out["caption"] = np.array([_as_str(c) for c in fields["caption"]], np.str_)
        return out


def _check_source(source, *, channels: int, with_labels: bool, with_captions: bool) -> None:
    """Reads example 0 and fails early, in the caller's process, on mismatches."""
    if len(source) == 0:
        raise ValueError(f"The data source {source!r} is empty.")
    example = source[0]
    if not isinstance(example, dict) or "image" not in example:
        raise ValueError(
            f"Examples of {source!r} must be dicts with an 'image' "
            f"feature; got {type(example).__name__} {example!r:.200}."
        )
    image = _as_image(example["image"])
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"Expected uint8 images [H, W, C]; found {image.dtype} {image.shape}.")
    if image.shape[-1] != channels:
        raise ValueError(
            f"Channel mismatch: the model expects {channels} channel(s) but the "
            f"dataset's images have {image.shape[-1]} (shape {image.shape}). Set "
            f"`channels` (config.data.channels, and config.model.in_channels to "
            f"match) to {image.shape[-1]}, or use a dataset with {channels}-channel "
            f"images (image folders are always read as RGB)."
        )
    if with_labels and "label" not in example:
        raise ValueError(
            f"Examples have no 'label' (keys: {sorted(example)}); "
            "pass with_labels=False or train unconditionally."
        )
    if with_captions and "caption" not in example:
        raise ValueError(
            f"Examples have no 'caption' (keys: {sorted(example)}); "
            "text conditioning needs a captioned dataset."
        )


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top  (keeps workers light)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is not in [0, process_count={process_count})."
        )
    return process_index, process_count


def _per_process(batch_size: int, process_count: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"Batch size {batch_size} must be a positive multiple of "
            f"the number of processes ({process_count})."
        )
    return batch_size // process_count


# -------------------------------------------------------------- iterators ---


def shard_range(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[lo, hi) of this process's contiguous shard; the first shards get the
    remainder, so the shards are disjoint and together cover every record."""
    size, remainder = divmod(num_records, process_count)
    lo = process_index * size + min(process_index, remainder)
    return lo, lo + size + (process_index < remainder)


_ENDLESS = 2**62  # "Forever": 2**62 batches.


def _to_iterator(
    ds: grain.MapDataset,
    *,
    worker_count: int,
    worker_buffer_size: int,
    read_threads: int,
    prefetch: int,
) -> grain.DatasetIterator:
    ids = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    )
    if worker_count > 0:
        # grain reads an absl flag when it starts workers; outside an absl app
        # (scripts, notebooks, pytest) the flags are unparsed and that read
        # raises. Their defaults are what such callers want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Worker processes each build whole batches (batch i goes to worker
        # i % worker_count) and send them through shared memory.
        ids = ids.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    return iter(ids)


def make_train_iterator(
    source,
    *,
    global_batch_size: int,
    image_size: int,
    channels: int,
    seed: int,
    random_flip: bool = False,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 1,
    prefetch: int = 4,
    process_index: int | None = None,
    process_count: int | None = None,
    with_labels: bool = True,
    with_captions: bool = False,
    position: int = 0,
) -> TrainStream:
    """Infinite, shuffled training batches: this process's rows of each global batch.

    Global batch k holds the records at stream positions `position + k B +
    [0, B)` (`stream_records`: one permutation of all records per (seed,
    epoch)), whatever the process count; process p yields rows [p b, (p+1) b)
    of it, b = B / process_count; feed them to
    `jax.make_array_from_process_local_data`.

    Args:
      source: random-access source from `make_source` (or any object with
        `__len__`/`__getitem__` returning {"image": uint8 [H, W, C], ...}).
      global_batch_size: B, the batch size summed over all processes.
      image_size: output height and width; images of another size are resized
        with `resize_uint8`.
      channels: expected image channels; a mismatch raises ValueError.
      seed: shuffle and flip seed, an int in [0, 2**32).
      random_flip: random horizontal flips, a function of (seed, position)
        (off by default: digits must not be mirrored).
      worker_count: grain worker processes (0 = build batches in this process).
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: threads building batches ahead in each process (0 = none).
      prefetch: batches buffered by those threads.
      process_index, process_count: this process's rows; default
        `jax.process_index()` / `jax.process_count()`.
      with_labels, with_captions: include "label" / "caption" in batches.
      position: stream position of the first batch (examples already consumed).

    Returns:
      A `TrainStream` over dicts {"image": float32 [b, S, S, C] in [-1, 1],
      "label": int32 [b], "caption": str [b] (when requested)}.
    """
    process_index, process_count = _process_info(process_index, process_count)
    local_batch = _per_process(global_batch_size, process_count)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32) for grain; got {seed}.")
    _check_source(source, channels=channels, with_labels=with_labels, with_captions=with_captions)
    num_records = len(source)
    if isinstance(source, ArraySource):
        source = source.resized(image_size)  # Resize once, not every epoch.
    read = _ReadBatch(source, image_size=image_size, with_labels=with_labels, with_captions=with_captions)

    def build(start: int) -> grain.DatasetIterator:
        rows = _ReadGlobalRows(read, num_records=num_records, seed=int(seed), start=start,
                               global_batch=global_batch_size, local_batch=local_batch,
                               process_index=process_index, flip=random_flip)
        return _to_iterator(grain.MapDataset.range(_ENDLESS).map(rows), worker_count=worker_count,
                            worker_buffer_size=worker_buffer_size, read_threads=read_threads, prefetch=prefetch)

    return TrainStream(build, position=position, global_batch_size=global_batch_size, seed=int(seed),
                       num_records=num_records)


class _ReadEvalBatch:
    """Eval batch k -> this process's rows, with "index" and "valid".

    Global batch k holds examples start + k * B + [0, B); process p takes rows
    [p * b, (p + 1) * b) of it. Rows at or past `stop` are padding: they repeat
    example `start`, keep a unique index (>= stop) and have valid=False.
    """

    def __init__(
        self,
        read: _ReadBatch,
        *,
        start: int,
        num_examples: int,
        global_batch: int,
        local_batch: int,
        process_index: int,
    ):
        self.read = read
        self.start = start
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.local_batch = local_batch
        self.process_index = process_index

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        offsets = (
            int(k) * self.global_batch
            + self.process_index * self.local_batch
            + np.arange(self.local_batch)
        )
        valid = offsets < self.num_examples
        batch = self.read(self.start + np.where(valid, offsets, 0))
        batch["index"] = (self.start + offsets).astype(np.int32)
        batch["valid"] = valid
        return batch


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Batches every process yields for `num_examples` at global `batch_size`."""
    return math.ceil(num_examples / batch_size)


def make_eval_iterator(
    source,
    *,
    batch_size: int,
    image_size: int,
    channels: int,
    start: int = 0,
    stop: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    with_labels: bool = True,
    with_captions: bool = False,
    read_threads: int = 1,
    prefetch: int = 4,
) -> grain.DatasetIterator:
    """Deterministic, padded, single-pass batches of examples [start, stop).

    Every process yields the same number of batches,
    `num_eval_batches(stop - start, batch_size)`, each of the fixed per-process
    size `batch_size // process_count`, so all processes enter the same number
    of collectives. Stacking the processes' rows in process order gives global
    batch k = examples start + k * batch_size + [0, batch_size).

    Args:
      source: random-access source from `make_source`.
      batch_size: global batch size (summed over processes).
      image_size, channels: as in `make_train_iterator`.
      start, stop: example range of the source (stop None = len(source)).
      process_index, process_count: default to JAX's.
      with_labels, with_captions: include "label" / "caption".
      read_threads, prefetch: background threads and batches they buffer.

    Returns:
      An iterator of {"image": float32 [b, S, S, C], "label": int32 [b],
      "index": int32 [b] (global example index; padding rows get indices
      >= stop), "valid": bool [b] (False on padding rows)}.
    """
    process_index, process_count = _process_info(process_index, process_count)
    local_batch = _per_process(batch_size, process_count)
    stop = len(source) if stop is None else stop
    if not 0 <= start <= stop <= len(source):
        raise ValueError(
            f"Need 0 <= start <= stop <= {len(source)}; got start={start}, stop={stop}."
        )
    _check_source(source, channels=channels, with_labels=with_labels, with_captions=with_captions)
    if isinstance(source, ArraySource):
        source = source.resized(image_size)
    read = _ReadBatch(
        source, image_size=image_size, with_labels=with_labels, with_captions=with_captions
    )
    ds = grain.MapDataset.range(num_eval_batches(stop - start, batch_size))
    ds = ds.map(
        _ReadEvalBatch(
            read,
            start=start,
            num_examples=stop - start,
            global_batch=batch_size,
            local_batch=local_batch,
            process_index=process_index,
        )
    )
    return _to_iterator(
        ds, worker_count=0, worker_buffer_size=1, read_threads=read_threads, prefetch=prefetch
    )
