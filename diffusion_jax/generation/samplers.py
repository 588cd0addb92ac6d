"""The sampler table: `sample.py --sampler=NAME` and the training grids pick a loop here.

The math layer owns name -> loop (`sampling.named_sampler`, names
`sampling.SAMPLER_NAMES`); this table adds only what programs need on top:
each name's `clip_denoised` default and whether it takes DDIM's `eta`.
Adding a sampler is one entry in `sampling.named_sampler` and one row here.

- "ancestral": `sampling.p_sample_loop` (Ho et al. 2020, Eq. 11; OpenAI's `p_sample_loop`).
- "ddim": `sampling.ddim_sample_loop` (Song et al. 2021, Eq. 12; `eta` > 0 adds noise).
- "dpm++2m" / "dpm++3m": `sampling.dpm_solver_sample_loop`, multistep DPM-Solver++ of order 2 / 3
  (Lu et al. 2022b, Alg. 2).
- "dpm2s": singlestep DPM-Solver-2 (noise prediction; Lu et al. 2022a, Alg. 1).

OpenAI's ancestral and DDIM loops clip the x0 prediction to [-1, 1] by default,
and so do the data-prediction solvers "dpm++2m" / "dpm++3m": thresholding the x0
prediction is what data prediction is for (Lu et al. 2022b, Sec. 4), and
without it DPM-Solver++(2M) on the digits model is far worse than DDIM at
10-25 steps (FDD 205 vs 44 at 10 steps; clipped: 32, better than DDIM; see
scripts/digits_steps_table.py).  "dpm2s" (noise prediction, analysed without
thresholding) does not clip.  `--clip_denoised` / `--noclip_denoised`
override any default.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping

from diffusion_jax import sampling, schedules


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One row of the table: a loop, its bound options, its defaults."""

    loop: Callable
    options: Mapping = dataclasses.field(default_factory=dict)
    clip_denoised: bool = True  # default of --clip_denoised for this sampler
    takes_eta: bool = False  # DDIM's eta applies


_CLI_DEFAULTS = {  # name -> (clip_denoised default, takes eta)
    "ancestral": (True, False),
    "ddim": (True, True),
    "dpm++2m": (True, False),
    "dpm++3m": (True, False),
    "dpm2s": (False, False),
}
SAMPLERS: Mapping[str, Sampler] = types.MappingProxyType({
    name: Sampler(sampling.named_sampler(name), clip_denoised=_CLI_DEFAULTS[name][0],
                  takes_eta=_CLI_DEFAULTS[name][1])
    for name in sampling.SAMPLER_NAMES
})


@dataclasses.dataclass(frozen=True)
class Choice:
    """A validated sampler choice: the table name plus the values of its options."""

    name: str
    clip_denoised: bool
    eta: float = 0.0


def choose(sampler: str | None = None, *, use_ddim: bool = False, eta: float = 0.0,
           clip_denoised: bool | None = None, flag: str = "--sampler") -> Choice:
    """Resolve the sampling options of a program into a `Choice`.

    Args:
      sampler: a `SAMPLERS` name; None means "ddim" with `use_ddim`, else "ancestral".
      use_ddim: the older switch, an alias of `sampler="ddim"`.
      eta: DDIM's eta (only with "ddim").
      clip_denoised: clip x0 predictions to [-1, 1]; None takes the sampler's default.
      flag: the option's name in error messages.

    Raises:
      ValueError: an unknown name, `use_ddim` with another sampler, or `eta`
        given to a sampler without one (or negative).
    """
    if sampler is None:
        sampler = "ddim" if use_ddim else "ancestral"
    if sampler not in SAMPLERS:
        raise ValueError(f"{flag}={sampler!r} is not a sampler; choose one of {', '.join(SAMPLERS)}")
    if use_ddim and sampler != "ddim":
        raise ValueError(f"--use_ddim is an alias of {flag}=ddim; it conflicts with {flag}={sampler}")
    row = SAMPLERS[sampler]
    if eta != 0.0 and not row.takes_eta:
        raise ValueError(f"--eta={eta} only applies to DDIM: use {flag}=ddim (or --use_ddim)")
    if eta < 0:
        raise ValueError(f"--eta must be >= 0, got {eta}")
    return Choice(sampler, row.clip_denoised if clip_denoised is None else bool(clip_denoised), float(eta))


def make_loop(choice: Choice) -> Callable:
    """The chosen loop with its table options, `clip_denoised` and `eta` bound.

    Returns:
      `loop(rng, model_fn, schedule, shape, *, mean_type, var_type, cond_fn=None,
      y=None, sample_ids=None, x_T=None, progress=False)` -> samples `[B, H, W, C]`.
    """
    row = SAMPLERS[choice.name]
    kwargs = dict(row.options, clip_denoised=choice.clip_denoised)
    if row.takes_eta:
        kwargs["eta"] = choice.eta
    return functools.partial(row.loop, **kwargs)


def plan_schedule(diff: Mapping, respacing: str | None = None,
                  what: str = "--timestep_respacing") -> schedules.Schedule:
    """The sampling schedule of a model's (filled) ``diffusion`` config group, respaced.

    Args:
      diff: ``cfg["diffusion"]`` of ``load_for_inference`` (every field present).
      respacing: the user's respacing (a section-count list, "ddimN", "logsnrN", ...);
        None: the model's stored ``timestep_respacing``.
      what: the option that gave ``respacing``, for the error message.

    Raises:
      ValueError: an impossible respacing for the model's T (naming ``what``).
    """
    respacing = diff["timestep_respacing"] if respacing is None else respacing
    try:
        return schedules.make_schedule(diff["noise_schedule"], diff["diffusion_steps"], respacing,
                                       rescale_timesteps=diff["rescale_timesteps"])
    except ValueError as e:
        raise ValueError(f"{what}={respacing!r} for a {diff['diffusion_steps']}-step model: {e}") from None
