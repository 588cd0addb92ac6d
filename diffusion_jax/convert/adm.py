"""ADM (improved-/guided-diffusion) checkpoints -> Flax params: the U-Net, the super-resolution U-Net, the classifier.

Parameter names map one to one (see ``diffusion_jax.models.unet``): the Flax
path ``("input_blocks_1_0", "in_layers_2", "kernel")`` is the state-dict key
``input_blocks.1.0.in_layers.2.weight``; layouts follow ``state_dict.to_flax``.
Flags are OpenAI's ``script_util`` names (``openai_flags``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from diffusion_jax.convert import kinds, openai_flags
from diffusion_jax.convert.state_dict import map_state_dict, shapes_of


def resolve_adm_flags(flags: Mapping) -> dict:
    """``openai_flags.resolve_flags`` choosing the repository when ``flags`` do not say.

    Without ``repo``, flags only improved-diffusion has (``sigma_small``) select
    its defaults; otherwise guided-diffusion's.

    Returns:
      ``{"kind", "model": <module kwargs>, "diffusion": {...}}``.
    """
    flags = dict(flags)
    if "repo" not in flags:
        only_improved = set(openai_flags.defaults("improved")) - set(openai_flags.defaults("guided"))
        flags["repo"] = "improved" if only_improved & set(flags) else "guided"
    return openai_flags.resolve_flags(flags)


def example_inputs(kind: str, model: Mapping) -> tuple:
    """Batch-1 positional inputs for ``module.init``: ``(x, t)`` (classifier),
    ``(x, t, low_res, y)`` (super_res) or ``(x, t, y)``; ``y`` is None when unconditional."""
    s, c = model["image_size"], model.get("in_channels", 3)
    t = jnp.zeros((1,), jnp.float32)
    if kinds.get(kind).role == "classifier":
        return (jnp.zeros((1, s, s, c)), t)
    y = jnp.zeros((1,), jnp.int32) if model.get("num_classes") is not None else None
    if kinds.takes(kind, "low_res"):
        lr = c // 2
        return (jnp.zeros((1, s, s, c - lr)), t, jnp.zeros((1, s, s, lr)), y)
    return (jnp.zeros((1, s, s, c)), t, y)


def param_shapes(module, kind: str, model: Mapping) -> dict[tuple, jax.ShapeDtypeStruct]:
    """{flax path: ShapeDtypeStruct} of an ADM module's params, without initialising them."""
    return shapes_of(module, example_inputs(kind, model), settings=model)


def params_from_state_dict(module, kind: str, model: Mapping, state_dict: Mapping) -> dict:
    """Map an OpenAI ADM state dict onto the module's parameter tree (strict).

    Raises:
      CheckpointError: listing every missing, unexpected and mis-shaped key at once.
    """
    return map_state_dict(param_shapes(module, kind, model), state_dict, what="checkpoint")
