"""GLIDE's noised CLIP (glide-text2im ``clip/image-enc``, ``clip/text-enc``) -> Flax params.

Flags are glide-text2im's ``clip/config.yaml`` keys; missing ones take that
file's values (the released model). Keys map one to one (see
``diffusion_jax.models.clip``): the Flax path ``("block_0", "f_attn", "f_q", "w")``
is the state-dict key ``blocks.block_0.f_attn.f_q.w``. Layouts: ``Affine.w``
``[out, in]`` -> ``[in, out]``, ``patch_proj`` OIHW -> HWIO; everything float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.convert import kinds
from diffusion_jax.convert.state_dict import mismatch_error
from diffusion_jax.models import clip as clip_models

CLIP_KINDS = ("clip_image", "clip_text")

# glide_text2im/clip/config.yaml (the released noised CLIP). logit_scale and
# beta_schedule are read by the guidance/sampling side, not by the encoders.
CLIP_CONFIG = {
    "logit_scale": 100.0,
    "beta_schedule": "squaredcos_cap_v2",
    "n_timesteps": 1000,
    "image_size": 64,
    "patch_size": 4,
    "n_vocab": 65536,
    "max_text_len": 77,
    "n_embd": 512,
    "n_head_state_text": 64,
    "n_head_text": 8,
    "n_xf_blocks_text": 12,
    "n_head_state_image": 64,
    "n_head_image": 12,
    "n_xf_blocks_image": 12,
}
_EXTRAS = {"kind": "clip_image", "dtype": "float32", "kernels": "auto"}


def resolve_clip_flags(flags: Mapping) -> dict:
    """``config.yaml`` defaults overlaid with ``flags`` (strings from a command line accepted).

    Raises:
      ValueError: an unknown flag name or kind, listed.
    """
    out = {**CLIP_CONFIG, **_EXTRAS}
    unknown = sorted(set(flags) - set(out))
    if unknown:
        raise ValueError(f"unknown CLIP flags {unknown}; accepted: {sorted(out)}")
    for name, value in flags.items():
        default = out[name]
        out[name] = type(default)(value) if isinstance(default, (int, float)) else value
    if out["kind"] not in CLIP_KINDS:
        raise ValueError(f"CLIP kind must be one of {CLIP_KINDS}, got {out['kind']!r}")
    return out


def clip_config(flags: Mapping) -> dict:
    """CLIP flags (with ``kind``) -> ``{"kind", "model": <encoder constructor kwargs>, "clip": <resolved flags>}``.

    ``models.clip.ImageEncoder(**cfg["model"])`` (or ``TextEncoder``) is the
    network ``clip_module`` builds; the shape of the other kinds' configs.
    """
    f = resolve_clip_flags(flags)
    common = {"n_embd": f["n_embd"], "dtype": f["dtype"], "kernels": f["kernels"]}
    if f["kind"] == "clip_image":
        model = dict(image_size=f["image_size"], patch_size=f["patch_size"], n_head=f["n_head_image"],
                     n_xf_blocks=f["n_xf_blocks_image"], n_head_state=f["n_head_state_image"],
                     n_timestep=f["n_timesteps"], **common)
    else:
        model = dict(n_bpe_vocab=f["n_vocab"], max_text_len=f["max_text_len"], n_head=f["n_head_text"],
                     n_xf_blocks=f["n_xf_blocks_text"], n_head_state=f["n_head_state_text"], **common)
    return {"kind": f["kind"], "model": model, "clip": f}


def clip_module(kind: str, flags: Mapping):
    """The Flax encoder for ``kind`` ("clip_image" | "clip_text") built from CLIP flags.

    Returns:
      ``models.clip.ImageEncoder`` (``apply({'params': p}, x [B,S,S,3] in [-1, 1],
      timesteps [B])``) or ``models.clip.TextEncoder`` (``apply({'params': p},
      tokens [B, max_text_len] int32, lens [B] int32)``); both give ``[B, n_embd]``.
    """
    model = clip_config({**flags, "kind": kind})["model"]
    return kinds.build(kind, **model)


def clip_param_shapes(module) -> dict[tuple, jax.ShapeDtypeStruct]:
    """{flax path: ShapeDtypeStruct} of an encoder's params via ``jax.eval_shape`` (no initialisation)."""
    if isinstance(module, clip_models.ImageEncoder):
        s = module.image_size
        t = jnp.zeros((1,), jnp.int32) if module.n_timestep else None
        inputs = (jnp.zeros((1, s, s, 3), jnp.float32), t)
    else:
        inputs = (jnp.zeros((1, module.max_text_len), jnp.int32), jnp.ones((1,), jnp.int32))
    tree = jax.eval_shape(lambda k: module.init(k, *inputs), jax.random.key(0))["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(p.key for p in path): leaf for path, leaf in flat}


def param_shapes(module, kind: str, model: Mapping) -> dict[tuple, jax.ShapeDtypeStruct]:
    """``Conversion.param_shapes`` of the towers: how ``api.load_converted`` reads a converted tower back."""
    del kind, model
    return clip_param_shapes(module)


def clip_torch_key(path: tuple[str, ...]) -> str:
    """Flax path -> glide-text2im state-dict key (``("input", "w_pos")`` -> ``blocks.input.w_pos``)."""
    return ".".join(("blocks",) + tuple(path))


def _to_flax(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    if path[-1] == "w" and w.ndim == 2:  # Affine [out, in] -> [in, out]
        return w.T
    if path[-1] == "patch_proj" and w.ndim == 4:  # OIHW -> HWIO
        return w.transpose(2, 3, 1, 0)
    return w


def _torch_shape(path: tuple[str, ...], shape: tuple) -> tuple:
    if path[-1] == "w" and len(shape) == 2:
        return (shape[1], shape[0])
    if path[-1] == "patch_proj" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def clip_params(state_dict: Mapping[str, np.ndarray], module, flags: Mapping | None = None) -> dict:
    """Map a glide-text2im CLIP encoder state dict onto ``module``'s parameter tree, strictly.

    Args:
      state_dict: {key: array} as ``ImageEncoder.state_dict()`` / ``TextEncoder.state_dict()``.
      module: from ``clip_module``.
      flags: the flags the module was built from (named in the error message).

    Returns:
      The Flax params tree (float32).

    Raises:
      CheckpointError (a ValueError): listing every missing, unexpected and mis-shaped key at once.
    """
    shapes = clip_param_shapes(module)
    by_key = {clip_torch_key(p): p for p in shapes}
    missing = sorted(set(by_key) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(by_key))
    mismatched, params = [], {}
    for key, path in sorted(by_key.items()):
        if key not in state_dict:
            continue
        w = np.asarray(state_dict[key], np.float32)
        v = _to_flax(path, w)
        want = tuple(shapes[path].shape)
        if v.shape != want:
            mismatched.append((key, tuple(w.shape), _torch_shape(path, want)))
            continue
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(v)
    if missing or unexpected or mismatched:
        raise mismatch_error(missing, unexpected, mismatched,
                             f"CLIP {type(module).__name__} state dict (flags {dict(flags or {})})")
    return params


def from_openai_clip(checkpoint, flags: Mapping):
    """``from_openai`` for ``flags["kind"]`` in ``CLIP_KINDS``: ``(module, params)``.

    Args:
      checkpoint: path (``.pt`` read with ``torch.load(weights_only=True)``,
        ``.npz``, ``.safetensors``) or a mapping {state-dict key: array}.
      flags: ``kind`` plus glide-text2im ``clip/config.yaml`` keys.
    """
    from diffusion_jax.convert import load_state_dict  # the package's weights-only reader

    module = clip_module(flags["kind"], flags)
    return module, clip_params(load_state_dict(checkpoint), module, flags)
