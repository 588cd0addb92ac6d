"""`sample.py --clip_workdir=D --clip_scale=S`: CLIP guidance with a trained noised CLIP pair.

GLIDE's recipe (glide-text2im, notebooks/clip_guided.ipynb): the text model is
sampled on the prompt *without* classifier-free guidance, and the sampler adds
the noised CLIP's gradient to the mean like classifier guidance (ancestral:
mean + variance * grad; DDIM: on eps), with

    grad = s * d/dx_t  logit_scale * <g(prompt) / |g|, f(x_t, t) / |f|>

(`guidance.clip_cond_fn`; `logit_scale` is the pair's own trained temperature,
as glide-text2im uses its model's). Sample i's prompt is the one its text
model gets, `prompts[i % len(prompts)]`; the prompts are encoded once per batch
outside the sampling loop.

The CLIP image tower indexes its timestep table with the *original* timestep:
the cond_fn receives `schedule.model_timesteps(t)` (`timestep_map[t]`, or that
times 1000 / T when the model rescales timesteps, which is undone here).
`--clip_workdir` is a training workdir of kind "clip" (configs/digits_clip.py);
OpenAI's converted CLIP towers (kinds "clip_image" / "clip_text", separate
directories and CLIP's BPE) are not read here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from diffusion_jax import guidance
from diffusion_jax.convert import kinds
from diffusion_jax.runtime import text_conditioning as tc
from diffusion_jax.runtime.checkpoints import load_for_inference


@dataclasses.dataclass(frozen=True)
class ClipGuide:
    """A loaded CLIP pair and the settings of its guidance."""

    module: Any  # models.clip_pair.ClipPair
    params: Any = dataclasses.field(compare=False, repr=False)
    tokenizer: Any = None
    text_ctx: int = 0
    scale: float = 1.0
    timestep_factor: float | None = None  # model timesteps -> original indices (rescaled models: T / 1000)


def check_compatible(clip_cfg: dict, model_cfg: dict, image_shape: tuple[int, int, int]) -> None:
    """A CLIP pair must see the model's images and noise levels.

    Raises:
      ValueError: naming the CLIP's and the model's values and what to change:
        not a "clip" workdir, another image size or channel count, a timestep
        table shorter than the model's T, or another noise schedule.
    """
    if kinds.get(clip_cfg["kind"]).role != "clip":
        raise ValueError(f"--clip_workdir must hold a CLIP pair (kind 'clip', trained with configs/digits_clip.py); "
                         f"it holds a {clip_cfg['kind']!r} model (converted GLIDE CLIP towers are not supported here)")
    m, h, w, c = clip_cfg["model"], *image_shape
    if (m["image_size"], m["image_size"], m["image_channels"]) != (h, w, c):
        raise ValueError(f"the CLIP sees {m['image_size']}x{m['image_size']}x{m['image_channels']} images but the model "
                         f"samples {h}x{w}x{c}; train a CLIP at the model's size (config.model.image_size / "
                         "image_channels and config.data)")
    steps = int(model_cfg["diffusion"]["diffusion_steps"])
    if int(m["n_timestep"]) < steps:
        raise ValueError(f"the CLIP's timestep table has {m['n_timestep']} rows but the model's diffusion has {steps} "
                         f"steps; train the CLIP with config.model.n_timestep={steps} on the model's schedule")
    mine, theirs = clip_cfg["diffusion"], model_cfg["diffusion"]
    for key in ("noise_schedule", "diffusion_steps"):
        if mine[key] != theirs[key]:
            raise ValueError(f"the CLIP was trained on diffusion.{key}={mine[key]!r} but the model uses {theirs[key]!r}: "
                             "its noise levels would not match; train the CLIP on the model's schedule")


def load(clip_workdir: str, scale: float, model_cfg: dict, image_shape: tuple[int, int, int],
         ema_rate: float | None = None) -> ClipGuide:
    """Load and check a CLIP pair for guiding a model with config `model_cfg` (see `check_compatible`)."""
    module, params, cfg = load_for_inference(clip_workdir, ema_rate=ema_rate)
    check_compatible(cfg, model_cfg, image_shape)
    diff = model_cfg["diffusion"]
    factor = diff["diffusion_steps"] / 1000.0 if diff["rescale_timesteps"] else None
    return ClipGuide(module, params, tc.tokenizer_from_config(cfg), int(cfg["model"]["text_ctx"]), float(scale),
                     factor)


def check_prompts(prompts: Sequence[str], num_samples: int) -> None:
    """CLIP guidance needs a prompt, and no more prompts than samples (each prompt guides some sample)."""
    if not prompts:
        raise ValueError("--clip_workdir guides samples towards a caption: pass --prompt=\"...\" (repeatable)")
    if len(prompts) > num_samples:
        raise ValueError(f"{len(prompts)} prompts for {num_samples} samples: prompts {num_samples}.. would guide no "
                         f"sample; pass --num_samples={len(prompts)} (or a multiple) or fewer prompts")


def prompt_tokens(guide: ClipGuide, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """The CLIP tokens of each sample's prompt: {"tokens": int32 [B, L], "lens": int32 [B]} (host)."""

    return tc.clip_caption_tokens(guide.tokenizer, list(prompts), guide.text_ctx)


def make_cond_fn(guide: ClipGuide, params: Any, tokens: dict) -> Callable:
    """`cond_fn(x, timesteps, y=None)` of `guidance.clip_cond_fn` for one batch (traceable).

    Args:
      guide: the loaded pair (`load`).
      params: its parameters (passed through the compiled function's arguments).
      tokens: `prompt_tokens` of the batch's samples, `[B, L]` and `[B]`.
    """
    apply = lambda *a, **k: guide.module.apply({"params": params}, *a, **k)
    text = apply(tokens["tokens"], tokens["lens"], method="encode_text")

    def image_fn(x, timesteps):
        t = timesteps if guide.timestep_factor is None else timesteps * guide.timestep_factor
        return apply(x, t, method="encode_image")

    return guidance.clip_cond_fn(image_fn, jax.lax.stop_gradient(text), guide.scale,
                                 logit_scale=apply(method="scale"))
