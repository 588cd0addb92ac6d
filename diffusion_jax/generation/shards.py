"""sample.py for large N: write the samples as shards while sampling, resume from them, assemble OpenAI's npz.

Host memory stays O(batch): after every engine batch process 0 writes
`<npz stem>.shards/<first id>.npz` (`arr_0` uint8 `[n, H, W, C]`, `arr_1`
labels if any; tmp file + os.replace, so a killed run leaves whole shards
only) beside `settings.json`, what determines the samples.  A rerun with the
same settings continues after the last contiguous shard (sample i is a
function of (seed, i), so the resumed images are the ones an uninterrupted
run makes); other settings are refused with the differences.  At the end the
shards are streamed into `samples_NxHxWxC.npz` (the `.npy` members written
with `numpy.lib.format` headers, one shard in memory at a time: the same
arrays `np.savez` writes), the PNG grid is drawn from the first samples, and
the shards are removed.  Every host must see the shard folder (a shared
filesystem) to resume.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator

import jax
import numpy as np

from diffusion_jax.generation import engine, images
from diffusion_jax.runtime import resume

MAX_IN_MEMORY_BYTES = 1 << 30  # above this many bytes of samples sample.py writes shards (unless told)
SETTINGS_FILE = "settings.json"
# Options that do not change the samples.
RESUME_FREE = ("batch_size", "out", "progress", "max_grid_images", "write_shards")


def wanted(opts, image_shape: tuple[int, ...]) -> bool:
    """Shards when asked (`write_shards=True`), or by default when the N images exceed `MAX_IN_MEMORY_BYTES`."""
    if opts.write_shards is not None:
        return bool(opts.write_shards)
    return opts.num_samples * int(np.prod(image_shape)) > MAX_IN_MEMORY_BYTES


def shards_dir(npz: str) -> str:
    """`<out>/samples_NxHxWxC.shards` beside the final file."""
    return npz[: -len(".npz")] + ".shards"


def _shard_files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "[0-9]" * 9 + ".npz")))


def completed(directory: str, settings: dict) -> int:
    """How many samples (0..n-1) the shards in `directory` already hold, after checking their settings.

    Raises:
      ResumeError: the shards were written with other settings, or are not
        contiguous from sample 0.
    """
    path = os.path.join(directory, SETTINGS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        resume.check_settings(path, json.load(f), settings, RESUME_FREE)
    done = 0
    for name in _shard_files(directory):
        first = int(os.path.basename(name)[:9])
        if first != done:
            raise resume.ResumeError(f"{directory}: shard {name} starts at sample {first}, expected {done}; delete "
                                     f"the folder to start again")
        with np.load(name, allow_pickle=False) as f:
            done += len(f["arr_0"])
    return done


def write_shard(directory: str, first: int, images_: np.ndarray, labels: np.ndarray | None) -> str:
    """Atomically write samples first..first+n-1 as one shard."""
    path = os.path.join(directory, f"{first:09d}.npz")
    tmp = path + ".tmp.npz"
    np.savez(tmp, arr_0=images_, **({} if labels is None else {"arr_1": labels}))
    os.replace(tmp, path)
    return path


def iter_shards(directory: str) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(images, labels or None) of every shard, in sample order."""
    for name in _shard_files(directory):
        with np.load(name, allow_pickle=False) as f:
            yield f["arr_0"], (f["arr_1"] if "arr_1" in f.files else None)


def assemble(directory: str, npz: str, shape: tuple[int, ...], with_labels: bool, extra: dict | None = None) -> str:
    """Stream the shards into OpenAI's `arr_0` (uint8 `shape` = [N, H, W, C]) / `arr_1` npz (atomically),
    plus `extra` arrays, as `images.write_npz` lays them out."""
    from numpy.lib import format as npy

    tmp = npz + ".tmp.npz"
    labels = []
    with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as f:
            npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                                           "shape": tuple(int(d) for d in shape)})
            for imgs, lab in iter_shards(directory):
                f.write(np.ascontiguousarray(imgs, np.uint8).tobytes())
                labels.append(lab)
        if with_labels:  # N int32: small enough to hold
            with z.open("arr_1.npy", "w", force_zip64=True) as f:
                npy.write_array(f, np.concatenate(labels), allow_pickle=False)
        for name, value in (extra or {}).items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                npy.write_array(f, np.asanyarray(value), allow_pickle=False)
    os.replace(tmp, npz)
    return npz


def first_images(directory: str, n: int) -> np.ndarray:
    """The first n samples (for the PNG grid), reading only the shards needed."""
    out, have = [], 0
    for imgs, _ in iter_shards(directory):
        out.append(imgs[: n - have])
        have += len(out[-1])
        if have >= n:
            break
    return np.concatenate(out)


def sample_to_shards(batches: Callable[[int], Iterator[engine.Batch]], labels_of: Callable | None, *,
                     num_samples: int, image_shape: tuple[int, ...], npz: str, settings: dict,
                     max_grid_images: int = 256, extra: dict | None = None, log: Callable[[str], None] | None = print) -> tuple[str, str] | None:
    """Sample through `batches(start)` into shards, then assemble `npz` and its PNG grid (process 0).

    Args:
      batches: `start -> engine.Batch`es of samples start..N-1 (`unet.stream`).
      labels_of: `ids [n] -> int labels [n]` written as `arr_1`, or None.
      settings: what determines the samples (checked on resume).
      extra: more arrays for the npz (`images.write_npz`'s `extra`).

    Returns:
      (npz path, png path) on process 0, None elsewhere.
    """
    directory = shards_dir(npz)
    done = completed(directory, settings)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, SETTINGS_FILE), "w") as f:
            json.dump(json.loads(json.dumps(settings)), f, indent=1, sort_keys=True)
    if done and log is not None:
        log(f"resuming from {done} samples in {directory}")
    for b in batches(done) if done < num_samples else ():
        imgs = engine.gather(b.images)[:b.count]
        if writer:
            ids = np.arange(b.first, b.first + b.count)
            write_shard(directory, b.first, imgs, None if labels_of is None else labels_of(ids))
        if log is not None:
            log(f"samples {b.first + b.count}/{num_samples} -> {directory}")
    if not writer:
        return None
    assemble(directory, npz, (num_samples,) + tuple(image_shape), labels_of is not None, extra)
    png = images.write_png(npz[: -len(".npz")] + ".png",
                           images.image_grid(first_images(directory, min(max_grid_images, num_samples))))
    shutil.rmtree(directory)
    return npz, png
