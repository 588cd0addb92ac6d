"""The one generation engine: global sample ids -> this host's rows -> compiled loop -> gather -> uint8.

`sample.py` (class-conditional, unconditional, text, cascades) and the
training grids all sample through `generate`.  It takes a per-batch sample
function and a count, and

1. rounds the batch up to a multiple of the mesh's device count,
2. gives batch b the global sample ids `[b * B, (b + 1) * B)` and feeds each
   host only the rows its devices hold (`jax.make_array_from_process_local_data`),
3. slices the conditioning (a pytree of per-sample arrays `[N, ...]`, or a
   function of sample ids) for exactly those rows,
4. runs the jitted function (output converted to uint8 on device), gathers
   every host's rows, and trims the padded rows of the last batch.

Sample i is then a function of (rng, i) alone whatever the device, host or
batch counts, because the loops draw sample i's noise from `fold_in(rng, i)`
(`sampling.sample_keys`).  Every host returns the same arrays; only the
caller's process 0 should write them.  `stream` yields the batches still on
the devices instead (streaming metrics, sharded sample files) and can start at
any sample id, so a resumed run recomputes exactly the missing samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from diffusion_jax.generation.images import to_uint8
from diffusion_jax.runtime import parallel

Conditioning = Any  # None | pytree of arrays [N, ...] | Callable[[np.ndarray ids [B]], pytree of [B, ...]]


class Samples(NamedTuple):
    """What `generate` returns, identical on every host."""

    images: np.ndarray  # uint8 [N, H, W, C]
    conditioning: Any  # the conditioning pytree of samples 0..N-1 ([N, ...] leaves), or None


def round_up_batch(batch_size: int, mesh: jax.sharding.Mesh) -> int:
    """The smallest multiple of the mesh's device count that is >= batch_size."""
    n = mesh.devices.size
    return -(-int(batch_size) // n) * n


def local_rows(sharding: jax.sharding.Sharding, global_batch: int) -> tuple[int, int]:
    """[start, stop) of the batch rows this process's devices hold under `sharding`."""
    idx = sharding.addressable_devices_indices_map((global_batch,)).values()
    starts = [s[0].start or 0 for s in idx]
    stops = [global_batch if s[0].stop is None else s[0].stop for s in idx]
    return min(starts), max(stops)


def conditioning_of(conditioning: Conditioning, num_samples: int) -> Callable[[np.ndarray], Any]:
    """`ids [B] -> pytree of [B, ...]` for either form of conditioning (ids clamped to N - 1)."""
    if conditioning is None:
        return lambda ids: None
    if callable(conditioning):
        return lambda ids: conditioning(np.minimum(ids, num_samples - 1))
    leaves = jax.tree.leaves(conditioning)
    bad = [np.shape(x) for x in leaves if np.shape(x)[:1] != (num_samples,)]
    if bad:
        raise ValueError(f"conditioning arrays must be [N={num_samples}, ...]; got shapes {bad}")
    return lambda ids: jax.tree.map(lambda x: np.asarray(x)[np.minimum(ids, num_samples - 1)], conditioning)


def gather(x: jax.Array) -> np.ndarray:
    """A batch-sharded global array -> the full host array, on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _place_args(mesh: jax.sharding.Mesh, args):
    """Arrays already on the mesh keep their sharding (e.g. training state); the rest are replicated."""
    devices = set(mesh.devices.flat)

    def place(a):
        if isinstance(a, jax.Array) and a.sharding.device_set == devices:
            return a
        return parallel.put_global(mesh, np.asarray(a))

    return jax.tree.map(place, args)


@functools.lru_cache(maxsize=16)
def _compile(sample_fn: Callable, impl, batch_sharding) -> Callable:
    """One jitted function per (sample_fn, key kind, sharding): a caller that keeps its `sample_fn` (the
    training grids) compiles once per run, not at every call."""
    def run(args, key_data, sample_ids, cond):
        return to_uint8(sample_fn(args, jax.random.wrap_key_data(key_data, impl=impl), sample_ids, cond))

    return jax.jit(run, out_shardings=batch_sharding)


class Batch(NamedTuple):
    """One batch of `stream`: device images and which global samples they are."""

    first: int  # global id of row 0
    count: int  # rows [0, count) are samples first..first + count - 1; the rest pad the last batch
    images: jax.Array  # uint8 [B, H, W, C], sharded over the mesh's devices (`parallel.data_sharded`)


def stream(sample_fn: Callable, num_samples: int, *, batch_size: int, rng: jax.Array, args: Any = None,
           conditioning: Conditioning = None, mesh: jax.sharding.Mesh | None = None, start: int = 0,
           log: Callable[[str], None] | None = print) -> Iterator[Batch]:
    """Samples `start .. num_samples - 1` in global batches left on the devices (see `generate`).

    Batch b holds the global sample ids `start + [b * B, (b + 1) * B)`; a
    resumed run (`start` > 0) computes the same images for the same ids.
    Every host iterates over every batch (each runs its own rows).

    Raises:
      ValueError: num_samples or batch_size < 1, or start outside [0, num_samples].
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1 (got {num_samples}, {batch_size})")
    if not 0 <= start <= num_samples:
        raise ValueError(f"start={start} must be in [0, num_samples={num_samples}]")
    mesh = parallel.make_mesh() if mesh is None else mesh
    batch = parallel.data_sharded(mesh)
    global_batch = round_up_batch(batch_size, mesh)
    if global_batch != batch_size and log is not None:
        log(f"batch_size {batch_size} rounded up to {global_batch} ({mesh.devices.size} devices)")
    cond_of = conditioning_of(conditioning, num_samples)
    fn = _compile(sample_fn, jax.random.key_impl(rng), batch)
    args = _place_args(mesh, args)
    key_data = parallel.put_global(mesh, np.asarray(jax.random.key_data(rng)))
    put = lambda a: jax.make_array_from_process_local_data(batch, np.asarray(a), (global_batch,) + np.shape(a)[1:])
    lo, hi = local_rows(batch, global_batch)

    def batches():  # a generator: the checks above run at the call, not at the first next()
        for first in range(start, num_samples, global_batch):
            ids = np.arange(first + lo, first + hi, dtype=np.int32)
            images = fn(args, key_data, put(ids), jax.tree.map(put, cond_of(ids)))
            yield Batch(first, min(global_batch, num_samples - first), images)

    return batches()


def generate(sample_fn: Callable, num_samples: int, *, batch_size: int, rng: jax.Array, args: Any = None,
             conditioning: Conditioning = None, mesh: jax.sharding.Mesh | None = None,
             log: Callable[[str], None] | None = print, desc: str = "") -> Samples:
    """Sample `num_samples` images in batches sharded over every device of every host.

    Args:
      sample_fn: `sample_fn(args, rng, sample_ids [B], cond) -> x [B, H, W, C]`
        in [-1, 1], traceable (the engine jits it); `cond` is the conditioning
        of those B samples (None without conditioning).  It must draw sample
        i's randomness from (rng, sample_ids[i]), as `sampling`'s loops do.
      num_samples: N.
      batch_size: samples per compiled call, rounded up to a multiple of the
        device count; the last batch is padded and its extra rows dropped.
      rng: the base key (the same on every host).
      args: a pytree of arrays every batch uses (params, ...); arrays on the
        mesh keep their sharding, host arrays are replicated.
      conditioning: None, a pytree of per-sample arrays `[N, ...]` (labels,
        `{"tokens", "mask"}`, low-resolution images, ...), or a function
        `ids [B] -> pytree of [B, ...]` of global sample ids.
      mesh: default `parallel.make_mesh()`; the batch is sharded with
        `parallel.data_sharded(mesh)`.
      log: progress lines (None: silent); desc prefixes them.

    Returns:
      `Samples(images uint8 [N, H, W, C], conditioning of samples 0..N-1)`.
    """
    chunks = []
    for b in stream(sample_fn, num_samples, batch_size=batch_size, rng=rng, args=args, conditioning=conditioning,
                    mesh=mesh, log=log):
        chunks.append(gather(b.images)[:b.count])
        if log is not None:
            log(f"{desc}batch {len(chunks)}/{-(-num_samples // len(b.images))}: {b.first + b.count} samples")
    cond_of = conditioning_of(conditioning, num_samples)
    all_ids = np.arange(num_samples, dtype=np.int32)
    return Samples(np.concatenate(chunks), cond_of(all_ids) if conditioning is not None else None)
