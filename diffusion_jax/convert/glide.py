"""Import OpenAI's GLIDE checkpoints (glide-text2im) into Flax, exactly.

``from_openai_glide(checkpoint, flags)`` resolves glide-text2im's
``model_creation`` flags (``model_and_diffusion_defaults()`` /
``model_and_diffusion_defaults_upsampler()`` plus ``kind``), builds the
matching ``diffusion_jax.models.glide`` module and maps the state dict onto it
with the same strict key/shape checks as ``diffusion_jax.convert``.

GLIDE's respacing has one preset ours lacks: ``"fast27"`` (``"10,10,3,2,2"``
with step T-1 swapped for T-3, to reduce DDIM artifacts at the noisiest step);
``glide_space_timesteps`` / ``make_glide_schedule`` handle it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules
from diffusion_jax.convert import kinds
from diffusion_jax.convert.openai_flags import coerce_flag, str2bool
from diffusion_jax.convert.state_dict import (
    CheckpointError,
    load_state_dict,
    map_state_dict,
    shapes_of,
    to_flax,
    torch_key,
)

# glide_text2im.model_creation.model_and_diffusion_defaults() (24 keys).
_DEFAULTS = {
    "image_size": 64, "num_channels": 192, "num_res_blocks": 3, "channel_mult": "", "num_heads": 1, "num_head_channels": 64,
    "num_heads_upsample": -1, "attention_resolutions": "32,16,8", "dropout": 0.1, "text_ctx": 128, "xf_width": 512,
    "xf_layers": 16, "xf_heads": 8, "xf_final_ln": True, "xf_padding": True, "diffusion_steps": 1000,
    "noise_schedule": "squaredcos_cap_v2", "timestep_respacing": "", "use_scale_shift_norm": True, "resblock_updown": True,
    "use_fp16": True, "cache_text_emb": False, "inpaint": False, "super_res": False,
}
# model_and_diffusion_defaults_upsampler() overrides.
_UPSAMPLER = {"image_size": 256, "num_res_blocks": 2, "noise_schedule": "linear", "super_res": True}
# Accepted beyond GLIDE's names: our kind, gradient checkpointing, compute dtype.
_EXTRAS = {"kind": None, "use_checkpoint": False, "dtype": "float32"}
_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
_KIND_OF = {(False, False): "glide", (True, False): "glide_upsample", (False, True): "glide_inpaint",
            (True, True): "glide_upsample_inpaint"}

# OpenAI's released GLIDE checkpoints (glide_text2im/download.py MODEL_PATHS),
# with the respacing their notebooks sample with.
GLIDE_PRESETS: dict[str, dict] = {
    "base": {"kind": "glide", "timestep_respacing": "100"},
    "upsample": {"kind": "glide_upsample", "timestep_respacing": "fast27"},
    "base-inpaint": {"kind": "glide_inpaint", "timestep_respacing": "100"},
    "upsample-inpaint": {"kind": "glide_upsample_inpaint", "timestep_respacing": "fast27"},
}


def glide_defaults(kind: str = "glide") -> dict:
    """glide-text2im's default flags for a kind (the upsampler's for ``glide_upsample*``)."""
    _check_glide_kind(kind)
    d = dict(_DEFAULTS, **(_UPSAMPLER if kinds.takes(kind, "low_res") else {}))
    d["super_res"], d["inpaint"] = kinds.takes(kind, "low_res"), kinds.takes(kind, "inpaint")
    return d


def _check_glide_kind(kind: str) -> None:
    if kind not in kinds.names(dialect="glide"):
        raise ValueError(f"kind must be one of {kinds.names(dialect='glide')}, got {kind!r}")


def glide_in_channels(kind: str, channels: int) -> int:
    """The trunk's input width of a GLIDE kind on ``channels``-channel images: x (C), + upsampled
    low_res (C), + inpaint_image * mask (C) and the mask (1), as glide-text2im's models concatenate."""
    low_res, inpaint = kinds.takes(kind, "low_res"), kinds.takes(kind, "inpaint")
    return channels * (1 + low_res + inpaint) + inpaint


def _image_channels(kind: str, in_channels: int) -> int:
    """The image channels C of a GLIDE kind whose trunk takes ``in_channels`` (``glide_in_channels``'s inverse)."""
    low_res, inpaint = kinds.takes(kind, "low_res"), kinds.takes(kind, "inpaint")
    return (in_channels - inpaint) // (1 + low_res + inpaint)


def _channel_mult(value, image_size: int) -> tuple:
    if value in ("", None, ()):
        if image_size not in _MULT:
            raise ValueError(f"GLIDE has no default channel_mult for image_size {image_size} (only "
                             f"{sorted(_MULT)}); pass channel_mult explicitly")
        return _MULT[image_size]
    mult = tuple(int(m) for m in (value.split(",") if isinstance(value, str) else value))
    if 2 ** (len(mult) + 2) != image_size:  # create_model asserts this.
        raise ValueError(f"channel_mult {value!r} has {len(mult)} levels; GLIDE requires "
                         f"2 ** (levels + 2) == image_size ({image_size})")
    return mult


def _kind(flags: dict) -> str:
    kind = flags.get("kind")
    if kind is None:
        return _KIND_OF[(str2bool(flags.get("super_res", False)), str2bool(flags.get("inpaint", False)))]
    _check_glide_kind(kind)
    for name, want in (("super_res", kinds.takes(kind, "low_res")), ("inpaint", kinds.takes(kind, "inpaint"))):
        if name in flags and str2bool(flags[name]) != want:
            raise ValueError(f"flag {name}={flags[name]!r} contradicts kind {kind!r}")
    return kind


def resolve_glide_flags(flags: Mapping) -> dict:
    """Resolve glide-text2im ``model_creation`` flags (typed or strings) to our settings.

    Args:
      flags: any of the 24 ``model_and_diffusion_defaults()`` keys plus ``kind``
        (one of ``kinds.names(dialect="glide")``; else derived from ``super_res``/``inpaint``),
        ``use_checkpoint`` and ``dtype``. Unset keys take the kind's defaults
        (the upsampler's for ``glide_upsample*``).

    Returns:
      ``{"kind", "model": <module kwargs>, "diffusion": {...}}``; GLIDE's
      diffusion is EPSILON + LEARNED_RANGE and never rescales timesteps.

    Raises:
      ValueError: unknown flags (all listed), bad values, or an impossible channel_mult.
    """
    flags = dict(flags)
    kind = _kind(flags)
    table = dict(glide_defaults(kind), **_EXTRAS)
    unknown = sorted(set(flags) - set(table))
    if unknown:
        raise ValueError(f"unknown GLIDE flags: {unknown}; accepted: {sorted(table)}")
    f = dict(table)
    for k, v in flags.items():
        if k != "kind":
            try:
                f[k] = coerce_flag(v, table[k])
            except (TypeError, ValueError) as e:
                raise ValueError(f"flag {k}={v!r}: {e}") from None
    size = f["image_size"]
    in_ch = glide_in_channels(kind, 3)
    model = {
        "image_size": size, "in_channels": in_ch, "model_channels": f["num_channels"], "out_channels": 6,
        "num_res_blocks": f["num_res_blocks"],
        "attention_resolutions": tuple(size // int(r) for r in str(f["attention_resolutions"]).split(",") if r.strip()),
        "dropout": f["dropout"], "channel_mult": _channel_mult(f["channel_mult"], size), "use_checkpoint": f["use_checkpoint"],
        "num_heads": f["num_heads"], "num_head_channels": f["num_head_channels"], "num_heads_upsample": f["num_heads_upsample"],
        "use_scale_shift_norm": f["use_scale_shift_norm"], "resblock_updown": f["resblock_updown"], "text_ctx": f["text_ctx"],
        "xf_width": f["xf_width"], "xf_layers": f["xf_layers"], "xf_heads": f["xf_heads"], "xf_final_ln": f["xf_final_ln"],
        "xf_padding": f["xf_padding"], "dtype": f["dtype"],
    }
    diffusion = {
        "noise_schedule": f["noise_schedule"], "diffusion_steps": f["diffusion_steps"],
        "timestep_respacing": f["timestep_respacing"], "rescale_timesteps": False, "mean_type": "epsilon",
        "var_type": "learned_range",
        # GLIDE ships no training code; this is guided-diffusion's learned-sigma hybrid loss.
        "loss_type": "mse",
    }
    return {"kind": kind, "model": model, "diffusion": diffusion}


def resolve_glide_preset(name: str, **overrides) -> dict:
    """``resolve_glide_flags`` for a released checkpoint ("base", "upsample", "base-inpaint",
    "upsample-inpaint"); ``overrides`` replace flags (e.g. ``timestep_respacing``)."""
    if name not in GLIDE_PRESETS:
        raise ValueError(f"unknown GLIDE preset {name!r}; known: {sorted(GLIDE_PRESETS)}")
    return resolve_glide_flags(dict(GLIDE_PRESETS[name], **overrides))


def resolve_glide(flags: Mapping) -> dict:
    """``resolve_glide_preset`` when ``flags`` hold a ``preset`` (the rest override it), else
    ``resolve_glide_flags``."""
    flags = dict(flags)
    preset = flags.pop("preset", None)
    return resolve_glide_preset(preset, **flags) if preset else resolve_glide_flags(flags)


# ----------------------------------------------------------------------------- respacing
def glide_space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """GLIDE's ``space_timesteps`` (``"fast27"`` included): `schedules.space_timesteps`."""
    return schedules.space_timesteps(num_timesteps, section_counts)


def make_glide_schedule(noise_schedule: str, diffusion_steps: int, timestep_respacing="") -> schedules.Schedule:
    """The schedule glide-text2im's ``create_gaussian_diffusion`` builds (no timestep rescaling)."""
    return schedules.make_schedule(noise_schedule, diffusion_steps, timestep_respacing, rescale_timesteps=False)


# ----------------------------------------------------------------------------- params
def glide_example_inputs(kind: str, model: dict) -> tuple[tuple, dict]:
    """Batch-1 ``(args, kwargs)`` for ``module.init`` of a GLIDE kind."""
    s = model["image_size"]
    # in_channels counts every input the first conv sees: x, then for
    # upsamplers the low-res image, for inpainting the masked image + mask.
    in_ch = model.get("in_channels", glide_in_channels(kind, 3))
    c = _image_channels(kind, in_ch)
    x = jnp.zeros((1, s, s, c))
    kw = {}
    if model.get("xf_width", 512):
        ctx = model.get("text_ctx", 128)
        kw = {"tokens": jnp.zeros((1, ctx), jnp.int32), "mask": jnp.ones((1, ctx), bool)}
    if kinds.takes(kind, "low_res"):
        kw["low_res"] = jnp.zeros((1, s // 4, s // 4, c))
    return (x, jnp.zeros((1,), jnp.int32)), kw


def glide_param_shapes(module, kind: str, model: dict) -> dict:
    """{flax path: ShapeDtypeStruct} without initialising (``jax.eval_shape``)."""
    args, kw = glide_example_inputs(kind, model)
    return shapes_of(module, args, kw, what="GLIDE network", settings=model)


def glide_torch_key(path: tuple) -> str:
    """Flax path -> GLIDE state-dict key (``transformer/resblocks_0/ln_1/scale`` ->
    ``transformer.resblocks.0.ln_1.weight``)."""
    return re.sub(r"(^|\.)ln\.(\d+)\.", r"\1ln_\2.", torch_key(path))


_EMBEDDINGS = ("positional_embedding", "padding_embedding")  # [text_ctx, W] in both layouts
_CONV1D = ("qkv", "proj_out", "encoder_kv")  # Conv1d in torch; the transformer's are Linear


def _to_flax(path: tuple, w: np.ndarray) -> np.ndarray:
    if path[-1] in _EMBEDDINGS:
        return np.asarray(w, np.float32)
    return to_flax(path, w)


def _torch_shape(path: tuple, shape: tuple) -> tuple:
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0], 1) if path[-2] in _CONV1D else (shape[1], shape[0])
    return tuple(shape)


def _check_text_ctx(model: dict, state_dict: Mapping) -> None:
    pos = state_dict.get("positional_embedding")
    if pos is None or not model.get("xf_width"):
        return
    pos = np.shape(pos)
    if len(pos) == 2 and pos[0] != model["text_ctx"]:
        raise CheckpointError(
            f"text_ctx mismatch: the checkpoint's positional_embedding is {list(pos)}, i.e. text_ctx={pos[0]}, "
            f"but the flags say text_ctx={model['text_ctx']}; set text_ctx={pos[0]}")


def glide_params_from_state_dict(module, kind: str, model: dict, state_dict: Mapping) -> dict:
    """Map a GLIDE state dict onto the module's parameter tree (strict).

    Raises:
      CheckpointError: a text_ctx mismatch, or every missing, unexpected and
        mis-shaped key at once.
    """
    _check_text_ctx(model, state_dict)
    return map_state_dict(glide_param_shapes(module, kind, model), state_dict, key_fn=glide_torch_key,
                          to_flax_fn=_to_flax, torch_shape_fn=_torch_shape, what="GLIDE checkpoint")


def build_glide_model(kind: str, **model):
    """The GLIDE module of ``kind`` with constructor fields ``model``."""
    return kinds.build(kind, **model)


def from_openai_glide(checkpoint, flags: Mapping):
    """Load a GLIDE checkpoint as ``(module, params)``.

    Args:
      checkpoint: path (``.pt`` via ``torch.load(weights_only=True)``, ``.npz``,
        ``.safetensors``) or a mapping {state-dict key: array}.
      flags: glide-text2im ``model_creation`` flags plus ``kind`` (see
        ``resolve_glide_flags``), or ``{"preset": "base" | "upsample" |
        "base-inpaint" | "upsample-inpaint", ...overrides}``.

    Returns:
      ``(module, params)``; call ``module.apply({'params': params}, x, timesteps,
      tokens=tokens, mask=mask, low_res=None, inpaint_image=None, inpaint_mask=None)``
      (NHWC). Params are float32.
    """
    cfg = resolve_glide(flags)
    module = build_glide_model(cfg["kind"], **cfg["model"])
    state_dict = load_state_dict(checkpoint)
    return module, glide_params_from_state_dict(module, cfg["kind"], cfg["model"], state_dict)
