"""Inception-v3 of the FID literature in Flax (pytorch-fid's `FIDInceptionA/C/E` variant).

The network of TF's `classify_image_graph_def.pb` (2015-12-05), as ported by
pytorch-fid: BasicConv = conv (no bias) + BatchNorm (eps 1e-3) + ReLU; the
A/C/E blocks average-pool without counting padding, the last E block
max-pools; a 1008-way `fc`.  Weights load from pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (`torch.load(weights_only=True)`).

Outputs for images in [0, 255] (uint8 or float) NHWC of any size (resized to
299 with torch's bilinear, align_corners=False, as pytorch-fid):
  pool    [N, 2048]   pool_3, for FID / precision / recall
  spatial [N, 2023]   first 7 channels of `mixed_6/conv` (Mixed_6d's 1x1 branch,
                      17x17), flattened, for sFID (guided-diffusion's evaluator)
  logits  [N, 1008]   for the Inception Score (softmax)
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases"


class InceptionFeatures(NamedTuple):
    pool: jax.Array
    spatial: jax.Array
    logits: jax.Array


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3, inference statistics) -> ReLU."""

    features: int
    kernel: int | tuple = 1
    stride: int = 1
    padding: int | tuple = 0

    @nn.compact
    def __call__(self, x):
        kh, kw = _pair(self.kernel)
        ph, pw = _pair(self.padding)
        w = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
        x = jax.lax.conv_general_dilated(x, w, _pair(self.stride), ((ph, ph), (pw, pw)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        f = self.features
        scale = self.param("bn_scale", nn.initializers.ones, (f,))
        bias = self.param("bn_bias", nn.initializers.zeros, (f,))
        mean = self.param("bn_mean", nn.initializers.zeros, (f,))
        var = self.param("bn_var", nn.initializers.ones, (f,))
        return nn.relu((x - mean) * (scale * jax.lax.rsqrt(var + 1e-3)) + bias)


def avg_pool_3x3_exclude_pad(x):
    """3x3 stride-1 average pool, padding 1, not counting padded cells (count_include_pad=False)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    n = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return s / n


def max_pool(x, k=3, s=2, p=0):
    return nn.max_pool(x, (k, k), (s, s), ((p, p), (p, p)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(BasicConv(48, name="branch5x5_1")(x))
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3))
        bp = BasicConv(self.pool_features, name="branch_pool")(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(BasicConv(64, name="branch3x3dbl_1")(x))
        bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, max_pool(x)], -1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c, name="branch7x7_1")(x)
        b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c, name="branch7x7dbl_1")(x)
        for i, (f, k, p) in enumerate([(c, (7, 1), (3, 0)), (c, (1, 7), (0, 3)), (c, (7, 1), (3, 0)),
                                       (192, (1, 7), (0, 3))]):
            bd = BasicConv(f, k, padding=p, name=f"branch7x7dbl_{i + 2}")(bd)
        bp = BasicConv(192, name="branch_pool")(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], -1), b1


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(BasicConv(192, name="branch3x3_1")(x))
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool(x)], -1)


class InceptionE(nn.Module):
    max_pool_branch: bool  # FIDInceptionE_2 (Mixed_7c) max-pools; E_1 average-pools.

    @nn.compact
    def __call__(self, x):
        def split(h, a, b):
            return jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name=a)(h),
                                    BasicConv(384, (3, 1), padding=(1, 0), name=b)(h)], -1)

        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = split(BasicConv(384, name="branch3x3_1")(x), "branch3x3_2a", "branch3x3_2b")
        bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(BasicConv(448, name="branch3x3dbl_1")(x))
        bd = split(bd, "branch3x3dbl_3a", "branch3x3dbl_3b")
        pooled = max_pool(x, 3, 1, 1) if self.max_pool_branch else avg_pool_3x3_exclude_pad(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """torch `F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing)."""
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear", antialias=False)


def preprocess(images: jax.Array) -> jax.Array:
    """[N, H, W, 3] in [0, 255] -> [N, 299, 299, 3] in [-1, 1]: pytorch-fid's resize of x / 255, then 2x - 1."""
    return resize_bilinear(images.astype(jnp.float32) / 255.0, 299) * 2.0 - 1.0


class InceptionV3(nn.Module):
    """`apply({'params': p}, images [N, H, W, 3] in [0, 255]) -> InceptionFeatures`.

    With `preprocess_input=False` the inputs are `preprocess(images)` already,
    so the 299x299 trunk compiles once whatever the image size.
    """

    preprocess_input: bool = True

    @nn.compact
    def __call__(self, images):
        x = preprocess(images) if self.preprocess_input else images
        x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
        x = max_pool(BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x))
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = max_pool(BasicConv(192, 3, name="Conv2d_4a_3x3")(x))
        for name, pf in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pf, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x, branch1x1 = InceptionC(c7, name=name)(x)
            if name == "Mixed_6d":  # TF's mixed_6/conv
                spatial = branch1x1[..., :7].reshape(x.shape[0], -1)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(False, name="Mixed_7b")(x)
        x = InceptionE(True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(1008, name="fc", precision=jax.lax.Precision.HIGHEST)(pool)
        return InceptionFeatures(pool, spatial, logits)


# ----------------------------------------------------------------------------- weights
_BN = {"weight": "bn_scale", "bias": "bn_bias", "running_mean": "bn_mean", "running_var": "bn_var"}


def params_from_torch_state_dict(state_dict) -> dict:
    """pytorch-fid's `FIDInceptionV3` state dict -> Flax params of `InceptionV3`."""
    params: dict = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        w = np.asarray(value.numpy() if hasattr(value, "numpy") else value, np.float32)
        if parts[0] == "fc":
            leaf, path = ("kernel", w.T) if parts[1] == "weight" else ("bias", w)
            params.setdefault("fc", {})[leaf] = path
            continue
        *mods, sub, name = parts  # e.g. Mixed_5b.branch1x1.conv.weight
        leaf = "kernel" if sub == "conv" else _BN[name]
        if sub == "conv":
            w = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        node = params
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = w
    return params


def torch_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors in pytorch-fid's weights file (torch layouts; BN's num_batches_tracked aside)."""
    return dict(_torch_state_dict_shapes())


@functools.cache
def _torch_state_dict_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    want = jax.eval_shape(InceptionV3(preprocess_input=False).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))["params"]
    torch_bn = {v: k for k, v in _BN.items()}
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]:
        *mods, leaf_name = (str(k.key) for k in path)
        prefix = ".".join(mods)
        if prefix == "fc":
            shapes["fc.weight" if leaf_name == "kernel" else "fc.bias"] = tuple(leaf.shape[::-1])
        elif leaf_name == "kernel":
            kh, kw, i, o = leaf.shape
            shapes[f"{prefix}.conv.weight"] = (o, i, kh, kw)
        else:
            shapes[f"{prefix}.bn.{torch_bn[leaf_name]}"] = tuple(leaf.shape)
    return tuple(shapes.items())


def _fmt(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def check_state_dict(state_dict, path: str) -> None:
    """ValueError naming the first few missing, misshapen or unexpected tensors (expected shapes included)."""
    fix = f"pass pytorch-fid's {WEIGHTS_FILE} (from {WEIGHTS_URL}) with --inception_path"
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict; {fix}")
    want = torch_state_dict_shapes()
    got = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()
           if not str(k).endswith(".num_batches_tracked")}
    bad = [f"{k} is {_fmt(got[k])}, expected {_fmt(s)}" for k, s in want.items() if k in got and got[k] != s]
    bad += [f"{k} {_fmt(s)} missing" for k, s in want.items() if k not in got]
    bad += [f"{k} unexpected" for k in got if k not in want]
    if bad:
        more = f" (and {len(bad) - 4} more)" if len(bad) > 4 else ""
        raise ValueError(f"{path} is not pytorch-fid's FID Inception: {'; '.join(bad[:4])}{more}; {fix}")


def load_inception(path: str | None):
    """(module, params) from pytorch-fid's weights file.

    Raises:
      FileNotFoundError: naming where to get the file and how to pass it.
      ValueError: the file is not a torch state dict, or does not hold the
        expected tensors (names the first few and their expected shapes).
    """
    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"Inception weights {path or WEIGHTS_FILE!r} not found. Download {WEIGHTS_FILE} from "
            f"{WEIGHTS_URL} (pytorch-fid's FID Inception) and pass its path with --inception_path.")
    import torch

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a torch weights file that torch.load(weights_only=True) reads ({first}); "
                         f"pass pytorch-fid's {WEIGHTS_FILE} (from {WEIGHTS_URL}) with --inception_path") from e
    check_state_dict(state_dict, path)
    params = params_from_torch_state_dict(state_dict)
    return InceptionV3(), jax.tree.map(jnp.asarray, params)


def make_feature_fn(module: InceptionV3, params, *, batch_size: int = 100):
    """`fn(images uint8 [N, H, W, 3]) -> InceptionFeatures` of NumPy arrays, streamed in batches.

    The resize compiles per image size; the 299x299 trunk compiles once.
    """
    trunk = module.clone(preprocess_input=False)
    resize = jax.jit(preprocess)  # Two programs: only this one depends on the image size.
    apply = jax.jit(lambda p, x: trunk.apply({"params": p}, x))

    def features(images) -> InceptionFeatures:
        outs = []
        for lo in range(0, len(images), batch_size):
            batch = np.asarray(images[lo:lo + batch_size])
            n = len(batch)
            if n < batch_size:  # Pad so the jitted function sees one shape.
                batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, 0)])
            outs.append([np.asarray(a)[:n] for a in apply(params, resize(batch))])
        return InceptionFeatures(*(np.concatenate(f) for f in zip(*outs)))

    return features
