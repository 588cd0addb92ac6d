"""The sampling flags of the U-Net sampler, defined once for every program that samples.

`sample.py` defines all of them (DESIGN §5); `evaluate.py --metric=fid --workdir=...`
samples through the same engine and defines the same flags, with its own
defaults where its other metrics need them (`batch_size`, and the NLL's
`timestep_respacing` / `clip_denoised`).  Each flag has the name of a
`program.SampleOptions` field, so `options_from_flags` turns the parsed flags
into options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from absl import flags

from diffusion_jax.generation import samplers

# name -> (absl DEFINE_* kind, sample.py's default, help)
_FLAGS = {
    "batch_size": ("integer", 16, "Global batch size (rounded up to a multiple of the device count)."),
    "timestep_respacing": ("string", None, "'N', 'a,b,c', 'ddimN', or solver spacings 'quadN' / 'logsnrN'; "
                           "default: the checkpoint's own."),
    "sampler": ("enum", None, "Sampling loop (default: ancestral, or ddim with --use_ddim); see "
                "diffusion_jax/generation/samplers.py."),
    "use_ddim": ("boolean", False, "Alias of --sampler=ddim."),
    "eta": ("float", 0.0, "DDIM eta (needs --sampler=ddim)."),
    "sampler_options": ("string", None, "The sampler's own options, name=value,... (edm: s_churn, s_tmin, s_tmax, "
                        "s_noise; dpm++2m-sde: eta, s_noise, solver_type); see sampling.SAMPLER_OPTIONS."),
    "clip_denoised": ("boolean", None, "Clip the x0 prediction to [-1, 1] at every step; default: the sampler's "
                      "(on for every sampler but dpm2s; see diffusion_jax/generation/samplers.py)."),
    "labels": ("string", None, "Comma list of classes (cycled), 'random' or 'null'; default random if needed."),
    "cfg_scale": ("float", None, "Classifier-free guidance scale (model must have a null label)."),
    "classifier_workdir": ("string", None, "Noisy classifier (workdir or converted dir) for guidance."),
    "classifier_scale": ("float", 1.0, "Classifier guidance scale."),
    "seed": ("integer", 0, "Sample i is a function of (seed, i) only."),
    "ema_rate": ("float", None, "Which EMA of a training workdir to use; default: the checkpoint's choice."),
}
NAMES = tuple(_FLAGS)


def define(names: Iterable[str] = NAMES, *, defaults: Mapping | None = None, notes: Mapping | None = None,
           flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define the sampling flags `names` (sample.py's definitions).

    Args:
      names: which flags (default: all of `NAMES`).
      defaults: per-program default overrides, {name: value}.
      notes: text appended to a flag's help, {name: str} (e.g. what the
        program's other modes do with it).
      flag_values: the registry (tests pass their own).
    """
    defaults, notes = dict(defaults or {}), dict(notes or {})
    unknown = sorted((set(names) | set(defaults) | set(notes)) - set(_FLAGS))
    if unknown:
        raise ValueError(f"not sampling flags: {unknown} (known: {list(_FLAGS)})")
    for name in names:
        kind, default, help_ = _FLAGS[name]
        default, help_ = defaults.get(name, default), help_ + notes.get(name, "")
        if kind == "enum":
            flags.DEFINE_enum(name, default, list(samplers.SAMPLERS), help_, flag_values=flag_values)
        else:
            getattr(flags, f"DEFINE_{kind}")(name, default, help_, flag_values=flag_values)


def options_from_flags(options_cls, flag_values: flags.FlagValues = flags.FLAGS, **overrides):
    """`options_cls(**{field: flag value})` for every field of the dataclass that is a defined flag."""
    fields = {f.name for f in dataclasses.fields(options_cls)} & set(flag_values)
    values = {name: flag_values[name].value for name in fields}
    return options_cls(**dict(values, **overrides))
