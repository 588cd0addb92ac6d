"""Input pipeline: digits TFDS builder, image folders, grain iterators."""

import os
import re
import shutil
import sys
import tempfile

import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized
from PIL import Image

from diffusion_jax import data
from diffusion_jax.data import digits, folders, stream

DATA_DIR = os.environ.get("TFDS_DATA_DIR")  # tests/.tfds (conftest.py).


def _toy_source(n, size=4, channels=1):
    """ArraySource whose example i has label i and every pixel equal to i."""
    images = np.broadcast_to(
        np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, channels)
    ).copy()
    return data.ArraySource({"image": images, "label": np.arange(n)})


def _tempdir(test):
    """A fresh directory removed after the test (absltest's needs parsed flags)."""
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def _labels(iterator, num_batches):
    return np.concatenate([next(iterator)["label"] for _ in range(num_batches)])


def _assert_batches_equal(test, a, b):
    test.assertEqual(sorted(a), sorted(b))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class DigitsTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.builder = digits.ensure_prepared(DATA_DIR)

    def test_prepares_offline_without_tensorflow(self):
        self.assertTrue(self.builder.is_prepared())
        self.assertNotIn("tensorflow", sys.modules)  # TFDS + array_record only.
        splits = self.builder.info.splits
        self.assertEqual(splits["train"].num_examples, 1617)
        self.assertEqual(splits["test"].num_examples, 180)
        # Registered under its name: plain TFDS calls find it.
        self.assertLen(tfds.data_source("digits", split="test", data_dir=DATA_DIR), 180)

    def test_contents_match_sklearn(self):
        from sklearn import datasets as sk

        ref = sk.load_digits()
        both = [data.load_in_memory(self.builder.as_data_source(s)) for s in ("train", "test")]
        images = np.concatenate([s.arrays["image"] for s in both])
        labels = np.concatenate([s.arrays["label"] for s in both])
        self.assertEqual(images.shape, (1797, 8, 8, 1))
        self.assertEqual(images.dtype, np.uint8)
        np.testing.assert_array_equal(np.bincount(labels), np.bincount(ref.target))
        self.assertEqual(set(labels.tolist()), set(range(10)))
        # Same multiset of images: compare sorted raw bytes.
        ours = sorted(x.tobytes() for x in images[..., 0])
        theirs = sorted(x.tobytes() for x in digits.to_uint8(ref.images))
        self.assertEqual(ours, theirs)
        self.assertEqual(images.min(), 0)
        self.assertEqual(images.max(), 255)

    def test_uint8_conversion(self):
        np.testing.assert_array_equal(
            digits.to_uint8(np.arange(17)), np.round(np.arange(17) * 255 / 16).astype(np.uint8)
        )
        self.assertEqual(digits.to_uint8(np.array([0, 16])).tolist(), [0, 255])

    def test_captions_name_their_digit(self):
        source = data.load_in_memory(self.builder.as_data_source("train"))
        captions, labels = source.arrays["caption"], source.arrays["label"]
        self.assertGreaterEqual(len(set(captions.tolist())), 10 * 4)  # Several phrasings.
        for caption, label in zip(captions, labels):
            tokens = set(re.findall(r"[a-z]+|\d", caption))
            named = {d for d in range(10) if {str(d), digits.DIGIT_WORDS[d]} & tokens}
            self.assertEqual(named, {int(label)}, caption)

    def test_make_source_digits(self):
        source = data.make_source("digits", "test", data_dir=DATA_DIR)
        self.assertIsInstance(source, data.ArraySource)  # In memory by default.
        self.assertLen(source, 180)
        lazy = data.make_source("digits", "test", data_dir=DATA_DIR, in_memory=False)
        self.assertLen(lazy, 180)
        np.testing.assert_array_equal(lazy[5]["image"], source[5]["image"])


class ConversionTest(parameterized.TestCase):
    def test_uint8_to_float_is_exact(self):
        x = np.arange(256, dtype=np.uint8)
        y = data.uint8_to_float(x)
        self.assertEqual(y.dtype, np.float32)
        self.assertEqual(y[0], -1.0)
        self.assertEqual(y[255], 1.0)
        np.testing.assert_array_equal(y, x.astype(np.float32) / np.float32(127.5) - 1)
        # Bin centres of the discretized decoder: 2 * k / 255 - 1 to float32 precision.
        np.testing.assert_allclose(y, 2 * np.arange(256) / 255 - 1, rtol=0, atol=1e-7)

    def test_pipeline_hits_both_ends_exactly(self):
        images = np.zeros((4, 8, 8, 1), np.uint8)
        images[1::2] = 255
        source = data.ArraySource({"image": images, "label": np.arange(4)})
        it = data.make_eval_iterator(
            source, batch_size=4, image_size=8, channels=1, process_index=0, process_count=1
        )
        batch = next(it)
        np.testing.assert_array_equal(batch["image"][0::2], -1.0)
        np.testing.assert_array_equal(batch["image"][1::2], 1.0)

    @parameterized.parameters(8, 16, 32)
    def test_resize_shapes(self, size):
        source = data.make_source("digits", "train", data_dir=DATA_DIR)
        it = data.make_train_iterator(
            source,
            global_batch_size=8,
            image_size=size,
            channels=1,
            seed=0,
            process_index=0,
            process_count=1,
        )
        batch = next(it)
        self.assertEqual(batch["image"].shape, (8, size, size, 1))
        self.assertEqual(batch["image"].dtype, np.float32)
        self.assertEqual(batch["label"].dtype, np.int32)
        self.assertBetween(batch["image"].min(), -1.0, 1.0)
        self.assertBetween(batch["image"].max(), -1.0, 1.0)

    def test_resize_uint8_is_deterministic(self):
        x = np.random.RandomState(0).randint(0, 256, (8, 8, 3), dtype=np.uint8)
        a, b = data.resize_uint8(x, 16), data.resize_uint8(x, 16)
        self.assertEqual(a.shape, (16, 16, 3))
        self.assertEqual(a.dtype, np.uint8)
        np.testing.assert_array_equal(a, b)
        self.assertEqual(data.resize_uint8(x[..., :1], 32).shape, (32, 32, 1))


class ErrorsTest(parameterized.TestCase):
    def test_channel_mismatch(self):
        source = data.make_source("digits", "test", data_dir=DATA_DIR)
        with self.assertRaisesRegex(ValueError, r"expects 3 channel.*have 1"):
            data.make_train_iterator(
                source,
                global_batch_size=4,
                image_size=8,
                channels=3,
                seed=0,
                process_index=0,
                process_count=1,
            )

    def test_unknown_dataset(self):
        with self.assertRaisesRegex(
            ValueError, r"Unknown dataset 'no_such_dataset_xyz'.*tfds build"
        ):
            data.make_source("no_such_dataset_xyz", "train", data_dir=DATA_DIR)

    def test_unprepared_dataset_is_not_downloaded(self):
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaisesRegex(ValueError, r"not prepared.*tfds build mnist"):
                data.make_source("mnist", "train", data_dir=tmp)
            self.assertEmpty([f for _, _, fs in os.walk(tmp) for f in fs])

    def test_batch_not_divisible(self):
        with self.assertRaisesRegex(ValueError, "multiple of the number of processes"):
            data.make_train_iterator(
                _toy_source(8),
                global_batch_size=3,
                image_size=4,
                channels=1,
                seed=0,
                process_index=0,
                process_count=2,
            )

    def test_missing_folder(self):
        with self.assertRaisesRegex(ValueError, "does not exist"):
            data.make_source("folder:/no/such/dir", "train", data_dir=None)


class MockTfdsTest(parameterized.TestCase):
    def test_generic_tfds_dataset(self):
        with tfds.testing.mock_data(num_examples=12):
            source = data.make_source("mnist", "train", data_dir=None)
            self.assertLen(source, 12)
            it = data.make_train_iterator(
                source,
                global_batch_size=4,
                image_size=16,
                channels=1,
                seed=1,
                process_index=0,
                process_count=1,
            )
            batch = next(it)
        self.assertEqual(batch["image"].shape, (4, 16, 16, 1))
        self.assertEqual(batch["label"].shape, (4,))


class FolderTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.root = _tempdir(self)
        os.makedirs(os.path.join(self.root, "sub"))
        # 64 wide x 32 high: black borders, white centre square.
        wide = np.zeros((32, 64, 3), np.uint8)
        wide[:, 16:48] = 255
        Image.fromarray(wide).save(os.path.join(self.root, "dog_1.png"))
        Image.fromarray(wide).save(os.path.join(self.root, "sub", "cat_2.jpg"), quality=100)
        Image.fromarray(wide[..., 0]).save(os.path.join(self.root, "bird_x_y.jpeg"))
        Image.fromarray(wide).save(os.path.join(self.root, "cat_3.PNG"))
        open(os.path.join(self.root, "notes_1.txt"), "w").close()

    def test_labels_from_prefixes(self):
        source = data.make_source(f"folder:{self.root}", "train", data_dir=None)
        self.assertLen(source, 4)
        self.assertEqual(source.class_names, ["bird", "cat", "dog"])
        got = {os.path.basename(f): int(l) for f, l in zip(source.files, source.labels)}
        self.assertEqual(got, {"bird_x_y.jpeg": 0, "cat_2.jpg": 1, "cat_3.PNG": 1, "dog_1.png": 2})
        self.assertEqual(source[0]["image"].shape, (32, 64, 3))  # RGB, even from grayscale.

    def test_centre_crop(self):
        source = folders.ImageFolderSource(self.root, image_size=16)
        for i in range(len(source)):
            image = source[i]["image"]
            self.assertEqual(image.shape, (16, 16, 3))
            self.assertGreaterEqual(image.min(), 250)  # Only the white centre survives.

    def test_pipeline_crops_and_normalises(self):
        source = data.make_source(f"folder:{self.root}", "train", data_dir=None)
        it = data.make_eval_iterator(
            source, batch_size=4, image_size=8, channels=3, process_index=0, process_count=1
        )
        batch = next(it)
        self.assertEqual(batch["image"].shape, (4, 8, 8, 3))
        self.assertGreater(batch["image"].min(), 0.95)
        self.assertEqual(sorted(batch["label"].tolist()), [0, 1, 1, 2])

    def test_split_subdirectory(self):
        os.makedirs(os.path.join(self.root, "test"))
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
            os.path.join(self.root, "test", "a_1.png")
        )
        self.assertLen(data.make_source(f"folder:{self.root}", "test", data_dir=None), 1)


class TrainIteratorTest(parameterized.TestCase):
    def _make(self, source, **kw):
        args = {"global_batch_size": 4, "image_size": 4, "channels": 1, "seed": 3}
        args.update(process_index=0, process_count=1)
        args.update(kw)
        return data.make_train_iterator(source, **args)

    def test_epochs_are_permutations(self):
        it = self._make(_toy_source(12))
        first, second = _labels(it, 3), _labels(it, 3)
        self.assertEqual(sorted(first), list(range(12)))
        self.assertEqual(sorted(second), list(range(12)))
        self.assertFalse(np.array_equal(first, second))  # Reshuffled each epoch.
        np.testing.assert_array_equal(first, _labels(self._make(_toy_source(12)), 3))
        self.assertFalse(np.array_equal(first, _labels(self._make(_toy_source(12), seed=4), 3)))

    def _global(self, source, processes, num_batches, **kw):
        """Global batches: the processes' rows stacked in process order (simulated in-process)."""
        its = [
            self._make(source, process_index=p, process_count=processes, **kw)
            for p in range(processes)
        ]
        return [
            {k: np.concatenate([b[k] for b in rows]) for k in rows[0]}
            for rows in ([next(it) for it in its] for _ in range(num_batches))
        ]

    @parameterized.parameters(False, True)
    def test_global_batches_independent_of_topology(self, flip):
        # (processes, devices) = (1, 1), (1, 4), (2, 2), (4, 1): the stream never
        # sees devices; the processes' rows of batch k, stacked, are one batch.
        images = np.random.default_rng(0).integers(0, 256, (11, 4, 4, 1), np.uint8)
        source = data.ArraySource({"image": images, "label": np.arange(11)})
        kw = dict(global_batch_size=4, random_flip=flip, seed=7)
        want = self._global(source, 1, 9, **kw)  # 36 positions: 3+ epochs of 11.
        for processes in (2, 4):
            for a, b in zip(self._global(source, processes, 9, **kw), want):
                _assert_batches_equal(self, a, b)
        labels = np.concatenate([b["label"] for b in want])
        for epoch in range(3):  # Each epoch is a permutation of all records.
            self.assertEqual(sorted(labels[epoch * 11 : (epoch + 1) * 11]), list(range(11)))
        positions = np.arange(36)
        np.testing.assert_array_equal(labels, stream.stream_records(11, 7, positions))
        flipped = np.concatenate([b["image"] for b in want])
        expect = images[labels].astype(np.float32) / 127.5 - 1
        if flip:
            mask = stream.flip_mask(7, positions)
            self.assertBetween(mask.mean(), 0.2, 0.8)
            expect = np.where(mask[:, None, None, None], expect[:, :, ::-1], expect)
        np.testing.assert_allclose(flipped, expect, atol=1e-6)

    @parameterized.parameters((2, 1, 4, 4), (1, 2, 4, 4), (2, 1, 4, 8))
    def test_resume_on_another_topology(self, before, after, batch_before, batch_after):
        source = _toy_source(13)
        it = self._make(source, process_index=0, process_count=before, global_batch_size=batch_before,
                        random_flip=True)
        for _ in range(5):
            next(it)
        state = it.get_state()
        self.assertEqual(state["position"], 5 * batch_before)
        stream = self._global(source, 1, 1, global_batch_size=5 * batch_before + 3 * batch_after,
                              random_flip=True)[0]
        resumed = self._global(source, after, 3, global_batch_size=batch_after, random_flip=True,
                               position=state["position"])
        got = np.concatenate([b["label"] for b in resumed])
        np.testing.assert_array_equal(got, stream["label"][5 * batch_before :])
        fresh = self._make(source, process_index=0, process_count=after, global_batch_size=batch_after,
                           random_flip=True)
        fresh.set_state(state)  # The same through set_state.
        _assert_batches_equal(self, next(fresh), self._make(
            source, process_index=0, process_count=after, global_batch_size=batch_after,
            random_flip=True, position=state["position"]).__next__())

    def test_other_dataset_is_refused(self):
        it = self._make(_toy_source(12))
        with self.assertRaisesRegex(ValueError, "covered 13 records but this dataset has 12"):
            it.set_state({"position": 8, "num_records": 13})

    def test_no_flip_by_default(self):
        source = _toy_source(8, size=4)
        source.arrays["image"][:, :, 0] = 0  # Left column black, rest by label.
        for batch in (next(self._make(source)), next(self._make(source))):
            np.testing.assert_array_equal(batch["image"][:, :, 0], -1.0)

    def test_random_flip_is_seeded(self):
        images = np.zeros((64, 4, 4, 1), np.uint8)
        images[:, :, 0] = 255  # Left column white: flipped images have it on the right.
        source = data.ArraySource({"image": images, "label": np.arange(64)})
        a = next(self._make(source, global_batch_size=64, random_flip=True))
        b = next(self._make(source, global_batch_size=64, random_flip=True))
        np.testing.assert_array_equal(a["image"], b["image"])
        flipped = a["image"][:, 0, -1, 0] == 1.0
        self.assertTrue(np.all(flipped != (a["image"][:, 0, 0, 0] == 1.0)))
        self.assertBetween(flipped.mean(), 0.2, 0.8)

    def test_captions(self):
        source = data.make_source("digits", "train", data_dir=DATA_DIR)
        batch = next(self._make(source, image_size=8, with_captions=True, with_labels=False))
        self.assertEqual(sorted(batch), ["caption", "image"])
        self.assertEqual(batch["caption"].shape, (4,))
        self.assertTrue(all(isinstance(c, str) and c for c in batch["caption"].tolist()))

    @parameterized.parameters(False, True)
    def test_state_restore_continues_exactly(self, flip):
        source = data.make_source("digits", "train", data_dir=DATA_DIR)
        make = lambda: self._make(source, image_size=16, global_batch_size=64, random_flip=flip)
        it = make()
        for _ in range(30):  # Past the first epoch (1617 / 64 < 26).
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(3)]
        resumed = make()
        resumed.set_state(state)
        for want in expected:
            _assert_batches_equal(self, next(resumed), want)

    def test_orbax_round_trip(self):
        # The state is a small JSON dict: orbax's JSON item stores it once for every process.
        source = _toy_source(20)
        it = self._make(source, random_flip=True)
        for _ in range(7):
            next(it)
        directory = _tempdir(self)
        with ocp.CheckpointManager(directory, item_names=("data",)) as mngr:
            mngr.save(7, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
            mngr.wait_until_finished()
        expected = [next(it) for _ in range(3)]
        resumed = self._make(source, random_flip=True)
        with ocp.CheckpointManager(directory, item_names=("data",)) as mngr:
            state = mngr.restore(7, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        resumed.set_state(state)
        for want in expected:
            _assert_batches_equal(self, next(resumed), want)

    def test_worker_processes_match_in_process(self):
        source = _toy_source(40)
        want = [next(it) for it in [self._make(source, seed=5)] for _ in range(6)]
        it = self._make(source, seed=5, worker_count=1)
        got = [next(it) for _ in range(4)]
        state = it.get_state()
        for a, b in zip(got, want):
            _assert_batches_equal(self, a, b)
        resumed = self._make(source, seed=5, worker_count=1)
        resumed.set_state(state)
        for a, b in zip([next(resumed) for _ in range(2)], want[4:]):
            _assert_batches_equal(self, a, b)
        it.close()
        resumed.close()


class EvalIteratorTest(parameterized.TestCase):
    def test_padding_index_valid(self):
        it = data.make_eval_iterator(
            _toy_source(10),
            batch_size=4,
            image_size=4,
            channels=1,
            process_index=0,
            process_count=1,
        )
        batches = list(it)
        self.assertLen(batches, data.num_eval_batches(10, 4))
        for b in batches:
            self.assertEqual(b["image"].shape, (4, 4, 4, 1))
            self.assertEqual(b["index"].dtype, np.int32)
            self.assertEqual(b["valid"].dtype, np.bool_)
        np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), np.arange(12))
        np.testing.assert_array_equal(batches[-1]["valid"], [True, True, False, False])
        valid = np.concatenate([b["label"][b["valid"]] for b in batches])
        np.testing.assert_array_equal(valid, np.arange(10))  # label i == example i.

    @parameterized.parameters((0, None), (3, 8), (5, 5))
    def test_processes_split_range(self, start, stop):
        source = _toy_source(10)
        end = 10 if stop is None else stop
        per_process = []
        for p in range(2):
            it = data.make_eval_iterator(
                source,
                batch_size=4,
                image_size=4,
                channels=1,
                start=start,
                stop=stop,
                process_index=p,
                process_count=2,
            )
            per_process.append(list(it))
        self.assertEqual(len(per_process[0]), len(per_process[1]))  # Same collectives.
        self.assertLen(per_process[0], data.num_eval_batches(end - start, 4))
        rows = [np.concatenate([b0[k], b1[k]]) for b0, b1 in zip(*per_process) for k in ["index"]]
        valid = [np.concatenate([b0["valid"], b1["valid"]]) for b0, b1 in zip(*per_process)]
        labels = [np.concatenate([b0["label"], b1["label"]]) for b0, b1 in zip(*per_process)]
        if rows:
            index = np.concatenate(rows)
            np.testing.assert_array_equal(index, start + np.arange(len(index)))
            valid, labels = np.concatenate(valid), np.concatenate(labels)
            np.testing.assert_array_equal(labels[valid], np.arange(start, end))
            np.testing.assert_array_equal(valid, index < end)

    def test_digits_test_split(self):
        source = data.make_source("digits", "test", data_dir=DATA_DIR)
        batches = list(
            data.make_eval_iterator(
                source, batch_size=64, image_size=8, channels=1, process_index=0, process_count=1
            )
        )
        self.assertLen(batches, 3)
        self.assertEqual(sum(int(b["valid"].sum()) for b in batches), 180)
        again = list(
            data.make_eval_iterator(
                source, batch_size=64, image_size=8, channels=1, process_index=0, process_count=1
            )
        )
        for a, b in zip(batches, again):
            _assert_batches_equal(self, a, b)


if __name__ == "__main__":
    absltest.main()
