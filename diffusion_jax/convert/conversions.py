"""How OpenAI's checkpoints of each family of model kinds become ``(module, params)``.

One ``Conversion`` per ``kinds.DIALECTS`` entry; ``of(kind)`` picks the one of a
kind's row. ``convert.api.from_openai`` is the caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from diffusion_jax.convert import adm, clip, glide, kinds


@dataclasses.dataclass(frozen=True)
class Conversion:
    """How OpenAI's checkpoints of one family of kinds become ``(module, params)``.

    Attributes:
      dialect: whose flag names ``from_openai`` reads (one of ``kinds.DIALECTS``).
      resolve_flags: ``flags -> {"kind", "model": <module kwargs>, "diffusion": {...}}``.
      param_shapes: ``(module, kind, model) -> {flax path: ShapeDtypeStruct}`` (no initialisation).
      params_from_state_dict: ``(module, kind, model, state_dict) -> params`` (strict).
      from_openai: ``(checkpoint, flags) -> (module, params)`` for families that
        bypass the three steps above (CLIP's encoders); None for the others.
    """

    dialect: str
    resolve_flags: Callable[[Mapping], dict]
    param_shapes: Callable | None = None
    params_from_state_dict: Callable | None = None
    from_openai: Callable | None = None


CONVERSIONS: dict[str, Conversion] = {
    "adm": Conversion("adm", adm.resolve_adm_flags, adm.param_shapes, adm.params_from_state_dict),
    "glide": Conversion("glide", glide.resolve_glide, glide.glide_param_shapes, glide.glide_params_from_state_dict),
    "clip": Conversion("clip", clip.resolve_clip_flags, clip.param_shapes, from_openai=clip.from_openai_clip),
}


def of(kind: str) -> Conversion:
    """The ``Conversion`` of ``kind``'s dialect.

    Raises:
      ValueError: an unknown kind (the message lists the known ones).
    """
    return CONVERSIONS[kinds.get(kind).dialect]
