"""Orchestration behind `sample.py`: load a model, validate options, sample sharded, write files.

Sampling goes through `diffusion_jax.generation.engine` (every device of every
host; sample i is a pure function of (seed, i), whatever the device count, the
host count or the batch size) with the loop picked from
`diffusion_jax.generation.samplers` (`--sampler`).  Outputs follow OpenAI's
layout (`generation.images`): `samples_NxHxWxC.npz` with `arr_0` (uint8 NHWC)
and `arr_1` (labels, for class-conditional sampling), plus a PNG grid.
Text (GLIDE) models take `prompts` instead of labels; `diffusion_jax.generation.text`
samples them (caption-guided, optional upsampler stage).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax

from diffusion_jax.convert import kinds
from diffusion_jax.generation import images, inpaint, superres
from diffusion_jax.generation import samplers  # noqa: F401  (scripts read program.samplers)
from diffusion_jax.generation import text as text_program
from diffusion_jax.generation.unet import (  # noqa: F401  (the U-Net path, re-exported for callers)
    Plan, generate, labels_for, make_plan, make_sample_fn)
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
    # Text (GLIDE) models: see diffusion_jax.generation.text.
    prompts: tuple[str, ...] = ()  # cycled over the samples
    tokenizer_dir: str | None = None  # encoder.json + vocab.bpe for converted GLIDE checkpoints
    upsampler_workdir: str | None = None  # a 'glide_upsample' model run on the base samples
    upsample_respacing: str = "fast27"
    upsample_ddim: bool = True
    upsample_temp: float = 0.997  # the upsampler's x_T multiplier (GLIDE's notebook)
    clip_workdir: str | None = None  # a CLIP pair (kind "clip") guiding a text model (generation.clip_guidance)
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
            return workflow.run(module, params, cfg, workdir, opts, load_for_inference, log=log)
    if opts.clip_scale != 1.0 and not opts.clip_workdir:
        raise ValueError("--clip_scale given without --clip_workdir")
    if kinds.takes(cfg["kind"], "tokens"):
        return text_program.run_text(module, params, cfg, workdir, opts, log=log)
    if opts.clip_workdir:
        raise ValueError(f"--clip_workdir guides text (GLIDE) models; {workdir} holds a {cfg['kind']!r} model")
    if opts.prompts or opts.upsampler_workdir or opts.tokenizer_dir:
        raise ValueError(f"--prompt, --prompts_file, --tokenizer_dir and --upsampler_workdir need a text (GLIDE) "
                         f"model; {workdir} holds a {cfg['kind']!r} model")
    classifier = cls_params = cls_cfg = None
    if opts.classifier_workdir:
        classifier, cls_params, cls_cfg = load_for_inference(opts.classifier_workdir)
    elif opts.classifier_scale != 1.0:
        raise ValueError("--classifier_scale given without --classifier_workdir")
    plan = make_plan(cfg, opts, cls_cfg)
    samples, labels = generate(module, params, plan, opts, classifier, cls_params, log=log)
    if jax.process_index() != 0:
        return None
    out = opts.out or os.path.join(workdir, "samples")
    return images.write_samples(out, samples, labels if plan.label_mode in ("list", "random") else None,
                                max_grid_images=opts.max_grid_images)
