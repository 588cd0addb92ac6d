"""ADM (improved-/guided-diffusion) state dicts -> Flax params; converted-directory I/O; the CLI.

See the package docstring (``diffusion_jax.convert``) for the rules and the CLI."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import models
from diffusion_jax.convert.openai_flags import (  # noqa: F401  (re-exported API)
    PRESETS,
    parse_flag_string,
    parse_openai_flags,
    resolve_flags,
    resolve_preset,
)

_CONV1D = {
    "qkv",
    "proj_out",
    "qkv_proj",
    "c_proj",
}  # Dense here, Conv1d [O, I, 1] in torch.
_TORCH_HINT = "pip install 'diffusion_jax[torch]'"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the network."""


# ----------------------------------------------------------------------------- names/layouts
def torch_key(path: tuple[str, ...]) -> str:
    """Flax param path -> OpenAI state-dict key (``in_layers_2`` -> ``in_layers.2``)."""
    *mods, leaf = path
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(
        leaf, leaf
    )
    return ".".join([re.sub(r"_(\d+)", r".\1", m) for m in mods] + [leaf])


def torch_shape(path: tuple[str, ...], shape: tuple) -> tuple:
    """The PyTorch shape of the parameter whose Flax shape is ``shape``."""
    leaf = path[-1]
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0], 1) if path[-2] in _CONV1D else (shape[1], shape[0])
    if leaf == "positional_embedding":
        return (shape[1], shape[0])
    return tuple(shape)


def to_flax(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    """Convert one PyTorch-layout array to the Flax layout of ``path`` (float32)."""
    w = np.asarray(w, dtype=np.float32)
    leaf = path[-1]
    if leaf == "kernel" and w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    if leaf == "kernel" and w.ndim == 3 and w.shape[-1] == 1:
        return w[:, :, 0].T
    if (leaf == "kernel" and w.ndim == 2) or leaf == "positional_embedding":
        return w.T
    return w


# ----------------------------------------------------------------------------- reading files
def _from_torch_file(path: str) -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading .pt checkpoints needs PyTorch: {_TORCH_HINT}"
        ) from None
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
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from None


def _read(path: str) -> Mapping:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth", ".bin", ".ckpt"):
        return _from_torch_file(path)
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - BadZipFile, ValueError, OSError
            raise CheckpointError(
                f"{path} is not a readable .npz checkpoint ({e})"
            ) from None
    if ext == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends
            raise CheckpointError(
                f"{path} is not a readable .safetensors checkpoint ({e})"
            ) from None
    raise CheckpointError(
        f"{path}: not a checkpoint; expected a .pt, .npz or .safetensors file"
    )


def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor (fp16/bf16 included): go through float32.
        return v.detach().cpu().float().numpy()
    return np.asarray(v, dtype=np.float32)


def load_state_dict(checkpoint) -> dict[str, np.ndarray]:
    """A checkpoint path or mapping -> {OpenAI key: float32 array}.

    Raises:
      CheckpointError: unreadable file, optimizer state, or not a state dict.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if os.path.basename(path).startswith("opt"):
            raise CheckpointError(
                f"{path} looks like optimizer state (opt*.pt); pass the model file "
                "(model*.pt or ema_*.pt) instead"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        sd = _read(path)
    else:
        sd = checkpoint
    if not isinstance(sd, Mapping):
        raise CheckpointError(
            f"checkpoint holds a {type(sd).__name__}, not a state dict of arrays"
        )
    if "state" in sd and "param_groups" in sd:
        raise CheckpointError(
            "this is optimizer state (keys 'state'/'param_groups'); pass the model file "
            "(model*.pt or ema_*.pt) instead"
        )
    bad = [
        k for k, v in sd.items() if not (hasattr(v, "shape") and hasattr(v, "dtype"))
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint is not a flat state dict of arrays; non-array entries: {bad[:10]}"
        )
    return {str(k): _as_numpy(v) for k, v in sd.items()}


# ----------------------------------------------------------------------------- shapes/params
def example_inputs(kind: str, model: dict) -> tuple:
    """Minimal (batch 1) positional inputs for ``module.init`` of a given kind."""
    s, c = model["image_size"], model.get("in_channels", 3)
    t = jnp.zeros((1,), jnp.float32)
    if kind == "classifier":
        return (jnp.zeros((1, s, s, c)), t)
    y = jnp.zeros((1,), jnp.int32) if model.get("num_classes") is not None else None
    if kind == "super_res":
        lr = c // 2
        return (jnp.zeros((1, s, s, c - lr)), t, jnp.zeros((1, s, s, lr)), y)
    return (jnp.zeros((1, s, s, c)), t, y)


def param_shapes(module, kind: str, model: dict) -> dict[tuple, jax.ShapeDtypeStruct]:
    """{flax path: ShapeDtypeStruct} of the module's params, without initialising them."""
    if kind.startswith("glide"):
        from diffusion_jax.convert import glide as convert_glide

        return convert_glide.glide_param_shapes(module, kind, model)
    inputs = example_inputs(kind, model)
    try:
        tree = jax.eval_shape(lambda k: module.init(k, *inputs), jax.random.key(0))
    except Exception as e:  # noqa: BLE001 - re-raised with the settings that failed
        raise ValueError(
            f"these settings cannot build a network: {type(e).__name__}: {e}\nsettings: {model}"
        ) from None
    flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
    return {tuple(p.key for p in path): leaf for path, leaf in flat}


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


def _mismatch_error(missing, unexpected, mismatched, what: str) -> CheckpointError:
    lines = [f"{what} does not fit the network:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {missing}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
    if mismatched:
        lines.append(f"  mis-shaped keys ({len(mismatched)}):")
        lines += [
            f"    {k}: checkpoint {got}, expected {want}" for k, got, want in mismatched
        ]
    return CheckpointError("\n".join(lines))


def params_from_state_dict(module, kind: str, model: dict, state_dict: Mapping) -> dict:
    """Map an OpenAI state dict onto the module's parameter tree (strict).

    Raises:
      CheckpointError: listing every missing, unexpected and mis-shaped key at once.
    """
    return map_state_dict(param_shapes(module, kind, model), state_dict, key_fn=torch_key, to_flax_fn=to_flax,
                          torch_shape_fn=torch_shape, what="checkpoint")


def map_state_dict(shapes: dict, state_dict: Mapping, *, key_fn, to_flax_fn, torch_shape_fn, what: str) -> dict:
    """{flax path: ShapeDtypeStruct} + torch state dict -> params tree, strictly.

    `key_fn(path)` names a path's torch key, `to_flax_fn(path, w)` converts
    its layout, `torch_shape_fn(path, shape)` says what torch shape was expected.
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
        raise _mismatch_error(missing, unexpected, sorted(mismatched), what)
    return _unflatten(flat)


def from_openai(checkpoint, flags: dict):
    """Load an OpenAI checkpoint as ``(module, params)``.

    Args:
      checkpoint: path (``.pt`` via ``torch.load(weights_only=True)``, ``.npz``,
        ``.safetensors``) or a mapping {state-dict key: array}.
      flags: OpenAI ``script_util`` flags (typed or strings) plus ``kind``
        ("unet" default, "super_res", "classifier"; GLIDE's "glide",
        "glide_upsample", "glide_inpaint", "glide_upsample_inpaint" take
        glide-text2im's ``model_creation`` names instead), ``num_classes``,
        ``channel_mult``, ``classifier_channel_mult``,
        ``classifier_num_head_channels``, ``large_size``/``small_size`` and
        optionally ``repo`` ("improved" | "guided").

    Returns:
      ``(module, params)``; call ``module.apply({'params': params}, x, timesteps, y=None)``
      (NHWC). Params are float32.
    """
    flags = dict(flags)
    if str(flags.get("kind", "")).startswith("glide") or {"preset", "xf_width", "text_ctx"} & set(flags):
        from diffusion_jax.convert import glide as convert_glide  # GLIDE kinds use glide-text2im's flag names

        return convert_glide.from_openai_glide(checkpoint, flags)
    if "repo" not in flags:  # improved-only flags (sigma_small) select improved defaults.
        from diffusion_jax.convert.openai_flags import defaults

        only_improved = set(defaults("improved")) - set(defaults("guided"))
        flags["repo"] = "improved" if only_improved & set(flags) else "guided"
    cfg = resolve_flags(flags)
    module = models.build_model(cfg["kind"], **cfg["model"])
    state_dict = load_state_dict(checkpoint)
    return module, params_from_state_dict(module, cfg["kind"], cfg["model"], state_dict)


# ----------------------------------------------------------------------------- converted dirs
def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_converted(out_dir: str, cfg: dict, params: dict, source: dict) -> None:
    """Write ``config.json`` and ``params.safetensors`` (keys joined by "/")."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    arrays = {
        "/".join(p.key for p in path): np.asarray(v, np.float32) for path, v in flat
    }
    save_file(arrays, os.path.join(out_dir, "params.safetensors"))
    config = {
        "kind": cfg["kind"],
        "model": _jsonable(cfg["model"]),
        "diffusion": cfg["diffusion"],
        "source": source,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_converted(directory: str):
    """Read a converted directory back as ``(module, params, config_dict)``.

    Raises:
      CheckpointError: if the stored params do not fit the stored model settings.
    """
    from safetensors.numpy import load_file

    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    model = {
        k: tuple(v) if isinstance(v, list) else v for k, v in config["model"].items()
    }
    module = models.build_model(config["kind"], **model)
    shapes = param_shapes(module, config["kind"], model)
    arrays = load_file(os.path.join(directory, "params.safetensors"))
    want = {"/".join(p): tuple(s.shape) for p, s in shapes.items()}
    missing = sorted(set(want) - set(arrays))
    unexpected = sorted(set(arrays) - set(want))
    mismatched = sorted(
        (k, tuple(arrays[k].shape), want[k])
        for k in set(want) & set(arrays)
        if tuple(arrays[k].shape) != want[k]
    )
    if missing or unexpected or mismatched:
        raise _mismatch_error(
            missing, unexpected, mismatched, f"{directory}/params.safetensors"
        )
    params = _unflatten(
        {tuple(k.split("/")): jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
    )
    return module, params, config


def _glide_cli(args):
    """(cfg, source) for GLIDE presets ("base", "upsample", ...) and ``--repo glide`` flag strings."""
    from diffusion_jax.convert import glide as convert_glide

    if args.preset:
        cfg = convert_glide.resolve_glide_preset(args.preset)
        return cfg, {"checkpoint": args.checkpoint, "repo": "glide", "preset": args.preset}
    cfg = convert_glide.resolve_glide_flags(parse_flag_string(args.flags))
    return cfg, {"checkpoint": args.checkpoint, "flags": args.flags, "repo": "glide"}


def main(argv=None) -> None:
    from diffusion_jax.convert import glide as convert_glide

    ap = argparse.ArgumentParser(
        prog="python -m diffusion_jax.convert", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--checkpoint", required=True, help="model .pt / .npz / .safetensors"
    )
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--preset", choices=sorted(PRESETS) + sorted(convert_glide.GLIDE_PRESETS),
        help="a released checkpoint's name (GLIDE: base, upsample, base-inpaint, upsample-inpaint)"
    )
    group.add_argument(
        "--flags", help='OpenAI flag string, e.g. "--image_size 64 --num_channels 192"'
    )
    ap.add_argument(
        "--repo",
        choices=("improved", "guided", "glide"),
        default="guided",
        help="whose defaults --flags uses (glide: glide-text2im's model_creation names)",
    )
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    if args.preset in convert_glide.GLIDE_PRESETS or (args.flags and args.repo == "glide"):
        cfg, source = _glide_cli(args)
        module = models.build_model(cfg["kind"], **cfg["model"])
        params = convert_glide.glide_params_from_state_dict(
            module, cfg["kind"], cfg["model"], load_state_dict(args.checkpoint))
    elif args.preset:
        cfg, p = resolve_preset(args.preset), PRESETS[args.preset]
        source = {
            "checkpoint": args.checkpoint,
            "flags": p["flags"],
            "repo": p["repo"],
            "preset": args.preset,
        }
    else:
        cfg = parse_openai_flags(args.flags, args.repo)
        source = {"checkpoint": args.checkpoint, "flags": args.flags, "repo": args.repo}
    if source.get("repo") != "glide":
        module = models.build_model(cfg["kind"], **cfg["model"])
        params = params_from_state_dict(
            module, cfg["kind"], cfg["model"], load_state_dict(args.checkpoint)
        )
    save_converted(args.out, cfg, params, source)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    print(
        f"wrote {args.out}/config.json and params.safetensors ({cfg['kind']}, {n:,} parameters)"
    )


if __name__ == "__main__":
    main()
