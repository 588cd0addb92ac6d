"""FID parity with pytorch-fid itself: its own `InceptionV3` against ours, and its Frechet distance against ours.

pytorch-fid's network is built with RANDOM weights (its weight download is
patched to return a random state dict, so nothing is fetched; BatchNorm's
running statistics and affine terms are random too, so BN is exercised).  The
same state dict, saved as a `.pth` like pytorch-fid's weights file, is read by
`inception.load_inception`.  Tolerance: max|ours - theirs| <= 1e-4 * max|theirs|
per output and image size (float32 through ~95 layers).
"""

import os
import shutil
import tempfile
import warnings
from unittest import mock

import numpy as np
import torch
from absl.testing import absltest
from pytorch_fid import fid_score
from pytorch_fid import inception as pf_inception

from diffusion_jax.evaluation import inception, metrics

RTOL = 1e-4


def random_state_dict(seed: int) -> dict:
    """pytorch-fid's weights file layout (names, torch shapes, num_batches_tracked) with random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in inception.torch_state_dict_shapes().items():
        if name.endswith("conv.weight"):  # He init keeps activations O(1) through the ~95 layers
            value = torch.randn(shape, generator=g) * (2.0 / np.prod(shape[1:])) ** 0.5
        elif name == "fc.weight":
            value = torch.randn(shape, generator=g) / shape[1] ** 0.5
        elif name.endswith(("bn.weight", "bn.running_var")):
            value = torch.rand(shape, generator=g) + 0.5
        else:  # bn.bias, bn.running_mean, fc.bias
            value = torch.randn(shape, generator=g) * 0.1
        sd[name] = value
        if name.endswith("bn.running_var"):
            sd[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return sd


def pytorch_fid_network(state_dict):
    """pytorch-fid's own network with `state_dict` (its download patched): `fn(uint8 images NHWC) -> dict` of
    pool [N, 2048], spatial [N, 2023] (Mixed_6d.branch1x1's first 7 channels, NHWC order), logits [N, 1008]."""
    def fake_download(url, *args, **kwargs):
        assert url == pf_inception.FID_WEIGHTS_URL, url
        return dict(state_dict)

    built = []

    def keep_full_network():  # pytorch-fid's InceptionV3 keeps no classifier: take fc from what it builds
        built.append(fid_inception_v3())
        return built[-1]

    fid_inception_v3 = pf_inception.fid_inception_v3
    with mock.patch.object(pf_inception, "load_state_dict_from_url", fake_download), \
            mock.patch.object(pf_inception, "fid_inception_v3", keep_full_network):
        net = pf_inception.InceptionV3([3], use_fid_inception=True).eval()
    fc = built[0].fc.eval()
    mixed_6d = net.blocks[2][6]
    assert isinstance(mixed_6d, pf_inception.FIDInceptionC)
    seen = {}
    mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: seen.__setitem__("branch1x1", output))

    def outputs(images: np.ndarray) -> dict:
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's ToTensor: [0, 1]
            pool = net(x)[0].flatten(1)
            logits = fc(pool)
        spatial = seen["branch1x1"].permute(0, 2, 3, 1)[..., :7].reshape(len(images), -1)
        return {"pool": pool.numpy(), "spatial": spatial.numpy(), "logits": logits.numpy()}

    return outputs


class InceptionParityTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.state_dict = random_state_dict(seed=0)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)
        super().tearDownClass()

    def _save(self, name, obj):
        path = os.path.join(self.tmp, name)
        torch.save(obj, path)
        return path

    def test_features_match_pytorch_fid_network(self):
        module, params = inception.load_inception(self._save("random_inception.pth", self.state_dict))
        features_fn = inception.make_feature_fn(module, params, batch_size=2)  # the trunk compiles once
        pytorch_fid_fn = pytorch_fid_network(self.state_dict)
        rng = np.random.default_rng(1)
        for size in (32, 320):  # resized to 299 by pytorch-fid's bilinear (align_corners=False): up and down
            images = rng.integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
            ours = features_fn(images)
            for field, want in pytorch_fid_fn(images).items():
                got = getattr(ours, field)
                self.assertEqual(got.shape, want.shape, field)
                self.assertGreater(np.std(want), 1e-2 * np.abs(want).max(), f"{field} is degenerate")
                err = np.abs(got - want).max()
                self.assertLessEqual(err, RTOL * np.abs(want).max(), f"{field} at {size}px: max|diff| {err:.3g}")

    def test_frechet_distance_matches_pytorch_fid(self):
        rng = np.random.default_rng(2)
        for n, d in ((200, 16), (40, 64)):  # full-rank, then rank-deficient covariances (N < D)
            a = rng.normal(size=(n, d))
            b = a @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
            with warnings.catch_warnings():  # pytorch-fid passes scipy's deprecated sqrtm(disp=False)
                warnings.simplefilter("ignore", DeprecationWarning)
                want = fid_score.calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False),
                                                            b.mean(0), np.cov(b, rowvar=False))
            got = metrics.frechet_distance(metrics.feature_stats(a), metrics.feature_stats(b))
            self.assertGreater(want, 1.0)
            self.assertLessEqual(abs(got - want), RTOL * abs(want), (n, d, got, want))

    def test_wrong_weights_file_names_keys_and_expected_shapes(self):
        bad = {"fc.weight": torch.zeros(1000, 2048), "AuxLogits.fc.weight": torch.zeros(1000, 768)}
        path = self._save("torchvision_like.pth", bad)
        with self.assertRaisesRegex(ValueError, r"torchvision_like\.pth is not pytorch-fid's FID Inception: "
                                    r"fc\.weight is \[1000, 2048\], expected \[1008, 2048\]; "
                                    r"Conv2d_1a_3x3\.bn\.bias \[32\] missing.*more\); pass .*--inception_path"):
            inception.load_inception(path)
        sd = dict(self.state_dict)
        del sd["Mixed_7c.branch_pool.bn.running_var"]
        sd["extra.weight"] = torch.zeros(3)
        with self.assertRaisesRegex(ValueError, r"Mixed_7c\.branch_pool\.bn\.running_var \[192\] missing; "
                                    r"extra\.weight unexpected; pass"):
            inception.check_state_dict(sd, "x.pth")
        with self.assertRaisesRegex(ValueError, r"tensor\.pth holds a Tensor, not a state dict"):
            inception.load_inception(self._save("tensor.pth", torch.zeros(3)))
        junk = os.path.join(self.tmp, "junk.pth")
        with open(junk, "wb") as f:
            f.write(b"not a torch file")
        with self.assertRaisesRegex(ValueError, r"junk\.pth is not a torch weights file.*--inception_path"):
            inception.load_inception(junk)

    def test_reference_without_stats_or_images(self):
        path = os.path.join(self.tmp, "ref.npz")
        np.savez(path, labels=np.zeros(3))
        with self.assertRaisesRegex(ValueError, r"ref\.npz has neither arr_0 images nor mu/sigma statistics "
                                    r"\(keys: \['labels'\]\); pass a reference batch in OpenAI's VIRTUAL_\*\.npz"):
            metrics.load_reference(path)
        for name, write in (("one.npy", lambda p: np.save(p, np.zeros(3))),
                            ("junk.npz", lambda p: open(p, "wb").write(b"junk"))):
            p = os.path.join(self.tmp, name)
            write(p)
            with self.assertRaisesRegex(ValueError, rf"{name.replace('.', r'[.]')} is not a readable \.npz"):
                metrics.load_reference(p)


if __name__ == "__main__":
    absltest.main()
