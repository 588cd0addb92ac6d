"""FID / IS / precision-recall definitions and the Flax FID Inception's blocks."""
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from absl.testing import absltest, parameterized

from diffusion_jax.evaluation import inception, metrics


class MetricsTest(parameterized.TestCase):

    def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift(self):
        rng = np.random.default_rng(0)
        a = rng.normal(size=(500, 16))
        base = metrics.feature_stats(a)
        self.assertAlmostEqual(metrics.frechet_distance(base, base), 0.0, places=6)
        fids = [metrics.frechet_distance(base, metrics.feature_stats(a + s)) for s in (0.1, 0.5, 1.0, 2.0)]
        self.assertTrue(all(x < y for x, y in zip(fids, fids[1:])), fids)
        # A pure mean shift s in every one of 16 dims adds exactly 16 s^2.
        np.testing.assert_allclose(fids, [16 * s * s for s in (0.1, 0.5, 1.0, 2.0)], rtol=1e-6)

    def test_fid_matches_closed_form_for_diagonal_gaussians(self):
        v1, v2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
        a = metrics.Stats(np.zeros(3), np.diag(v1))
        b = metrics.Stats(np.ones(3), np.diag(v2))
        want = 3.0 + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
        self.assertAlmostEqual(metrics.frechet_distance(a, b), want, places=8)

    def test_fid_shape_mismatch(self):
        with self.assertRaisesRegex(ValueError, "do not match"):
            metrics.frechet_distance(metrics.Stats(np.zeros(3), np.eye(3)), metrics.Stats(np.zeros(4), np.eye(4)))

    def test_inception_score_extremes(self):
        self.assertAlmostEqual(metrics.inception_score(np.full((100, 10), 0.1), split_size=50), 1.0, places=6)
        onehot = np.eye(10)[np.arange(100) % 10] * (1 - 1e-9) + 1e-10
        self.assertAlmostEqual(metrics.inception_score(onehot, split_size=50), 10.0, places=3)

    def test_precision_recall(self):
        rng = np.random.default_rng(1)
        a = rng.normal(size=(300, 8)).astype(np.float32)
        p, r = metrics.precision_recall(a, a, block=64)
        self.assertEqual((p, r), (1.0, 1.0))
        p, r = metrics.precision_recall(a, a + 100.0)
        self.assertEqual((p, r), (0.0, 0.0))
        # Samples collapsed onto a few reference points: precise, poor recall.
        p, r = metrics.precision_recall(a, np.repeat(a[:5], 20, axis=0))
        self.assertEqual(p, 1.0)
        self.assertLess(r, 0.3)

    def test_manifold_radii_against_brute_force(self):
        f = np.random.default_rng(2).normal(size=(40, 3)).astype(np.float32)
        d = ((f[:, None] - f[None]) ** 2).sum(-1)
        want = np.sort(d, axis=1)[:, 3]
        np.testing.assert_allclose(metrics.manifold_radii(f, 3, block=7), want, rtol=1e-4, atol=1e-5)

    def test_feature_metrics_and_accuracy(self):
        rng = np.random.default_rng(3)
        a = rng.normal(size=(200, 4))
        out = metrics.feature_metrics(a, a)
        self.assertAlmostEqual(out["fid"], 0.0, places=6)
        labels = np.arange(20) % 4
        logits_fn = lambda x: np.eye(4)[np.asarray(x)]
        self.assertEqual(metrics.classifier_accuracy(logits_fn, labels, labels, batch_size=6), 1.0)
        self.assertEqual(metrics.classifier_accuracy(logits_fn, (labels + 1) % 4, labels), 0.0)

    def test_load_reference_validates_shapes(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        bad = os.path.join(tmp, "bad.npz")
        np.savez(bad, mu=np.zeros(2048), sigma=np.zeros((100, 100)))
        with self.assertRaisesRegex(ValueError, r"sigma \[2048, 2048\]"):
            metrics.load_reference(bad)
        good = os.path.join(tmp, "good.npz")
        np.savez(good, arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048))
        ref = metrics.load_reference(good)
        self.assertEqual(ref["images"].shape, (4, 8, 8, 3))
        self.assertEqual(ref["stats"].sigma.shape, (2048, 2048))


# ----------------------------------------------------------------------------- Inception blocks vs torch
def _torch_basic(sd, prefix, x, stride=1, padding=0):
    """pytorch-fid's BasicConv2d with torch ops: conv (no bias), BN(eps=1e-3), ReLU."""
    x = F.conv2d(x, sd[f"{prefix}.conv.weight"], stride=stride, padding=padding)
    x = F.batch_norm(x, sd[f"{prefix}.bn.running_mean"], sd[f"{prefix}.bn.running_var"],
                     sd[f"{prefix}.bn.weight"], sd[f"{prefix}.bn.bias"], training=False, eps=0.001)
    return F.relu(x)


def _torch_inception_a(sd, x):  # FIDInceptionA.forward
    b1 = _torch_basic(sd, "branch1x1", x)
    b5 = _torch_basic(sd, "branch5x5_2", _torch_basic(sd, "branch5x5_1", x), padding=2)
    b3 = _torch_basic(sd, "branch3x3dbl_1", x)
    b3 = _torch_basic(sd, "branch3x3dbl_3", _torch_basic(sd, "branch3x3dbl_2", b3, padding=1), padding=1)
    bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([b1, b5, b3, _torch_basic(sd, "branch_pool", bp)], 1)


def _torch_inception_e2(sd, x):  # FIDInceptionE_2.forward (max-pool branch)
    b1 = _torch_basic(sd, "branch1x1", x)
    b3 = _torch_basic(sd, "branch3x3_1", x)
    b3 = torch.cat([_torch_basic(sd, "branch3x3_2a", b3, padding=(0, 1)),
                    _torch_basic(sd, "branch3x3_2b", b3, padding=(1, 0))], 1)
    bd = _torch_basic(sd, "branch3x3dbl_2", _torch_basic(sd, "branch3x3dbl_1", x), padding=1)
    bd = torch.cat([_torch_basic(sd, "branch3x3dbl_3a", bd, padding=(0, 1)),
                    _torch_basic(sd, "branch3x3dbl_3b", bd, padding=(1, 0))], 1)
    bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return torch.cat([b1, b3, bd, _torch_basic(sd, "branch_pool", bp)], 1)


def _random_state_dict(flax_params, seed):
    """A pytorch-fid-style state dict (torch layouts and names) with random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(flax_params)[0]:
        names = [str(k.key) for k in path]
        prefix, leaf_name = ".".join(names[:-1]), names[-1]
        if leaf_name == "kernel":
            kh, kw, i, o = leaf.shape
            sd[f"{prefix}.conv.weight"] = torch.randn(o, i, kh, kw, generator=g) * 0.2
        else:
            torch_name = {v: k for k, v in inception._BN.items()}[leaf_name]
            val = torch.rand(leaf.shape, generator=g) + 0.5 if torch_name in ("running_var", "weight") \
                else torch.randn(leaf.shape, generator=g) * 0.1
            sd[f"{prefix}.bn.{torch_name}"] = val
        sd.setdefault(f"{prefix}.bn.num_batches_tracked", torch.tensor(0))
    return sd


class InceptionBlockTest(parameterized.TestCase):

    @parameterized.named_parameters(("A", "a"), ("E_2", "e2"))
    def test_block_matches_torch_reference(self, which):
        block = inception.InceptionA(32) if which == "a" else inception.InceptionE(True)
        x = np.random.default_rng(0).normal(size=(2, 5, 5, 8)).astype(np.float32)
        shapes = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
        sd = _random_state_dict(shapes, seed=1)
        params = inception.params_from_torch_state_dict(sd)
        got = np.asarray(jax.jit(block.apply)({"params": params}, x))
        ref_fn = _torch_inception_a if which == "a" else _torch_inception_e2
        want = ref_fn(sd, torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    def test_feature_shapes_and_fc(self):
        out = jax.eval_shape(lambda x: inception.InceptionV3().init_with_output(jax.random.key(0), x)[0],
                             jnp.zeros((2, 32, 32, 3), jnp.uint8))
        self.assertEqual(out.pool.shape, (2, 2048))
        self.assertEqual(out.spatial.shape, (2, 17 * 17 * 7))
        self.assertEqual(out.logits.shape, (2, 1008))

    def test_missing_weights_error_says_where_to_get_them(self):
        with self.assertRaisesRegex(FileNotFoundError, r"pytorch-fid/releases.*--inception_path"):
            inception.load_inception("/nonexistent/pt_inception-2015-12-05-6726825d.pth")

    def test_resize_matches_torch_bilinear(self):
        x = np.random.default_rng(4).uniform(size=(1, 7, 7, 2)).astype(np.float32)
        got = np.asarray(inception.resize_bilinear(jnp.asarray(x), 17))
        want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(17, 17), mode="bilinear",
                             align_corners=False).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    absltest.main()
