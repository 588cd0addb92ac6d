"""The embedded `digits` dataset: scikit-learn's 8x8 handwritten digits as TFDS.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set
(1797 images, 10 classes, 8x8 pixels with values 0..16) inside its wheel, so
this builder prepares itself with no network. It writes array_record files that
`tfds.data_source` reads through grain without TensorFlow.

Pixel values v in 0..16 become uint8 round(v * 255 / 16) (NumPy rounding, half
to even: 8 -> 128), so 0 -> 0 and 16 -> 255 and the usual uint8 -> [-1, 1] map
applies unchanged. Every 10th example (sklearn index % 10 == 0) is the `test`
split (180 images), the rest is `train` (1617 images).

Each example also carries a short English caption derived from its label and
index (several phrasings per class) so a GLIDE-style text model can train on it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_CLASSES = 10
TEST_EVERY = 10  # sklearn index % TEST_EVERY == 0 goes to the test split.

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w} is the digit as a word, {d} as a numeral. Phrasings rotate with the
# example index, so every class sees every phrasing.
CAPTION_TEMPLATES = (
    "a handwritten {w}",
    "the digit {d}",
    "a drawing of the number {w}",
    "{d}",
    "a small grayscale image of a handwritten {d}",
    "the number {w}, written by hand",
    "a pixelated {w}",
    "handwritten digit {d}",
)


def caption_for(label: int, index: int) -> str:
    """The caption of example `index` (sklearn order) with class `label`."""
    template = CAPTION_TEMPLATES[index % len(CAPTION_TEMPLATES)]
    return template.format(w=DIGIT_WORDS[label], d=str(label))


def to_uint8(values: np.ndarray) -> np.ndarray:
    """sklearn digit intensities 0..16 -> uint8 0..255, round(v * 255 / 16)."""
    v = np.asarray(values, np.float64)
    return np.clip(np.round(v * 255.0 / 16.0), 0, 255).astype(np.uint8)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}

    # TFDS's default `code_path` goes through `importlib_resources`, an optional
    # etils dependency that may be missing; the path of this file is all it needs
    # (to look for a checksums file, which this builder does not have).
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    # ClassLabel: an int64 scalar like Tensor(shape=(), int64), plus
                    # class names and num_classes in the dataset info (and valid
                    # labels from tfds.testing.mock_data).
                    "label": tfds.features.ClassLabel(names=DIGIT_WORDS),
                    "caption": tfds.features.Tensor(shape=(), dtype=np.str_),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        return {
            "train": self._generate_examples(test=False),
            "test": self._generate_examples(test=True),
        }

    def _generate_examples(self, test: bool):
        # Imported here so that reading a prepared dataset never needs sklearn.
        from sklearn import datasets  # pylint: disable=g-import-not-at-top

        digits = datasets.load_digits()
        images = to_uint8(digits.images)  # [1797, 8, 8]
        for index, (image, label) in enumerate(zip(images, digits.target)):
            if (index % TEST_EVERY == 0) != test:
                continue
            yield (
                index,
                {
                    "image": image[:, :, None],
                    "label": int(label),
                    "caption": caption_for(int(label), index),
                },
            )


def ensure_prepared(data_dir: str | None = None) -> Digits:
    """Returns the `digits` builder, preparing it offline on first use.

    Args:
      data_dir: TFDS data directory; None means TFDS's default (`TFDS_DATA_DIR`
        or ~/tensorflow_datasets).

    Returns:
      The prepared builder; read it with `builder.as_data_source(split)`.
    """
    builder = Digits(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    try:
        # try_download_gcs=False: never look for pre-built files on GCS.
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    except OSError:
        # TFDS writes into a temporary directory and renames it at the end, so
        # when several processes (hosts, pytest workers) prepare the same data_dir
        # at once, all renames but the first fail. The first one's data is
        # complete; use it.
        builder = Digits(data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            raise
    return builder
