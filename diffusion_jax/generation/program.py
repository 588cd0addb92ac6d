"""Orchestration behind `sample.py`: load a model, validate options, sample sharded, write files.

Sampling goes through `diffusion_jax.generation.engine` (every device of every
host; sample i is a pure function of (seed, i), whatever the device count, the
host count or the batch size) with the loop picked from
`diffusion_jax.generation.samplers` (`--sampler`).  Outputs follow OpenAI's
layout (`generation.images`): `samples_NxHxWxC.npz` with `arr_0` (uint8 NHWC)
and `arr_1` (labels, for class-conditional sampling), plus a PNG grid.
Text (GLIDE) models take `prompts` instead of labels; `diffusion_jax.generation.text`
samples them (caption-guided, optional upsampler stage). `--clip_workdir` guides
either kind towards `prompts` with a noised CLIP (`generation.clip_guidance`);
for a U-Net the prompts are CLIP's captions only and the labels stay its condition.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import numpy as np

from diffusion_jax.convert import kinds
from diffusion_jax.generation import clip_guidance, images, inpaint, shards, superres
from diffusion_jax.generation import samplers  # noqa: F401  (scripts read program.samplers)
from diffusion_jax.generation import text as text_program
from diffusion_jax.generation.unet import (  # noqa: F401  (the U-Net path, re-exported for callers)
    Plan, generate, labels_for, make_plan, make_sample_fn, stream)
from diffusion_jax.runtime.checkpoints import load_for_inference


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Command-line options of sample.py (DESIGN §5)."""

    num_samples: int = 16
    batch_size: int = 16
    timestep_respacing: str | None = None  # None: the checkpoint's own respacing.
    sampler: str | None = None  # a `samplers.SAMPLERS` name; None: "ddim" with use_ddim, else "ancestral"
    use_ddim: bool = False  # alias of sampler="ddim"
    eta: float = 0.0  # DDIM only
    sampler_options: str | None = None  # "name=value,..." of sampling.SAMPLER_OPTIONS[sampler]
    clip_denoised: bool | None = None  # None: the sampler's default (samplers.SAMPLERS)
    labels: str | None = None  # "0,3,7" | "random" | "null"; None: random if needed.
    cfg_scale: float | None = None
    classifier_workdir: str | None = None
    classifier_scale: float = 1.0
    seed: int = 0
    ema_rate: float | None = None
    out: str | None = None  # directory, or a path ending in .npz
    progress: bool = True
    max_grid_images: int = 256
    write_shards: bool | None = None  # None: shards when the samples exceed shards.MAX_IN_MEMORY_BYTES
    # Text (GLIDE) models: see diffusion_jax.generation.text.
    prompts: tuple[str, ...] = ()  # cycled over the samples
    tokenizer_dir: str | None = None  # encoder.json + vocab.bpe for converted GLIDE checkpoints
    upsampler_workdir: str | None = None  # a 'glide_upsample' model run on the base samples
    upsample_respacing: str = "fast27"
    upsample_ddim: bool = True
    upsample_temp: float = 0.997  # the upsampler's x_T multiplier (GLIDE's notebook)
    clip_workdir: str | None = None  # a CLIP (kind "clip" workdir or converted pair) guiding sampling (clip_guidance)
    clip_scale: float = 1.0  # CLIP guidance scale
    # Super-resolution (generation.superres) and GLIDE inpainting (generation.inpaint).
    base_samples: str | None = None  # OpenAI-format .npz of low-res samples for a 'super_res' --workdir
    inpaint_image: str | None = None  # PNG/JPEG/.npz image to inpaint
    inpaint_mask: str | None = None  # PNG/.npz mask: 1 (white) keeps a pixel, 0 (black) is generated


def run(workdir: str, opts: SampleOptions, log: Callable[[str], None] = print) -> tuple[str, str] | None:
    """Load, validate, sample and (on process 0) write; returns (npz_path, png_path) there."""
    module, params, cfg = load_for_inference(workdir, ema_rate=opts.ema_rate)
    for workflow in (inpaint, superres):  # --inpaint_*, --base_samples, ADM cascades
        if workflow.applies(cfg, opts, workdir):
            if opts.clip_workdir:
                raise ValueError("--clip_workdir guides text (GLIDE) and ADM U-Net sampling, not inpainting or "
                                 "super-resolution; drop --clip_workdir")
            return workflow.run(module, params, cfg, workdir, opts, load_for_inference, log=log)
    if opts.clip_scale != 1.0 and not opts.clip_workdir:
        raise ValueError("--clip_scale given without --clip_workdir")
    if kinds.takes(cfg["kind"], "tokens"):
        return text_program.run_text(module, params, cfg, workdir, opts, log=log)
    if (opts.prompts and not opts.clip_workdir) or opts.upsampler_workdir or opts.tokenizer_dir:
        raise ValueError(f"--prompt, --prompts_file, --tokenizer_dir and --upsampler_workdir need a text (GLIDE) "
                         f"model (or, for --prompt, --clip_workdir); {workdir} holds a {cfg['kind']!r} model")
    classifier = cls_params = cls_cfg = None
    if opts.classifier_workdir:
        classifier, cls_params, cls_cfg = load_for_inference(opts.classifier_workdir)
    elif opts.classifier_scale != 1.0:
        raise ValueError("--classifier_scale given without --classifier_workdir")
    plan = make_plan(cfg, opts, cls_cfg)
    extra = None
    if opts.clip_workdir:  # the prompts are CLIP's captions; the labels stay the model's condition
        clip_guidance.check_prompts(opts.prompts, opts.num_samples)
        clip = clip_guidance.load(opts.clip_workdir, opts.clip_scale, cfg, plan.image_shape)
        plan = dataclasses.replace(plan, clip=clip, prompts=tuple(opts.prompts))
        extra = {"prompts": np.asarray(plan.prompts, np.str_)}  # sample i was guided towards prompts[i % P]
    out = opts.out or os.path.join(workdir, "samples")
    if shards.wanted(opts, plan.image_shape):  # bounded memory, resumable
        return _run_sharded(workdir, cfg, module, params, plan, opts, classifier, cls_params, out, extra, log)
    samples, labels = generate(module, params, plan, opts, classifier, cls_params, log=log)
    if jax.process_index() != 0:
        return None
    return images.write_samples(out, samples, labels if plan.label_mode in ("list", "random") else None,
                                max_grid_images=opts.max_grid_images, extra=extra)


def _run_sharded(workdir, cfg, module, params, plan, opts, classifier, cls_params, out, extra, log):
    """`run`'s U-Net path through `generation.shards`: the same files, written as it goes."""
    settings = dict(dataclasses.asdict(opts), workdir=os.path.abspath(workdir),
                    checkpoint_step=cfg.get("checkpoint_step"), image_shape=list(plan.image_shape))
    labels_of = None
    if plan.label_mode in ("list", "random"):
        labels_of = lambda ids: labels_for(plan, opts.seed, ids)  # noqa: E731
    npz = images.npz_path(out, (opts.num_samples,) + plan.image_shape)
    return shards.sample_to_shards(
        lambda start: stream(module, params, plan, opts, classifier, cls_params, start=start, log=None),
        labels_of, num_samples=opts.num_samples, image_shape=plan.image_shape, npz=npz, settings=settings,
        max_grid_images=opts.max_grid_images, extra=extra, log=log)
