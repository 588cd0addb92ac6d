"""One grain input pipeline for every source (TFDS, `digits`, image folders).

Sources are random-access (`len(source)`, `source[i]` -> dict with a uint8
"image" [H, W, C], optional "label" and "caption"). Iterators are grain
`MapDataset` pipelines whose element k is batch k: each process takes its own
contiguous shard, shuffles it with the seed (a new permutation each epoch),
repeats forever, and each batch is read and preprocessed in one call (no
per-record pipeline stages, which cost grain ~0.1-0.2 ms each). Worker
processes (`mp_prefetch`) and prefetch threads build whole batches ahead. The
iterator state is a batch counter (one per worker), so a restored iterator
yields exactly the batches the original would have. Randomness (the optional flip) comes from grain's seeded
`random_map`, a function of (seed, batch number).

Pixels are mapped from uint8 to float32 exactly as `x / 127.5 - 1`, so 0 ->
-1.0 and 255 -> 1.0 exactly and the discretized Gaussian decoder's edge bins
line up with the data (Ho et al. 2020, Eq. 13; Nichol & Dhariwal 2021 §2).

Checkpointing a training iterator with orbax (grain ships the handler):

    import grain, orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(
        directory, item_names=("data",),
        item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    mngr.save(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(train_iter)))
    mngr.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(train_iter)))  # In place.

The handler writes one small JSON file per process
(`process_{i}-of-{n}.json`), so every process saves and restores its own
shard's position. Without orbax: `state = it.get_state()` (a small
JSON-serialisable dict) and `it.set_state(state)` on a freshly built iterator
with the same arguments (the worker count must match).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import grain
import numpy as np
from absl import flags

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


def _random_flip(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Flips each image left-right with probability 1/2 (grain's seeded rng)."""
    flip = rng.random(batch["image"].shape[0]) < 0.5
    image = np.where(flip[:, None, None, None], batch["image"][:, :, ::-1], batch["image"])
    return dict(batch, image=image)


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


@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_records: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    """A fixed permutation of range(num_records) for (seed, stream, epoch)."""
    rng = np.random.default_rng([seed, stream, epoch])  # SeedSequence-mixed.
    perm = rng.permutation(num_records)
    perm.flags.writeable = False  # Shared by every caller of the cache.
    return perm


class _ShuffledBatchIndices:
    """Batch number k -> record indices [batch_size] in [lo, hi).

    The index stream is perm(epoch 0) ++ perm(epoch 1) ++ ... of the shard, so
    every record is seen once per epoch and batches may straddle epochs (no
    example is ever dropped). One vectorised permutation per epoch replaces
    grain's per-record `index_shuffle`, which costs ~0.1 ms a record.
    """

    def __init__(self, lo: int, hi: int, *, batch_size: int, seed: int, stream: int):
        self.lo, self.hi = lo, hi
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream

    def __call__(self, k: int) -> np.ndarray:
        n = self.hi - self.lo
        positions = int(k) * self.batch_size + np.arange(self.batch_size)
        epochs, within = np.divmod(positions, n)
        out = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            perm = _epoch_permutation(n, self.seed, self.stream, int(epoch))
            out[mask] = self.lo + perm[within[mask]]
        return out


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
) -> grain.DatasetIterator:
    """Infinite, shuffled, per-process training batches; checkpointable.

    Each process takes a contiguous shard of the records (`shard_range`),
    shuffles it with `seed` (a fresh permutation every epoch), repeats forever,
    and yields batches of `global_batch_size // process_count`; feed them to
    `jax.make_array_from_process_local_data`.

    Args:
      source: random-access source from `make_source` (or any object with
        `__len__`/`__getitem__` returning {"image": uint8 [H, W, C], ...}).
      global_batch_size: batch size summed over all processes.
      image_size: output height and width; images of another size are resized
        with `resize_uint8`.
      channels: expected image channels; a mismatch raises ValueError.
      seed: shuffle and flip seed, an int in [0, 2**32).
      random_flip: random horizontal flips (off by default: digits must not be
        mirrored).
      worker_count: grain worker processes (0 = build batches in this process).
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: threads building batches ahead in each process (0 = none).
      prefetch: batches buffered by those threads.
      process_index, process_count: this process's shard; default
        `jax.process_index()` / `jax.process_count()`.
      with_labels, with_captions: include "label" / "caption" in batches.

    Returns:
      A grain `DatasetIterator` (`get_state()`/`set_state()`, orbax handler
      `grain.checkpoint.CheckpointHandler`) over dicts {"image": float32
      [b, S, S, C] in [-1, 1], "label": int32 [b], "caption": str [b] (when
      requested)}, b = global_batch_size // process_count.
    """
    process_index, process_count = _process_info(process_index, process_count)
    local_batch = _per_process(global_batch_size, process_count)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32) for grain; got {seed}.")
    _check_source(source, channels=channels, with_labels=with_labels, with_captions=with_captions)
    lo, hi = shard_range(len(source), process_index, process_count)
    if hi == lo:
        raise ValueError(f"{len(source)} records cannot be shared by {process_count} processes.")
    if isinstance(source, ArraySource):
        source = source.resized(image_size)  # Resize once, not every epoch.
    # Element k of the dataset is batch k: its record indices (the stream of
    # per-epoch permutations of the shard, cut into consecutive pieces), read
    # and preprocessed in one call.
    ds = grain.MapDataset.range(_ENDLESS).map(
        _ShuffledBatchIndices(lo, hi, batch_size=local_batch, seed=int(seed), stream=process_index)
    )
    ds = ds.map(
        _ReadBatch(
            source, image_size=image_size, with_labels=with_labels, with_captions=with_captions
        )
    )
    if random_flip:
        # grain's seeded random_map draws batch k's rng from (seed, k): resumable,
        # and independent of worker_count and read_threads.
        ds = ds.random_map(_random_flip, seed=int(seed))
    return _to_iterator(
        ds,
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        read_threads=read_threads,
        prefetch=prefetch,
    )


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
