"""GLIDE inpainting: the known-region transform, training masks, image/mask files and their rules,
and configs/glide_digits_inpaint.py trained a few steps then sampled (known pixels kept exactly)."""

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image

from configs import glide_digits_inpaint
from diffusion_jax import inpainting, sampling, schedules
from diffusion_jax.data import conditioning
from diffusion_jax.generation import images, inpaint, program
from diffusion_jax.training import loop as train_lib

jax.config.update("jax_disable_most_optimizations", True)  # tiny shapes: compile time dominates

CTX = 24


class ReplaceKnownTest(absltest.TestCase):

    def test_matches_float64_formula_and_keeps_known_pixels(self):
        rng = np.random.default_rng(0)
        x0 = rng.uniform(-1, 1, (2, 4, 4, 3))
        img = rng.uniform(-1, 1, (2, 4, 4, 3))
        mask = (rng.uniform(size=(2, 4, 4, 1)) > 0.5).astype(np.float64)
        got = np.asarray(jax.jit(inpainting.known_region_fn(jnp.asarray(img, jnp.float32),
                                                            jnp.asarray(mask, jnp.float32)))(jnp.asarray(x0, jnp.float32)))
        np.testing.assert_allclose(got, x0 * (1 - mask) + img * mask, rtol=1e-6, atol=1e-6)
        keep = np.broadcast_to(mask, got.shape) == 1
        np.testing.assert_array_equal(got[keep], img.astype(np.float32)[keep])

    def test_sampling_loops_end_on_the_given_pixels(self):
        """With the transform as denoised_fn, the last step returns pred_xstart: known pixels exactly."""
        schedule = schedules.make_schedule("cosine", 50, "10")
        rng = np.random.default_rng(1)
        img = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
        mask = jnp.asarray(rng.uniform(size=(2, 4, 4, 1)) > 0.5, jnp.float32)
        model_fn = lambda x, t, y: jnp.concatenate([jnp.tanh(x), jnp.zeros_like(x)], -1)
        for loop in (sampling.p_sample_loop, sampling.ddim_sample_loop):
            out = loop(jax.random.key(0), model_fn, schedule, (2, 4, 4, 1), mean_type="epsilon",
                       var_type="learned_range", denoised_fn=inpainting.known_region_fn(img, mask))
            keep = np.broadcast_to(np.asarray(mask), out.shape) == 1
            np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(img)[keep])


class TrainingMasksTest(absltest.TestCase):

    def test_pure_function_of_key_and_index(self):
        key = jax.random.key(7)
        a = np.asarray(conditioning.inpaint_masks(key, jnp.arange(8), 8, 8))
        b = np.asarray(conditioning.inpaint_masks(key, jnp.array([5, 2]), 8, 8))
        np.testing.assert_array_equal(b, a[[5, 2]])  # same example index, same mask, whatever the batch
        self.assertEqual(a.shape, (8, 8, 8, 1))
        self.assertTrue(np.all(np.isin(a, (0.0, 1.0))))
        self.assertGreater(len({m.tobytes() for m in a}), 4)

    def test_erases_one_rectangle_of_the_allowed_size(self):
        masks = np.asarray(conditioning.inpaint_masks(jax.random.key(0), jnp.arange(64), 8, 8))[..., 0]
        for m in masks:
            rows, cols = np.nonzero(m == 0)
            h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            self.assertEqual(len(rows), h * w)  # a full rectangle
            self.assertGreaterEqual(min(h, w), 2)  # ceil(0.25 * 8)


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


class FilesTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp()
        self.img = _png(os.path.join(self.dir, "img.png"), np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
        mask = np.full((8, 8), 255, np.uint8)
        mask[4:] = 0
        self.mask = _png(os.path.join(self.dir, "mask.png"), mask)

    def test_png_pair_at_model_size(self):
        image, mask = inpaint.load_inputs(self.img, self.mask, 8, 1)
        self.assertEqual((image.shape, mask.shape), ((1, 8, 8, 1), (1, 8, 8, 1)))
        np.testing.assert_allclose(image[0, ..., 0], (np.arange(64).reshape(8, 8) * 4) / 127.5 - 1, atol=1e-6)
        np.testing.assert_array_equal(mask[0, :, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0])

    def test_resize_rules(self):
        image, mask = inpaint.load_inputs(self.img, self.mask, 4, 1)  # mask: pixel i <- floor(i * 8 / 4)
        np.testing.assert_array_equal(mask[0, :, 0, 0], [1, 1, 0, 0])
        self.assertEqual(image.shape, (1, 4, 4, 1))
        np.testing.assert_array_equal(inpaint.resize_nearest(mask, 8)[0, :, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0])
        x = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 1), dtype=np.uint8)
        want = np.asarray(Image.fromarray(x[0, ..., 0]).resize((4, 4), Image.BICUBIC))
        np.testing.assert_array_equal(inpaint.resize_bicubic(x, 4)[0, ..., 0], want)

    def test_broadcast_pairs(self):
        img3 = np.zeros((3, 8, 8, 1), np.uint8)
        m1 = np.ones((1, 8, 8, 1), np.float32)
        a, b = inpaint.pair_up(img3, m1, "i", "m")
        self.assertEqual((a.shape[0], b.shape[0]), (3, 3))
        a, b = inpaint.pair_up(img3[:1], np.ones((3, 8, 8, 1), np.float32), "i", "m")
        self.assertEqual((a.shape[0], b.shape[0]), (3, 3))
        with self.assertRaisesRegex(ValueError, "holds 3 images and --inpaint_mask=m 2 masks"):
            inpaint.pair_up(img3, np.ones((2, 8, 8, 1), np.float32), "i", "m")

    def test_npz_masks_of_every_layout(self):
        for m in (np.ones((8, 8), bool), np.ones((8, 8, 1), np.uint8) * 255, np.ones((2, 8, 8), np.float32),
                  np.ones((2, 8, 8, 1), np.int64)):
            path = os.path.join(self.dir, "m.npz")
            np.savez(path, arr_0=m)
            got = inpaint.read_mask_file(path)
            self.assertEqual(got.shape[1:], (8, 8, 1))
            self.assertTrue(np.all(got == 1))

    def test_errors_name_file_shapes_and_fix(self):
        small = _png(os.path.join(self.dir, "small.png"), np.zeros((4, 4), np.uint8))
        with self.assertRaisesRegex(ValueError, f"--inpaint_mask={small} is 4x4 but --inpaint_image={self.img} "
                                                "is 8x8; give a mask of the image's size"):
            inpaint.load_inputs(self.img, small, 8, 1)
        grey = _png(os.path.join(self.dir, "grey.png"), np.full((8, 8), 128, np.uint8))
        with self.assertRaisesRegex(ValueError, f"--inpaint_mask={grey} is not binary.*128.*threshold it"):
            inpaint.read_mask_file(grey)
        rgb = os.path.join(self.dir, "rgb.npz")
        np.savez(rgb, arr_0=np.zeros((8, 8, 3), np.uint8))
        with self.assertRaisesRegex(ValueError, rf"--inpaint_image={rgb}: arr_0 is uint8 \(8, 8, 3\).*\[H, W, 1\]"):
            inpaint.read_image_file(rgb, 1)

    def test_inpaint_flags_on_other_models(self):
        opts = program.SampleOptions(inpaint_image=self.img, inpaint_mask=self.mask)
        with self.assertRaisesRegex(ValueError, "need a GLIDE inpainting model .* runs/x holds a 'glide' model"):
            inpaint.applies({"kind": "glide"}, opts, "runs/x")
        self.assertFalse(inpaint.applies({"kind": "glide"}, program.SampleOptions(), "runs/x"))


def tiny_config():
    c = glide_digits_inpaint.get_config()
    c.model.update(model_channels=32, num_res_blocks=1, xf_width=32, xf_layers=1, xf_heads=2, text_ctx=CTX)
    c.text.update(text_ctx=CTX)
    c.diffusion.update(diffusion_steps=10)
    c.optim.update(warmup_steps=0)
    c.train.update(batch_size=8, num_steps=2, log_every=1, checkpoint_every=2, p_uncond=0.25)
    return c


class TrainAndSampleTest(absltest.TestCase):

    def test_trains_then_inpaints_keeping_known_pixels(self):
        tmp = tempfile.mkdtemp()
        workdir = os.path.join(tmp, "run")
        metrics = train_lib.train_and_evaluate(tiny_config(), workdir)
        self.assertTrue(np.isfinite(metrics["loss"]))
        img = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
        mask = np.zeros((8, 8), np.uint8)
        mask[:, :3] = 1
        np.savez(os.path.join(tmp, "img.npz"), arr_0=img)
        np.savez(os.path.join(tmp, "mask.npz"), arr_0=mask)
        opts = program.SampleOptions(num_samples=3, batch_size=2, progress=False, prompts=("a handwritten seven",),
                                     cfg_scale=2.0, timestep_respacing="5", inpaint_image=os.path.join(tmp, "img.npz"),
                                     inpaint_mask=os.path.join(tmp, "mask.npz"), out=os.path.join(tmp, "out"))
        npz, _ = program.run(workdir, opts, log=lambda s: None)
        with np.load(npz) as f:
            out = f["arr_0"]
        self.assertEqual(out.shape, (3, 8, 8, 1))
        for i in range(3):  # sample i uses pair i mod 2; the known columns come back unchanged
            np.testing.assert_array_equal(out[i, :, :3], img[i % 2, :, :3])
        self.assertFalse(np.array_equal(out[:, :, 3:], img[[0, 1, 0], :, 3:]))
        with self.assertRaisesRegex(ValueError, "pass both --inpaint_image and --inpaint_mask"):
            program.run(workdir, dataclasses.replace(opts, inpaint_mask=None), log=lambda s: None)
        self.assertEqual(images.to_uint8(jnp.float32(1.0)), 255)


if __name__ == "__main__":
    absltest.main()
