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

`--clip_workdir` is either a training workdir of kind "clip" (a pair trained
from scratch, configs/digits_clip.py; its own tokenizer) or a CLIP pair
directory of OpenAI's converted towers (`convert.clip_towers`: `clip_pair.json`,
`image/`, `text/` and CLIP's BPE vocabulary; logit scale from its
`clip/config.yaml` keys). Either guides a GLIDE text model (`generation.text`)
or an ADM U-Net (`generation.unet`: the prompts are captions for CLIP only, the
class label stays the model's condition).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import guidance, schedules, text
from diffusion_jax.convert import clip_towers, kinds
from diffusion_jax.runtime import text_conditioning as tc
from diffusion_jax.runtime.checkpoints import load_for_inference


@dataclasses.dataclass(frozen=True)
class ClipGuide:
    """A loaded CLIP (a trained pair or OpenAI's converted towers) and the settings of its guidance.

    The three functions take the guide's `params` (passed through the compiled
    function's arguments, not closed over).
    """

    encode_image: Callable  # (params, x [B, H, W, C] in [-1, 1], original timesteps [B]) -> raw [B, D]
    encode_text: Callable  # (params, tokens [P, L] int32, lens [P] int32) -> raw [P, D]
    logit_scale: Callable  # params -> float32 scalar
    tokenize: Callable  # prompts [P] -> {"tokens": int32 [P, L], "lens": int32 [P]} (host)
    params: Any = dataclasses.field(compare=False, repr=False)
    scale: float = 1.0
    timestep_factor: float | None = None  # model timesteps -> original indices (rescaled models: T / 1000)


def pair_guide(module, params, tokenizer, text_ctx: int, scale: float = 1.0,
               timestep_factor: float | None = None) -> ClipGuide:
    """The guide of a trained `models.clip_pair.ClipPair` (kind "clip") with its own tokenizer."""
    def method(name):
        return lambda p, *a: module.apply({"params": p}, *a, method=name)

    return ClipGuide(method("encode_image"), method("encode_text"), method("scale"),
                     lambda prompts: tc.clip_caption_tokens(tokenizer, list(prompts), text_ctx), params,
                     float(scale), timestep_factor)


def towers_guide(towers: clip_towers.ClipTowers, scale: float = 1.0,
                 timestep_factor: float | None = None) -> ClipGuide:
    """The guide of OpenAI's converted towers: RGB images, CLIP's BPE, the configured logit scale (100)."""
    tokenizer = text.load_clip_tokenizer(towers.vocab)
    tc.check_tokenizer_fits(tokenizer, int(towers.text.n_bpe_vocab))
    ctx, logit_scale = int(towers.text.max_text_len), float(towers.flags["logit_scale"])

    def tokenize(prompts):
        tokens, lens = tokenizer.tokenize_batch([str(p) for p in prompts], ctx)
        return {"tokens": tokens, "lens": lens}

    return ClipGuide(lambda p, x, t: towers.image.apply({"params": p["image"]}, x, t),
                     lambda p, tokens, lens: towers.text.apply({"params": p["text"]}, tokens, lens),
                     lambda p: jnp.float32(logit_scale), tokenize,
                     {"image": towers.image_params, "text": towers.text_params}, float(scale), timestep_factor)


def _check_schedule(name: str, steps: int, model_diff: Mapping, flag: str) -> None:
    """The CLIP's noise levels must be the model's: the same betas (aliases such as squaredcos_cap_v2 agree)."""
    theirs, their_steps = model_diff["noise_schedule"], int(model_diff["diffusion_steps"])
    if steps != their_steps:
        raise ValueError(f"the CLIP was trained on {flag[1]}={steps} but the model uses {their_steps}: its noise "
                         "levels would not match; train the CLIP on the model's schedule")
    if not np.array_equal(schedules.get_named_beta_schedule(name, steps),
                          schedules.get_named_beta_schedule(theirs, steps)):
        raise ValueError(f"the CLIP was trained on {flag[0]}={name!r} but the model uses {theirs!r}: its noise "
                         "levels would not match; train the CLIP on the model's schedule")


def _check_image(size: int, channels: int, image_shape: tuple[int, int, int], fix: str) -> None:
    h, w, c = image_shape
    if (size, size, channels) != (h, w, c):
        raise ValueError(f"the CLIP sees {size}x{size}x{channels} images but the model samples {h}x{w}x{c}; {fix}")


def check_compatible(clip_cfg: dict, model_cfg: dict, image_shape: tuple[int, int, int]) -> None:
    """A CLIP pair must see the model's images and noise levels.

    Raises:
      ValueError: naming the CLIP's and the model's values and what to change:
        not a "clip" workdir, another image size or channel count, a timestep
        table shorter than the model's T, or another noise schedule.
    """
    if kinds.get(clip_cfg["kind"]).role != "clip":
        raise ValueError(f"--clip_workdir must hold a CLIP pair (kind 'clip', trained with configs/digits_clip.py, "
                         f"or OpenAI's towers converted with python -m diffusion_jax.convert --preset=clip); "
                         f"it holds a {clip_cfg['kind']!r} model")
    m = clip_cfg["model"]
    _check_image(m["image_size"], m["image_channels"], image_shape,
                 "train a CLIP at the model's size (config.model.image_size / image_channels and config.data)")
    steps = int(model_cfg["diffusion"]["diffusion_steps"])
    if int(m["n_timestep"]) < steps:
        raise ValueError(f"the CLIP's timestep table has {m['n_timestep']} rows but the model's diffusion has {steps} "
                         f"steps; train the CLIP with config.model.n_timestep={steps} on the model's schedule")
    d = clip_cfg["diffusion"]
    _check_schedule(d["noise_schedule"], int(d["diffusion_steps"]), model_cfg["diffusion"],
                    ("diffusion.noise_schedule", "diffusion.diffusion_steps"))


def check_towers(towers: clip_towers.ClipTowers, model_cfg: dict, image_shape: tuple[int, int, int]) -> None:
    """OpenAI's towers must see the model's images (RGB, the image tower's size) and noise levels."""
    _check_image(towers.image.image_size, 3, image_shape,
                 "CLIP guidance with these towers needs an RGB model at the image tower's size")
    f = towers.flags
    _check_schedule(f["beta_schedule"], int(f["n_timesteps"]), model_cfg["diffusion"],
                    ("beta_schedule", "n_timesteps"))


def load(clip_workdir: str, scale: float, model_cfg: dict, image_shape: tuple[int, int, int],
         ema_rate: float | None = None) -> ClipGuide:
    """Load and check a CLIP for guiding a model with config `model_cfg` (`check_compatible` / `check_towers`).

    `clip_workdir`: a training workdir of kind "clip" or a CLIP pair directory (`convert.clip_towers`).
    """
    diff = model_cfg["diffusion"]
    factor = diff["diffusion_steps"] / 1000.0 if diff["rescale_timesteps"] else None
    if clip_towers.is_pair_dir(clip_workdir):
        towers = clip_towers.load_pair(clip_workdir)
        check_towers(towers, model_cfg, image_shape)
        return towers_guide(towers, scale, factor)
    module, params, cfg = load_for_inference(clip_workdir, ema_rate=ema_rate)
    check_compatible(cfg, model_cfg, image_shape)
    return pair_guide(module, params, tc.tokenizer_from_config(cfg), int(cfg["model"]["text_ctx"]), scale, factor)


def check_prompts(prompts: Sequence[str], num_samples: int) -> None:
    """CLIP guidance needs a prompt, and no more prompts than samples (each prompt guides some sample)."""
    if not prompts:
        raise ValueError("--clip_workdir guides samples towards a caption: pass --prompt=\"...\" (repeatable)")
    if len(prompts) > num_samples:
        raise ValueError(f"{len(prompts)} prompts for {num_samples} samples: prompts {num_samples}.. would guide no "
                         f"sample; pass --num_samples={len(prompts)} (or a multiple) or fewer prompts")


def prompt_tokens(guide: ClipGuide, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """The CLIP tokens of each prompt: {"tokens": int32 [P, L], "lens": int32 [P]} (host)."""
    return guide.tokenize(prompts)


def make_cond_fn(guide: ClipGuide, params: Any, tokens: dict, index: jax.Array | None = None) -> Callable:
    """`cond_fn(x, timesteps, y=None)` of `guidance.clip_cond_fn` for one batch (traceable).

    Args:
      guide: the loaded CLIP (`load`).
      params: its parameters (passed through the compiled function's arguments).
      tokens: `prompt_tokens`, `[P, L]` and `[P]`: one row per sample, or (with `index`) per prompt.
      index: int `[B]`, the prompt row of each sample (e.g. `sample_ids % P`); None: row i is sample i's.
    """
    text_emb = guide.encode_text(params, tokens["tokens"], tokens["lens"])
    if index is not None:
        text_emb = text_emb[index]

    def image_fn(x, timesteps):
        t = timesteps if guide.timestep_factor is None else timesteps * guide.timestep_factor
        return guide.encode_image(params, x, t)

    return guidance.clip_cond_fn(image_fn, jax.lax.stop_gradient(text_emb), guide.scale,
                                 logit_scale=guide.logit_scale(params))


def cycled_cond_fn(guide: ClipGuide, clip_args: tuple, sample_ids: jax.Array) -> Callable:
    """`make_cond_fn` where sample i follows prompt `i % P` (`clip_args = (params, prompt_tokens of the P prompts)`).

    The P prompts are encoded inside the compiled function, once per batch.
    """
    params, tokens = clip_args
    return make_cond_fn(guide, params, tokens, index=sample_ids % tokens["tokens"].shape[0])


def engine_args(guide: ClipGuide | None, prompts: Sequence[str]) -> tuple:
    """`((params, prompt_tokens of the P prompts),)` to append to a sample function's args; `()` without CLIP."""
    return () if guide is None else ((guide.params, prompt_tokens(guide, prompts)),)


def add_cond_fn(cond_fn: Callable | None, other: Callable) -> Callable:
    """Both gradients on the mean (e.g. classifier + CLIP guidance); `other` alone when `cond_fn` is None."""
    if cond_fn is None:
        return other
    return lambda x, t, y=None: cond_fn(x, t, y) + other(x, t, y)
