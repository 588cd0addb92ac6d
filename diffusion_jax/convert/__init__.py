"""Import OpenAI's improved-/guided-diffusion checkpoints into Flax, exactly.

Parameter names map one to one (see ``diffusion_jax.models.unet``): the Flax
path ``("input_blocks_1_0", "in_layers_2", "kernel")`` is the state-dict key
``input_blocks.1.0.in_layers.2.weight``. Layouts are converted: Conv2d
``[O, I, kh, kw]`` -> HWIO, Conv1d ``[O, I, 1]`` and Linear ``[O, I]`` -> Dense
``[I, O]``, ``AttentionPool2d.positional_embedding`` ``[C, HW+1]`` -> ``[HW+1, C]``;
everything is cast to float32. Loading never executes code.

CLI::

    python -m diffusion_jax.convert --checkpoint 64x64_diffusion.pt --preset 64x64_diffusion --out DIR
    python -m diffusion_jax.convert --checkpoint model.pt --flags "--image_size 32 ..." --repo improved --out DIR
    python -m diffusion_jax.convert --checkpoint base.pt --preset base --out DIR        # GLIDE (glide-text2im)
    python -m diffusion_jax.convert --checkpoint m.pt --flags "--xf_width 512 ..." --repo glide --out DIR

writes ``DIR/config.json`` and ``DIR/params.safetensors``; ``load_converted(DIR)``
reads them back.
"""

from diffusion_jax.convert.core import (  # noqa: F401  (the public API)
    PRESETS,
    CheckpointError,
    load_converted,
    load_state_dict,
    main,
    param_shapes,
    params_from_state_dict,
    parse_flag_string,
    parse_openai_flags,
    resolve_flags,
    resolve_preset,
    save_converted,
    to_flax,
    torch_key,
)
from diffusion_jax.convert import core as _core
from diffusion_jax.convert.clip import CLIP_KINDS, from_openai_clip


def from_openai(checkpoint, flags: dict):
    """OpenAI checkpoint -> ``(module, params)``; see ``core.from_openai`` (ADM, GLIDE) and
    ``clip.from_openai_clip`` (``kind`` "clip_image" / "clip_text": GLIDE's noised CLIP)."""
    if dict(flags).get("kind") in CLIP_KINDS:
        return from_openai_clip(checkpoint, flags)
    return _core.from_openai(checkpoint, flags)
