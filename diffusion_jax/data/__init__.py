"""Input pipelines: the embedded `digits` TFDS dataset, TFDS, image folders.

    source = make_source("digits", "train", data_dir=None)
    it = make_train_iterator(source, global_batch_size=128, image_size=8,
                             channels=1, seed=0)
    batch = next(it)  # {"image": float32 [b, 8, 8, 1] in [-1, 1], "label": int32 [b]}

See `pipeline` for checkpointing the iterator with orbax.
"""

from diffusion_jax.data.digits import Digits, ensure_prepared
from diffusion_jax.data.folders import ImageFolderSource, center_crop_arr
from diffusion_jax.data.pipeline import (
    ArraySource,
    load_in_memory,
    make_eval_iterator,
    make_source,
    make_train_iterator,
    num_eval_batches,
    resize_uint8,
    shard_range,
    uint8_to_float,
)

__all__ = [
    "ArraySource",
    "Digits",
    "ImageFolderSource",
    "center_crop_arr",
    "ensure_prepared",
    "load_in_memory",
    "make_eval_iterator",
    "make_source",
    "make_train_iterator",
    "num_eval_batches",
    "resize_uint8",
    "shard_range",
    "uint8_to_float",
]
