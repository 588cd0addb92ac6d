"""``from_openai`` through the kind table, and converted directories (``config.json`` + ``params.safetensors``)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from diffusion_jax.convert import conversions, kinds
from diffusion_jax.convert.state_dict import load_state_dict, map_flat

# Flags that only glide-text2im's model_creation has: without a kind they select the GLIDE family.
_GLIDE_MARKERS = frozenset({"preset", "xf_width", "text_ctx"})


def kind_of_flags(flags) -> str:
    """The kind ``from_openai`` imports: ``flags["kind"]``; else "glide" when glide-text2im flags appear
    (the GLIDE resolver then derives the kind from ``super_res``/``inpaint``); else "unet"."""
    if "kind" in flags:
        return flags["kind"]
    return "glide" if _GLIDE_MARKERS & set(flags) else "unet"


def from_openai(checkpoint, flags):
    """Load an OpenAI checkpoint as ``(module, params)``.

    Args:
      checkpoint: path (``.pt`` via ``torch.load(weights_only=True)``, ``.npz``,
        ``.safetensors``) or a mapping {state-dict key: array}.
      flags: the kind's flag dialect (``kinds.Kind.dialect``) plus ``kind``
        (a key of ``kinds.KINDS``; default "unet"). ADM kinds ("unet",
        "super_res", "classifier") take OpenAI's ``script_util`` names plus
        ``num_classes``, ``channel_mult``, ``classifier_channel_mult``,
        ``classifier_num_head_channels``, ``large_size``/``small_size`` and
        optionally ``repo`` ("improved" | "guided"); GLIDE kinds take
        glide-text2im's ``model_creation`` names (or ``preset``); CLIP kinds
        ("clip_image", "clip_text") take ``clip/config.yaml`` keys.

    Returns:
      ``(module, params)``, params float32; ADM: ``module.apply({'params': params},
      x, timesteps, y=None)``, GLIDE: ``..., tokens=, mask=, low_res=, inpaint_image=,
      inpaint_mask=`` (NHWC).

    Raises:
      ValueError: an unknown kind or flag; CheckpointError: a checkpoint that does not fit.
    """
    flags = dict(flags)
    conversion = conversions.of(kind_of_flags(flags))
    if conversion.from_openai is not None:
        return conversion.from_openai(checkpoint, flags)
    return convert_state_dict(conversion.resolve_flags(flags), load_state_dict(checkpoint))


def convert_state_dict(cfg: dict, state_dict) -> tuple:
    """``(module, params)`` for resolved settings ``cfg`` (``{"kind", "model", ...}``) and a state dict."""
    module = kinds.build(cfg["kind"], **cfg["model"])
    return module, params_from_state_dict(module, cfg["kind"], cfg["model"], state_dict)


def param_shapes(module, kind: str, model: dict) -> dict:
    """{flax path: ShapeDtypeStruct} of a module of ``kind`` built from ``model`` (``jax.eval_shape``)."""
    return conversions.of(kind).param_shapes(module, kind, model)


def params_from_state_dict(module, kind: str, model: dict, state_dict) -> dict:
    """Map an OpenAI state dict onto a module of ``kind`` (strict; the kind's family's key mapping).

    Raises:
      CheckpointError: listing every missing, unexpected and mis-shaped key at once.
    """
    return conversions.of(kind).params_from_state_dict(module, kind, model, state_dict)


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_converted(out_dir: str, cfg: dict, params: dict, source: dict) -> None:
    """Write ``config.json`` (``kind``, ``model``, ``diffusion``, ``source``) and
    ``params.safetensors`` (keys: Flax paths joined by "/", float32)."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    arrays = {"/".join(p.key for p in path): np.asarray(v, np.float32) for path, v in flat}
    save_file(arrays, os.path.join(out_dir, "params.safetensors"))
    config = {"kind": cfg["kind"], "model": _jsonable(cfg["model"]), "diffusion": cfg["diffusion"], "source": source}
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
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in config["model"].items()}
    module = kinds.build(config["kind"], **model)
    shapes = param_shapes(module, config["kind"], model)
    arrays = load_file(os.path.join(directory, "params.safetensors"))
    return module, map_flat(shapes, arrays, f"{directory}/params.safetensors"), config
