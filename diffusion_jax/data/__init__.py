"""Input pipelines: the embedded `digits` TFDS dataset, TFDS, image folders.

    source = make_source("digits", "train", data_dir=None)
    it = make_train_iterator(source, global_batch_size=128, image_size=8,
                             channels=1, seed=0)
    batch = next(it)  # {"image": float32 [b, 8, 8, 1] in [-1, 1], "label": int32 [b]}

See `pipeline` for checkpointing the iterator with orbax.
"""

from diffusion_jax.data.digits import Digits
from diffusion_jax.data.digits import ensure_prepared
from diffusion_jax.data.folders import ImageFolderSource
from diffusion_jax.data.folders import center_crop_arr
from diffusion_jax.data.pipeline import make_eval_iterator
from diffusion_jax.data.pipeline import make_source
from diffusion_jax.data.pipeline import make_train_iterator
from diffusion_jax.data.pipeline import num_eval_batches
from diffusion_jax.data.pipeline import resize_uint8
from diffusion_jax.data.pipeline import uint8_to_float

__all__ = [
    "Digits", "ensure_prepared", "ImageFolderSource", "center_crop_arr",
    "make_eval_iterator", "make_source", "make_train_iterator",
    "num_eval_batches", "resize_uint8", "uint8_to_float",
]
