"""Image-folder datasets with the conventions of OpenAI's `image_datasets.py`.

* Files: every *.jpg, *.jpeg, *.png (any case) under the folder, recursively,
  in sorted path order.
* Labels: the file-name prefix before the first "_" ("cat_0001.png" -> "cat"),
  mapped to indices in sorted order of the distinct prefixes. Directory names
  are ignored, as upstream (improved-diffusion#50).
* Images: converted to RGB; resized by `center_crop_arr` (BOX halvings while
  the short side is >= 2x the target, then BICUBIC so the short side equals
  the target, then a centre crop).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_image_files(root: str) -> list[str]:
    """All image files under `root`, recursively, sorted for a stable order."""
    found = []
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def class_name(path: str) -> str:
    """OpenAI's class of a file: its base name up to the first "_"."""
    return os.path.basename(path).split("_")[0]


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Resizes and centre-crops to [image_size, image_size, C] uint8.

    Same steps as `center_crop_arr` in OpenAI's improved/guided-diffusion: BOX
    downsampling by 2 while the short side is at least twice the target (cheap
    antialiasing), then one BICUBIC resize so the short side equals the target,
    then a centre crop of the long side.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.asarray(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


class ImageFolderSource:
    """Random-access (grain-compatible) source over an image folder.

    `source[i]` is {"image": uint8 [H, W, 3], "label": int}. With `image_size`
    None the image keeps its file's size (the input pipeline resizes it with
    `center_crop_arr`); otherwise it is resized here. Picklable, so grain worker
    processes can read it.
    """

    def __init__(
        self, root: str, *, image_size: int | None = None, files: Sequence[str] | None = None
    ):
        self.root = root
        self.image_size = image_size
        self.files = list(files) if files is not None else list_image_files(root)
        if not self.files:
            raise ValueError(f"No *.jpg, *.jpeg or *.png files found under {root!r}.")
        self.class_names = sorted({class_name(f) for f in self.files})
        index_of = {name: i for i, name in enumerate(self.class_names)}
        self.labels = np.array([index_of[class_name(f)] for f in self.files], np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        with Image.open(self.files[index]) as pil_image:
            pil_image.load()
            pil_image = pil_image.convert("RGB")
        if self.image_size is None:
            image = np.asarray(pil_image)
        else:
            image = center_crop_arr(pil_image, self.image_size)
        return {"image": np.ascontiguousarray(image, np.uint8), "label": int(self.labels[index])}

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource(root={self.root!r}, len={len(self)}, "
            f"num_classes={self.num_classes})"
        )
