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
- "dpm++2m-sde": `sampling.dpmpp_2m_sde_sample_loop`, DPM-Solver++(2M) SDE (Lu et al. 2022b;
  options eta, s_noise, solver_type).
- "edm": `sampling.edm_sample_loop`, EDM's churned Heun sampler (Karras et al. 2022, Alg. 2; options
  s_churn, s_tmin, s_tmax, s_noise); 2K - 2 network calls for K respaced steps.

Options beyond `clip_denoised` / `eta` (`sampling.SAMPLER_OPTIONS`) come as
`--sampler_options=name=value,...` and are checked by `choose`.

OpenAI's ancestral and DDIM loops clip the x0 prediction to [-1, 1] by default,
and so do the data-prediction solvers "dpm++2m" / "dpm++3m": thresholding the x0
prediction is what data prediction is for (Lu et al. 2022b, Sec. 4), and
without it DPM-Solver++(2M) on the digits model is far worse than DDIM at
10-25 steps (FDD 205 vs 44 at 10 steps; clipped: 32, better than DDIM; see
scripts/digits_steps_table.py).  "dpm2s" (noise prediction, analysed without
thresholding) does not clip.  The stochastic solvers clip by default too
("dpm++2m-sde" is data prediction; "edm" on these eps-prediction models at few
steps).  `--clip_denoised` / `--noclip_denoised`
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
    "dpm++2m-sde": (True, False),
    "edm": (True, False),
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
    options: tuple = ()  # sorted (name, value) pairs of `sampling.SAMPLER_OPTIONS[name]`


def choose(sampler: str | None = None, *, use_ddim: bool = False, eta: float = 0.0,
           clip_denoised: bool | None = None, sampler_options: str | Mapping | None = None,
           flag: str = "--sampler") -> Choice:
    """Resolve the sampling options of a program into a `Choice`.

    Args:
      sampler: a `SAMPLERS` name; None means "ddim" with `use_ddim`, else "ancestral".
      use_ddim: the older switch, an alias of `sampler="ddim"`.
      eta: DDIM's eta (only with "ddim").
      clip_denoised: clip x0 predictions to [-1, 1]; None takes the sampler's default.
      sampler_options: the sampler's own options, a mapping or "name=value,..."
        (`--sampler_options`); see `sampling.SAMPLER_OPTIONS`.
      flag: the option's name in error messages.

    Raises:
      ValueError: an unknown name, `use_ddim` with another sampler, or `eta`
        given to a sampler without one (or negative), or an option the
        sampler does not take (or a bad value).
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
    options = parse_options(sampler, sampler_options or {})
    try:
        sampling.check_sampler_options(sampler, options)
    except ValueError as e:
        raise ValueError(f"--sampler_options: {e}") from None
    return Choice(sampler, row.clip_denoised if clip_denoised is None else bool(clip_denoised), float(eta),
                  tuple(sorted(options.items())))


def parse_options(sampler: str, text: str | Mapping) -> dict:
    """{name: value} from "name=value,..." (values typed like the option's default); a mapping passes through.

    Raises:
      ValueError: an item without "=", or a value that does not parse.
    """
    if not isinstance(text, str):
        return dict(text)
    defaults, options = sampling.SAMPLER_OPTIONS.get(sampler, {}), {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--sampler_options: {item!r} is not name=value (e.g. s_churn=40,s_noise=1.0)")
        name = name.strip()
        try:
            options[name] = float(value) if isinstance(defaults.get(name, 0.0), float) else value.strip()
        except ValueError:
            raise ValueError(f"--sampler_options: {name}={value!r} is not a number") from None
    return options


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
    return functools.partial(row.loop, **kwargs, **dict(choice.options))


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
