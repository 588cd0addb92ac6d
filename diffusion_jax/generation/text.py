"""`sample.py --prompt ...` for GLIDE text models: caption-guided sampling, optional upsampling.

Sample i gets prompt `prompts[i % len(prompts)]`; its noise is a function of
(seed, i) only, as for class-conditional sampling (`generation.program`). Each batch's
captions (and the empty caption) are encoded once, outside the compiled
sampling loop (`text_conditioning.text_model_fn`). With `--cfg_scale`:
classifier-free guidance over captions, `eps(empty) + s * (eps(caption) -
eps(empty))` on the eps channels, variance from the conditional half (GLIDE).

Upsampler stage (`--upsampler_workdir`, GLIDE's notebook recipe): the base
samples quantised to 8 bits become `low_res`, the upsampler runs unguided on
the same captions with DDIM on `--upsample_respacing` (default "fast27") from
initial noise x `upsample_temp` (0.997).

Outputs: OpenAI's `samples_NxHxWxC.npz` with `arr_0` (uint8 NHWC), `arr_1`
(int32 prompt index of each sample) and `prompts` (the prompt strings), plus a
PNG grid; with an upsampler, the base samples go to `<out>/base/` as well.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from diffusion_jax import sampling, schedules, text
from diffusion_jax.convert import kinds
from diffusion_jax.generation import clip_guidance, engine, images, samplers
from diffusion_jax.runtime import text_conditioning as tc
from diffusion_jax.runtime.checkpoints import load_for_inference


@dataclasses.dataclass(frozen=True)
class TextPlan:
    """Validated settings for one text-conditional sampling stage."""

    schedule: schedules.Schedule
    mean_type: str
    var_type: str
    image_shape: tuple[int, int, int]  # (H, W, C) of x
    prompts: tuple[str, ...]
    text_ctx: int
    tokenizer: Any
    cfg_scale: float | None
    sampler: samplers.Choice
    noise_scale: float = 1.0  # x_T multiplier (GLIDE's upsampler: 0.997)
    low_res: bool = False  # an upsampler: takes the previous stage's images
    clip: Any = None  # generation.clip_guidance.ClipGuide: CLIP guidance (--clip_workdir)


def load_tokenizer(cfg: dict, tokenizer_dir: str | None):
    """The tokenizer of a text model: GLIDE's BPE from `tokenizer_dir`, else the training config's.

    Raises:
      FileNotFoundError: a converted GLIDE checkpoint without `--tokenizer_dir`, or a
        directory lacking encoder.json / vocab.bpe (the message names the files and their source).
    """
    if tokenizer_dir:
        encoder_json, vocab_bpe = tc.tokenizer_files(tokenizer_dir)
        tokenizer = tc.make_tokenizer("glide", encoder_json=encoder_json, vocab_bpe=vocab_bpe)
    elif "text" in cfg and "source" not in cfg:
        # A converted checkpoint (it records its "source") gets the default "text" group from
        # runtime.config_io, not settings it was trained with: only training workdirs name their tokenizer.
        tokenizer = tc.tokenizer_from_config(cfg)
    else:
        raise FileNotFoundError(
            "this GLIDE checkpoint stores no tokenizer settings (a converted OpenAI checkpoint): pass "
            "--tokenizer_dir=DIR with GLIDE's tokenizer files encoder.json and vocab.bpe (or .gz copies). "
            + text._WHERE)
    tc.check_tokenizer_fits(tokenizer, int(cfg["model"]["n_vocab"]))
    return tokenizer


def _image_shape(cfg: dict, low_res: bool) -> tuple[int, int, int]:
    m = cfg["model"]
    channels = m["in_channels"] // (2 if low_res else 1)
    if kinds.takes(cfg["kind"], "inpaint"):
        raise ValueError(f"sample.py does not sample {cfg['kind']!r} (inpainting) models")
    return m["image_size"], m["image_size"], channels


def make_text_plan(cfg: dict, opts, tokenizer) -> TextPlan:
    """Check sample.py's options against a base GLIDE model's config.

    Raises:
      ValueError: no prompts, class labels or classifier guidance given, an
        upsampler passed as the base model, or an impossible respacing.
    """
    if not kinds.denoiser_taking(cfg["kind"], "tokens"):
        hint = " (pass it as --upsampler_workdir)" if kinds.denoiser_taking(cfg["kind"], "tokens", "low_res") else ""
        raise ValueError(f"the base model must be a 'glide' text model; this is {cfg['kind']!r}{hint}")
    if not opts.prompts:
        raise ValueError("this is a text-conditional model: pass --prompt=\"...\" (repeatable) or --prompts_file")
    if opts.labels is not None or opts.classifier_workdir:
        raise ValueError("--labels and --classifier_workdir apply to class-conditional models, not text models")
    if opts.num_samples < 1 or opts.batch_size < 1:
        raise ValueError(f"--num_samples and --batch_size must be >= 1 (got {opts.num_samples}, {opts.batch_size})")
    sampler = samplers.choose(opts.sampler, use_ddim=opts.use_ddim, eta=opts.eta, clip_denoised=opts.clip_denoised,
                              sampler_options=opts.sampler_options)
    diff = cfg["diffusion"]
    return TextPlan(samplers.plan_schedule(diff, opts.timestep_respacing), diff["mean_type"], diff["var_type"],
                    _image_shape(cfg, False), tuple(opts.prompts), int(cfg["model"]["text_ctx"]), tokenizer,
                    opts.cfg_scale, sampler)


def make_upsample_plan(cfg: dict, opts, tokenizer, base_shape: tuple[int, int, int]) -> TextPlan:
    """The upsampler stage's plan (GLIDE: DDIM on "fast27", noise x 0.997, no guidance)."""
    if not kinds.denoiser_taking(cfg["kind"], "tokens", "low_res"):
        raise ValueError(f"--upsampler_workdir must hold a 'glide_upsample' model; it holds {cfg['kind']!r}")
    shape = _image_shape(cfg, True)
    if shape[2] != base_shape[2] or shape[0] != base_shape[0] * tc.LOW_RES_FACTOR:
        raise ValueError(f"the upsampler makes {shape} images from {shape[0] // tc.LOW_RES_FACTOR} px, "
                         f"{shape[2]}-channel inputs (it was trained on 1/{tc.LOW_RES_FACTOR} size) but the base "
                         f"model samples {base_shape}")
    return TextPlan(samplers.plan_schedule(cfg["diffusion"], opts.upsample_respacing, "--upsample_respacing"),
                    cfg["diffusion"]["mean_type"], cfg["diffusion"]["var_type"], shape, tuple(opts.prompts),
                    int(cfg["model"]["text_ctx"]), tokenizer, None,
                    samplers.choose("ddim" if opts.upsample_ddim else "ancestral", flag="--upsample_ddim"),
                    noise_scale=opts.upsample_temp, low_res=True)


def prompt_index(plan: TextPlan, sample_ids: np.ndarray) -> np.ndarray:
    """int32 index into `plan.prompts` of each global sample index (prompts cycle)."""
    return (np.asarray(sample_ids) % len(plan.prompts)).astype(np.int32)


def make_text_sample_fn(module, plan: TextPlan, progress: bool) -> Callable:
    """The engine's per-batch function for one text stage.

    Returns:
      `fn(params, rng, sample_ids [B], cond) -> x [B, H, W, C]` in [-1, 1];
      `cond` = {"tokens" [B, L], "mask" [B, L]} (+ "low_res" [B, h, w, C] in
      [-1, 1] for upsamplers).  GLIDE's upsampler starts from x_T * noise_scale.
    """
    null = tc.null_caption(plan.tokenizer, plan.text_ctx)
    loop = samplers.make_loop(plan.sampler)

    def fn(args, rng, sample_ids, cond):
        params, clip_params = args if plan.clip is not None else (args, None)
        fixed = {"low_res": cond["low_res"]} if plan.low_res else {}
        model_fn, y = tc.text_model_fn(module, params, cond["tokens"], cond["mask"], null=null,
                                       cfg_scale=plan.cfg_scale, **fixed)
        cond_fn = None if plan.clip is None else clip_guidance.make_cond_fn(plan.clip, clip_params, cond["clip"])
        shape = (sample_ids.shape[0],) + plan.image_shape
        x_T = None
        if plan.noise_scale != 1.0:
            x_T = sampling.initial_noise(sampling.sample_keys(rng, sample_ids), shape) * plan.noise_scale
        return loop(rng, model_fn, plan.schedule, shape, mean_type=plan.mean_type, var_type=plan.var_type, y=y,
                    sample_ids=sample_ids, x_T=x_T, progress=progress, cond_fn=cond_fn)

    return fn


def text_conditioning(plan: TextPlan, low_res: np.ndarray | None = None) -> Callable[[np.ndarray], dict]:
    """`ids [B] -> {"tokens", "mask"[, "low_res"]}` of global sample ids (the engine's conditioning).

    Captions cycle over `plan.prompts`; `low_res` uint8 `[N, h, w, C]` previous-stage
    images become floats on their 8-bit grid, `x / 127.5 - 1`.
    """
    def cond(ids):
        prompts = np.asarray(plan.prompts)[prompt_index(plan, ids)]
        out = tc.caption_batch(plan.tokenizer, prompts, plan.text_ctx)
        if plan.clip is not None:  # the CLIP's own tokens of the same prompts
            out["clip"] = clip_guidance.prompt_tokens(plan.clip, prompts)
        if plan.low_res:
            out["low_res"] = np.asarray(low_res[ids], np.float32) / 127.5 - 1.0
        return out

    return cond


def generate_text(module, params, plan: TextPlan, opts, *, stage: int = 0, low_res: np.ndarray | None = None,
                  log: Callable[[str], None] = print) -> np.ndarray:
    """`opts.num_samples` uint8 images `[N, H, W, C]` through `engine.generate` (same on every host).

    `low_res`: uint8 `[N, h, w, C]` previous-stage images (upsamplers); `stage` picks the key
    (`fold_in(key(seed), stage)`), so the stages draw independent noise.
    """
    out = engine.generate(make_text_sample_fn(module, plan, opts.progress), opts.num_samples,
                          batch_size=opts.batch_size, rng=jax.random.fold_in(jax.random.key(opts.seed), stage),
                          args=params if plan.clip is None else (params, plan.clip.params),
                          conditioning=text_conditioning(plan, low_res), log=log,
                          desc="upsample " if plan.low_res else "")
    return out.images


def run_text(module, params, cfg: dict, workdir: str, opts, log: Callable[[str], None] = print):
    """Base stage (+ optional upsampler) for a GLIDE model; writes files on process 0."""
    plan = make_text_plan(cfg, opts, load_tokenizer(cfg, opts.tokenizer_dir))
    if opts.clip_workdir:  # GLIDE's CLIP-guided recipe: the conditional model, no classifier-free guidance
        if opts.cfg_scale is not None:
            raise ValueError("--clip_workdir samples the text model conditioned on the prompt and guides it with "
                             "CLIP (GLIDE's recipe); drop --cfg_scale, or drop --clip_workdir")
        clip_guidance.check_prompts(plan.prompts, opts.num_samples)
        plan = dataclasses.replace(plan, clip=clip_guidance.load(opts.clip_workdir, opts.clip_scale, cfg,
                                                                 plan.image_shape))
    samples = generate_text(module, params, plan, opts, log=log)
    base = None
    if opts.upsampler_workdir:
        up_module, up_params, up_cfg = load_for_inference(opts.upsampler_workdir)
        up_plan = make_upsample_plan(up_cfg, opts, load_tokenizer(up_cfg, opts.tokenizer_dir), plan.image_shape)
        base, samples = samples, generate_text(up_module, up_params, up_plan, opts, stage=2, low_res=samples,
                                               log=log)
    if jax.process_index() != 0:
        return None
    out = opts.out or os.path.join(workdir, "samples")
    extra = {"prompts": np.asarray(plan.prompts, np.str_)}
    index = prompt_index(plan, np.arange(opts.num_samples))
    if base is not None:
        base_dir = os.path.join(os.path.dirname(out) if out.endswith(".npz") else out, "base")
        images.write_samples(base_dir, base, index, max_grid_images=opts.max_grid_images, extra=extra)
    return images.write_samples(out, samples, index, max_grid_images=opts.max_grid_images, extra=extra)
