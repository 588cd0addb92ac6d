"""The state-dict layer: read PyTorch-style checkpoints safely, map them onto Flax trees strictly.

Everything here is independent of any one network family; ``adm.py`` (improved-
/guided-diffusion), ``glide.py`` (glide-text2im) and ``clip.py`` sit on top.

* Reading: ``load_state_dict(checkpoint)`` accepts a ``.pt`` / ``.pth`` / ``.bin``
  / ``.ckpt`` file (``torch.load(..., weights_only=True)``: no code runs), an
  ``.npz`` (``allow_pickle=False``), a ``.safetensors`` file or a mapping, and
  returns ``{key: float32 array}``.
* Names: ``torch_key(path)`` turns a Flax path ``("input_blocks_1_0",
  "in_layers_2", "kernel")`` into ``input_blocks.1.0.in_layers.2.weight``.
* Layouts: Conv2d ``[O, I, kh, kw]`` <-> HWIO, Conv1d ``[O, I, 1]`` and Linear
  ``[O, I]`` <-> Dense ``[I, O]`` (``to_flax``, ``torch_shape``).
* Strictness: ``map_state_dict`` raises one ``CheckpointError`` listing every
  missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_TORCH_HINT = "pip install 'diffusion_jax[torch]'"
_TORCH_EXT = (".pt", ".pth", ".bin", ".ckpt")
# Leaves stored as [O, I, 1] Conv1d weights in torch and as [I, O] Dense kernels here.
CONV1D = frozenset({"qkv", "proj_out", "qkv_proj", "c_proj"})


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the network."""


# ----------------------------------------------------------------------------- reading
def _from_torch_file(path: str) -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading .pt checkpoints needs PyTorch: {_TORCH_HINT}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise CheckpointError(
                f"{path}: this .pt file needs code to unpickle (custom classes), and we only load "
                "plain tensors (torch.load weights_only=True). Re-save just the state_dict "
                "(torch.save(model.state_dict(), path)) or convert it to .npz/.safetensors."
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({e})") from None
    # torch raises RuntimeError, EOFError, IndexError, ... on junk files.
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _read(path: str) -> Mapping:
    ext = os.path.splitext(path)[1].lower()
    if ext in _TORCH_EXT:
        return _from_torch_file(path)
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - BadZipFile, ValueError, OSError
            raise CheckpointError(f"{path} is not a readable .npz checkpoint ({e})") from None
    if ext == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends
            raise CheckpointError(f"{path} is not a readable .safetensors checkpoint ({e})") from None
    raise CheckpointError(f"{path}: not a checkpoint; expected a .pt, .npz or .safetensors file")


def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor (fp16/bf16 included): go through float32.
        return v.detach().cpu().float().numpy()
    return np.asarray(v, dtype=np.float32)


def load_state_dict(checkpoint) -> dict[str, np.ndarray]:
    """A checkpoint path or mapping -> ``{state-dict key: float32 array}``.

    Args:
      checkpoint: ``.pt``/``.pth``/``.bin``/``.ckpt`` (read with
        ``torch.load(weights_only=True)``), ``.npz``, ``.safetensors``, or a
        mapping {key: array-like with ``shape`` and ``dtype``}.

    Raises:
      FileNotFoundError: a path that does not exist.
      CheckpointError: unreadable file, optimizer state, or not a flat state dict.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if os.path.basename(path).startswith("opt"):
            raise CheckpointError(f"{path} looks like optimizer state (opt*.pt); pass the model file "
                                  "(model*.pt or ema_*.pt) instead")
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        sd = _read(path)
    else:
        sd = checkpoint
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(sd).__name__}, not a state dict of arrays")
    if "state" in sd and "param_groups" in sd:
        raise CheckpointError("this is optimizer state (keys 'state'/'param_groups'); pass the model file "
                              "(model*.pt or ema_*.pt) instead")
    bad = [k for k, v in sd.items() if not (hasattr(v, "shape") and hasattr(v, "dtype"))]
    if bad:
        raise CheckpointError(f"checkpoint is not a flat state dict of arrays; non-array entries: {bad[:10]}")
    return {str(k): _as_numpy(v) for k, v in sd.items()}


# ----------------------------------------------------------------------------- names and layouts
def torch_key(path: tuple[str, ...]) -> str:
    """Flax param path -> OpenAI state-dict key (``in_layers_2`` -> ``in_layers.2``)."""
    *mods, leaf = path
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join([re.sub(r"_(\d+)", r".\1", m) for m in mods] + [leaf])


def torch_shape(path: tuple[str, ...], shape: tuple, conv1d=CONV1D) -> tuple:
    """The PyTorch shape of the parameter whose Flax shape is ``shape``.

    ``conv1d``: module names whose 2-D Flax kernels are ``[O, I, 1]`` Conv1d weights in torch.
    """
    leaf = path[-1]
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0], 1) if path[-2] in conv1d else (shape[1], shape[0])
    if leaf == "positional_embedding":
        return (shape[1], shape[0])
    return tuple(shape)


def to_flax(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    """Convert one PyTorch-layout array to the Flax layout of ``path`` (float32).

    Conv2d OIHW -> HWIO, Conv1d ``[O, I, 1]`` -> ``[I, O]``, Linear ``[O, I]``
    -> ``[I, O]``, ``positional_embedding`` ``[C, N]`` -> ``[N, C]``.
    """
    w = np.asarray(w, dtype=np.float32)
    leaf = path[-1]
    if leaf == "kernel" and w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    if leaf == "kernel" and w.ndim == 3 and w.shape[-1] == 1:
        return w[:, :, 0].T
    if (leaf == "kernel" and w.ndim == 2) or leaf == "positional_embedding":
        return w.T
    return w


# ----------------------------------------------------------------------------- trees
def shapes_of(module, args: tuple, kwargs: dict | None = None, *, what: str = "network",
              settings: Mapping | None = None) -> dict:
    """``{flax path: ShapeDtypeStruct}`` of ``module``'s params via ``jax.eval_shape`` (no initialisation).

    Raises:
      ValueError: the module cannot be traced on ``args`` (bad settings; they are named).
    """
    kwargs = kwargs or {}
    try:
        tree = jax.eval_shape(lambda k: module.init(k, *args, **kwargs), jax.random.key(0))
    except Exception as e:  # noqa: BLE001 - re-raised with the settings that failed
        raise ValueError(f"these settings cannot build a {what}: {type(e).__name__}: {e}\n"
                         f"settings: {module if settings is None else dict(settings)}") from None
    flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
    return {tuple(p.key for p in path): leaf for path, leaf in flat}


def unflatten(flat: Mapping[tuple, Any]) -> dict:
    """``{path tuple: leaf}`` -> nested dict."""
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


def mismatch_error(missing, unexpected, mismatched, what: str) -> CheckpointError:
    """One error listing every missing, unexpected and mis-shaped ``(key, got, want)`` entry."""
    lines = [f"{what} does not fit the network:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {list(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {list(unexpected)}")
    if mismatched:
        lines.append(f"  mis-shaped keys ({len(mismatched)}):")
        lines += [f"    {k}: checkpoint {got}, expected {want}" for k, got, want in mismatched]
    return CheckpointError("\n".join(lines))


def map_state_dict(shapes: Mapping[tuple, Any], state_dict: Mapping, *, key_fn: Callable = torch_key,
                   to_flax_fn: Callable = to_flax, torch_shape_fn: Callable = torch_shape,
                   what: str = "checkpoint") -> dict:
    """``{flax path: ShapeDtypeStruct}`` + a torch state dict -> the Flax params tree, strictly.

    Args:
      shapes: the expected Flax leaves (``shapes_of``).
      state_dict: {torch key: array}.
      key_fn: ``path -> torch key``.
      to_flax_fn: ``(path, torch array) -> Flax array``.
      torch_shape_fn: ``(path, flax shape) -> torch shape`` (for the error message).
      what: how the error names the checkpoint.

    Returns:
      Nested dict of float32 ``jax.Array``.

    Raises:
      CheckpointError: listing every missing, unexpected and mis-shaped key at once.
    """
    by_key = {key_fn(p): p for p in shapes}
    missing = sorted(set(by_key) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(by_key))
    mismatched, flat = [], {}
    for key, path in by_key.items():
        if key not in state_dict:
            continue
        w = np.asarray(state_dict[key])
        v = to_flax_fn(path, w)
        want = tuple(shapes[path].shape)
        if v.shape != want:
            mismatched.append((key, tuple(w.shape), torch_shape_fn(path, want)))
        else:
            flat[path] = jnp.asarray(v, jnp.float32)
    if missing or unexpected or mismatched:
        raise mismatch_error(missing, unexpected, sorted(mismatched), what)
    return unflatten(flat)


def map_flat(shapes: Mapping[tuple, Any], arrays: Mapping[str, np.ndarray], what: str) -> dict:
    """Arrays keyed by ``"/".join(path)`` (our converted directories) -> params tree, strictly.

    Raises:
      CheckpointError: listing every missing, unexpected and mis-shaped key at once.
    """
    return map_state_dict(shapes, arrays, key_fn="/".join, to_flax_fn=lambda p, w: np.asarray(w, np.float32),
                          torch_shape_fn=lambda p, s: tuple(s), what=what)
