"""Random-access data sources: the embedded digits set, prepared TFDS datasets,
image folders, and in-memory copies; plus the uint8 image helpers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_jax.data import digits as digits_lib
from diffusion_jax.data import folders

FOLDER_PREFIX = "folder:"


# ----------------------------------------------------------------- sources ---


def make_source(
    name: str, split: str, *, data_dir: str | None = None, in_memory: bool | None = None
):
    """Returns a random-access source for a dataset name; never downloads.

    Args:
      name: "digits" (the embedded dataset, prepared offline on first use),
        "folder:/path/to/images" (OpenAI-style image folder; uses
        `/path/to/images/<split>` when that directory exists, else the whole
        folder for every split), or the name of a TFDS dataset already prepared
        in array_record format under `data_dir` (e.g. "cifar10",
        "imagenet_resized/64x64").
      split: TFDS split, e.g. "train", "test", "train[:90%]".
      data_dir: TFDS data directory; None means TFDS's default (`TFDS_DATA_DIR`
        or ~/tensorflow_datasets).
      in_memory: read the whole split into an `ArraySource` once (fast batches,
        no per-record decoding). Default: True for "digits", False otherwise.

    Returns:
      An object with `__len__` and `__getitem__` yielding dicts of NumPy values
      ({"image": uint8 [H, W, C], "label": int, "caption": ...}).

    Raises:
      ValueError: unknown dataset, or one that is not prepared (the message says
        how to prepare it).
    """
    if in_memory is None:
        in_memory = name == "digits"
    source = _make_source(name, split, data_dir)
    return load_in_memory(source) if in_memory else source


def _make_source(name: str, split: str, data_dir: str | None):
    if name == "digits":
        return digits_lib.ensure_prepared(data_dir).as_data_source(split)
    if name.startswith(FOLDER_PREFIX):
        root = os.path.expanduser(name[len(FOLDER_PREFIX) :])
        if not os.path.isdir(root):
            raise ValueError(f"Image folder {root!r} (from data name {name!r}) does not exist.")
        split_dir = os.path.join(root, split)
        return folders.ImageFolderSource(split_dir if os.path.isdir(split_dir) else root)
    return _tfds_source(name, split, data_dir)


def _how_to_prepare(name: str, data_dir: str | None) -> str:
    where = f" --data_dir={data_dir}" if data_dir else ""
    return (
        f"Prepare it once, on a machine with network access, with `tfds build "
        f"{name.split(':')[0]}{where} --file_format=array_record` (see "
        "https://www.tensorflow.org/datasets/cli), then point data_dir at "
        "that directory. This library never downloads data itself."
    )


def _tfds_source(name: str, split: str, data_dir: str | None):
    """A prepared TFDS dataset as a data source, or a ValueError saying why not."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"Unknown dataset {name!r}: it is neither 'digits', 'folder:/path' nor "
            f"a TFDS dataset name. {_how_to_prepare(name, data_dir)}"
        ) from e
    try:
        # The builder's own reader (not `tfds.data_source`, whose default would
        # download). Under `tfds.testing.mock_data` this returns fake examples.
        return builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except
        if builder.is_prepared():
            raise ValueError(
                f"TFDS dataset {name!r} in {builder.data_dir} cannot be read as a "
                f"random-access source for split {split!r} ({e}). It must be "
                f"prepared with --file_format=array_record. "
                f"{_how_to_prepare(name, data_dir)}"
            ) from e
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. "
            f"{_how_to_prepare(name, data_dir)}"
        ) from e


# ------------------------------------------------------ per-example steps ---


def uint8_to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [..] -> float32 in [-1, 1], exactly x / 127.5 - 1 (0 -> -1, 255 -> 1)."""
    return np.asarray(image, np.float32) / np.float32(127.5) - np.float32(1.0)


def resize_uint8(image: np.ndarray, image_size: int) -> np.ndarray:
    """Deterministic resize of uint8 [H, W, C] to [image_size, image_size, C].

    Uses OpenAI's `center_crop_arr` (BOX halvings, one BICUBIC resize, centre
    crop) for every source, so folders, TFDS and `digits` (8x8 -> 16 or 32,
    BICUBIC upsampling) are all handled the same way.
    """
    if image.shape[-1] in (1, 3):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        out = folders.center_crop_arr(pil, image_size)
        return out.reshape(image_size, image_size, image.shape[-1])
    planes = [
        folders.center_crop_arr(Image.fromarray(image[..., c]), image_size)
        for c in range(image.shape[-1])
    ]
    return np.stack(planes, axis=-1)


def _as_image(value: Any) -> np.ndarray:
    image = np.asarray(value)
    return image[..., None] if image.ndim == 2 else image


def _as_str(value: Any) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ArraySource:
    """A dataset held in memory as stacked NumPy arrays (one row per example).

    `source[i]` -> {"image": uint8 [H, W, C], "label": int64, ...};
    `source.read_batch(indices)` -> the same fields stacked, without a per-example
    Python loop. Small datasets (`digits`, CIFAR-10) read this way are two to three
    orders of magnitude faster than decoding TFDS records one by one.
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(
                f"Arrays have different lengths: { {k: len(v) for k, v in arrays.items()} }."
            )
        self.arrays = dict(arrays)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {k: v[index] for k, v in self.arrays.items()}

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[indices] for k, v in self.arrays.items()}

    def resized(self, image_size: int) -> ArraySource:
        """This source with every image resized once by `resize_uint8`."""
        images = self.arrays["image"]
        if images.shape[1:3] == (image_size, image_size):
            return self
        images = np.stack([resize_uint8(x, image_size) for x in images])
        return ArraySource(dict(self.arrays, image=images))

    def __repr__(self) -> str:
        return f"ArraySource(len={len(self)}, keys={sorted(self.arrays)})"


def load_in_memory(source, *, keys: tuple[str, ...] = ("image", "label", "caption")) -> ArraySource:
    """Reads every example of a random-access source into an `ArraySource`.

    Only the features in `keys` that the source has are kept; strings (TFDS
    returns bytes) become NumPy unicode arrays. Images must share one shape.
    """
    # One by one, not `__getitems__`: `tfds.testing.mock_data`'s mock of the
    # latter is broken, and the batched read is barely faster.
    examples = [source[i] for i in range(len(source))]
    if not examples:
        raise ValueError(f"The data source {source!r} is empty.")
    arrays = {}
    for key in keys:
        if key not in examples[0]:
            continue
        if key == "caption":
            arrays[key] = np.array([_as_str(e[key]) for e in examples], np.str_)
        elif key == "image":
            arrays[key] = np.stack([_as_image(e[key]) for e in examples])
        else:
            arrays[key] = np.stack([np.asarray(e[key]) for e in examples])
    return ArraySource(arrays)


