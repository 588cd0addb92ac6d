"""OpenAI script_util flags -> our model/diffusion settings, and released presets.

Resolves improved-diffusion's and guided-diffusion's ``script_util`` flag sets
(``model_and_diffusion_defaults``, ``sr_model_and_diffusion_defaults``,
``classifier_and_diffusion_defaults``) exactly as their ``create_*`` functions
do: attention resolutions in pixels become downsample factors
``image_size // r``, ``channel_mult`` comes from a per-size table unless given,
``learn_sigma`` doubles the output channels, and the diffusion flags map onto
our ``mean_type`` / ``var_type`` / ``loss_type`` strings.
"""

from __future__ import annotations

import shlex
from typing import Any

from diffusion_jax.convert import kinds

REPOS = ("improved", "guided")

_DIFFUSION_IMPROVED = {
    "learn_sigma": False,
    "sigma_small": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": True,
}
_DIFFUSION_GUIDED = {
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}
_MODEL_IMPROVED = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
}
_MODEL_GUIDED = dict(
    _MODEL_IMPROVED,
    num_head_channels=-1,
    channel_mult="",
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
)
_CLASSIFIER = {
    "classifier_use_fp16": False,
    "classifier_width": 128,
    "classifier_depth": 2,
    "classifier_attention_resolutions": "32,16,8",
    "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True,
    "classifier_pool": "attention",
}
# Values OpenAI hard-codes, accepted as flags here (DESIGN §4).
_EXTRAS = {
    "kind": "unet",
    "num_classes": None,
    "channel_mult": "",
    "classifier_channel_mult": "",
    "classifier_num_head_channels": 64,
    "large_size": 256,
    "small_size": 64,
}
# Script-level flags (sampling/training scripts): accepted and ignored, so a
# whole README command line can be pasted.
_SCRIPT = {
    "clip_denoised": True,
    "num_samples": 0,
    "batch_size": 0,
    "use_ddim": False,
    "model_path": "",
    "classifier_path": "",
    "classifier_scale": 1.0,
    "base_samples": "",
    "data_dir": "",
    "val_data_dir": "",
    "schedule_sampler": "uniform",
    "lr": 0.0,
    "weight_decay": 0.0,
    "lr_anneal_steps": 0,
    "microbatch": -1,
    "ema_rate": "",
    "log_interval": 0,
    "save_interval": 0,
    "resume_checkpoint": "",
    "fp16_scale_growth": 0.0,
    "noised": True,
    "iterations": 0,
    "anneal_lr": False,
    "eval_interval": 0,
}

# channel_mult defaults per image size (script_util.create_model / create_classifier;
# improved has 32, guided has 128 and 512; they agree on 64 and 256).
_UNET_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
_SR_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
_CLASSIFIER_MULT = {k: v for k, v in _UNET_MULT.items() if k != 32}


def defaults(repo: str) -> dict[str, Any]:
    """Every flag a README command line of ``repo`` may carry, with its default."""
    if repo not in REPOS:
        raise ValueError(f"repo must be one of {REPOS}, got {repo!r}")
    if repo == "improved":
        d = dict(_MODEL_IMPROVED, **_DIFFUSION_IMPROVED)
    else:
        d = dict(_MODEL_GUIDED, **_DIFFUSION_GUIDED, **_CLASSIFIER)
    return dict(d, **_EXTRAS, **_SCRIPT)


def str2bool(v) -> bool:
    """OpenAI's ``str2bool``: yes/true/t/y/1 and no/false/f/n/0 (any case)."""
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("yes", "true", "t", "y", "1"):
        return True
    if s in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"boolean value expected, got {v!r}")


def coerce_flag(value, default):
    """A flag value (typed, or a string from a command line) as the type of its ``default``.

    bools go through ``str2bool``; ints and floats through ``int`` / ``float``
    (a tuple or list for an int default, e.g. ``channel_mult``, is kept);
    anything else is returned unchanged.

    Raises:
      ValueError, TypeError: a value that does not convert.
    """
    if isinstance(default, bool):
        return str2bool(value)
    if isinstance(default, int) and not isinstance(value, (tuple, list)):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def _mult(v) -> tuple:
    """'1,1,2' or (1, 1, 2) -> a tuple; '0.5' stays a float, integers stay ints."""
    items = v.split(",") if isinstance(v, str) else list(v)
    out = []
    for it in items:
        f = float(it)
        out.append(int(f) if f == int(f) else f)
    return tuple(out)


def _ds(resolutions, image_size: int) -> tuple:
    """Attention resolutions in pixels ('16,8') -> downsample factors (image_size // r)."""
    items = (
        resolutions.split(",") if isinstance(resolutions, str) else list(resolutions)
    )
    return tuple(image_size // int(r) for r in items if str(r).strip())


def _pick_mult(explicit, table: dict, size: int, what: str) -> tuple:
    if explicit not in ("", None, ()):
        return _mult(explicit)
    if size not in table:
        raise ValueError(
            f"{what}: no default channel_mult for size {size} (OpenAI knows {sorted(table)}); "
            "pass channel_mult explicitly"
        )
    return table[size]


def _model_kwargs(kind: str, f: dict) -> dict:
    num_classes = (f["num_classes"] or 1000) if f["class_cond"] else None
    if kinds.get(kind).role == "classifier":
        size = f["image_size"]
        return {
            "image_size": size,
            "in_channels": 3,
            "model_channels": f["classifier_width"],
            "out_channels": f["num_classes"] or 1000,
            "num_res_blocks": f["classifier_depth"],
            "attention_resolutions": _ds(f["classifier_attention_resolutions"], size),
            "channel_mult": _pick_mult(
                f["classifier_channel_mult"] or f["channel_mult"],
                _CLASSIFIER_MULT,
                size,
                "classifier",
            ),
            "use_checkpoint": f["use_checkpoint"],
            "num_head_channels": f["classifier_num_head_channels"],
            "use_scale_shift_norm": f["classifier_use_scale_shift_norm"],
            "resblock_updown": f["classifier_resblock_updown"],
            "pool": f["classifier_pool"],
        }
    sr = kinds.takes(kind, "low_res")
    size = f["large_size"] if sr else f["image_size"]
    mult = _pick_mult(f["channel_mult"], _SR_MULT if sr else _UNET_MULT, size, kind)
    return {
        "image_size": size,
        "in_channels": 6 if sr else 3,
        "model_channels": f["num_channels"],
        "out_channels": 6 if f["learn_sigma"] else 3,
        "num_res_blocks": f["num_res_blocks"],
        "attention_resolutions": _ds(f["attention_resolutions"], size),
        "dropout": f["dropout"],
        "channel_mult": mult,
        "num_classes": num_classes,
        "use_checkpoint": f["use_checkpoint"],
        "num_heads": f["num_heads"],
        "num_head_channels": f.get("num_head_channels", -1),
        "num_heads_upsample": f["num_heads_upsample"],
        "use_scale_shift_norm": f["use_scale_shift_norm"],
        "resblock_updown": f.get("resblock_updown", False),
        # OpenAI's super-res defaults drop use_new_attention_order: always legacy.
        "use_new_attention_order": False
        if sr
        else f.get("use_new_attention_order", False),
    }


def _diffusion(f: dict) -> dict:
    if f["learn_sigma"]:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if f.get("sigma_small") else "fixed_large"
    if f["use_kl"]:
        loss_type = "rescaled_kl"
    else:
        loss_type = "rescaled_mse" if f["rescale_learned_sigmas"] else "mse"
    return {
        "noise_schedule": f["noise_schedule"],
        "diffusion_steps": f["diffusion_steps"],
        "timestep_respacing": f["timestep_respacing"],
        "rescale_timesteps": f["rescale_timesteps"],
        "mean_type": "start_x" if f["predict_xstart"] else "epsilon",
        "var_type": var_type,
        "loss_type": loss_type,
    }


def resolve_flags(flags: dict, repo: str = "guided") -> dict:
    """Resolve a flag dict (OpenAI names; values typed or strings) to our settings.

    Args:
      flags: OpenAI ``script_util`` flag names plus the extras ``kind``,
        ``num_classes``, ``channel_mult``, ``classifier_channel_mult``,
        ``classifier_num_head_channels``, ``large_size``/``small_size``; ``repo``
        may be given here too.
      repo: "improved" or "guided": whose defaults fill unset flags.

    Returns:
      ``{"kind", "model": <module kwargs>, "diffusion": {...}}``.

    Raises:
      ValueError: unknown flags (all listed), bad values, or no channel_mult default.
    """
    flags = dict(flags)
    repo = flags.pop("repo", repo)
    table = defaults(repo)
    unknown = sorted(set(flags) - set(table))
    if unknown:
        raise ValueError(f"unknown {repo}-diffusion flags: {unknown}")
    f = dict(table)
    for k, v in flags.items():
        try:
            f[k] = coerce_flag(v, table[k])
        except (TypeError, ValueError) as e:
            raise ValueError(f"flag {k}={v!r}: {e}") from None
    if f["num_classes"] is not None:
        f["num_classes"] = int(f["num_classes"])
    kind = f["kind"]
    if "kind" not in flags and ("large_size" in flags or "small_size" in flags):
        kind = "super_res"
    if kind not in kinds.names(dialect="adm"):
        raise ValueError(f"kind must be one of {kinds.names(dialect='adm')}, got {kind!r}")
    if kinds.get(kind).role == "classifier" and repo != "guided":
        raise ValueError(
            "classifiers exist only in guided-diffusion: use repo='guided'"
        )
    return {"kind": kind, "model": _model_kwargs(kind, f), "diffusion": _diffusion(f)}


def parse_flag_string(text: str) -> dict[str, str]:
    """'--a 1 --b=x ...' -> {'a': '1', 'b': 'x'} (values left as strings)."""
    toks = shlex.split(text)
    out, i = {}, 0
    while i < len(toks):
        tok = toks[i]
        if not tok.startswith("--"):
            raise ValueError(f"expected a --flag, got {tok!r} in {text!r}")
        name = tok[2:]
        if "=" in name:
            name, val = name.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(toks):
                raise ValueError(f"flag --{name} has no value")
            val = toks[i + 1]
            i += 2
        out[name] = val
    return out


def parse_openai_flags(text: str, repo: str) -> dict:
    """Resolve a flag string copied from an OpenAI README (see ``resolve_flags``).

    Example: ``parse_openai_flags("--image_size 32 --num_channels 128 --learn_sigma True",
    "improved")``.
    """
    return resolve_flags(parse_flag_string(text), repo)
