"""Super-resolution sampling for ADM `super_res` models: from a samples file, or as a cascade.

* `sample.py --workdir=SR --base_samples=FILE.npz` upsamples OpenAI-format
  samples (`arr_0` uint8 `[N, h, w, C]`; labels from `arr_1` when the model is
  class-conditional), as guided-diffusion's `super_res_sample.py`: the uint8
  images become `low_res = x / 127.5 - 1`, the network sees x_t beside their
  bilinear upsampling, and the chosen sampler runs unguided on the model's
  schedule.
* `sample.py --workdir=BASE --upsampler_workdir=SR` samples the base model
  (`generation.program`, every option of a plain run) and feeds its uint8
  samples and labels to the same upsampling stage.

The stage draws sample i's noise from `fold_in(fold_in(key(seed), 2), i)`, so
a cascade and `--base_samples` on the cascade's base file give the same
images. Outputs: OpenAI's `samples_NxHxWxC.npz` (+ `arr_1` labels when there
are any), its grid, and `pairs.png` (each low-res input, enlarged by nearest
neighbour, beside its upsampled sample); a cascade also writes the base
samples to `<out>/base/`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import numpy as np

from diffusion_jax import schedules
from diffusion_jax.convert import kinds
from diffusion_jax.generation import engine, images, samplers, unet

SR_STAGE = 2  # the key stage of every upsampling pass (base samples: stage 0)


@dataclasses.dataclass(frozen=True)
class SRPlan:
    """Validated settings of one super-resolution stage."""

    schedule: schedules.Schedule
    mean_type: str
    var_type: str
    image_shape: tuple[int, int, int]  # (H, W, C) of the output
    low_res_shape: tuple[int, int, int]  # (h, w, C) the model was trained on
    class_conditional: bool
    sampler: samplers.Choice


def low_res_size(cfg: dict) -> int:
    """The low-resolution side a super_res model takes.

    A training workdir stores it as `super_res.small_size`; a converted
    guided-diffusion checkpoint as the `--small_size` of its conversion flags
    (guided-diffusion's default 64 when absent).
    """
    if "super_res" in cfg:
        return int(cfg["super_res"]["small_size"])
    from diffusion_jax.convert import openai_flags

    flags = cfg.get("source", {}).get("flags") or ""
    return int(openai_flags.parse_flag_string(flags).get("small_size", 64)) if flags else 64


def make_sr_plan(cfg: dict, opts, what: str) -> SRPlan:
    """Check sample.py's options against a super_res model's config.

    Raises:
      ValueError: not a super_res model (`what` names the flag that pointed at
        it), options that do not apply (guidance, prompts), or a bad respacing.
    """
    if not kinds.denoiser_taking(cfg["kind"], "labels", "low_res"):
        raise ValueError(f"{what} must hold a 'super_res' model (python train.py --config=configs/digits_sr.py, "
                         f"or a converted guided-diffusion upsampler); it holds {cfg['kind']!r}")
    if opts.cfg_scale is not None or opts.classifier_workdir or opts.prompts:
        raise ValueError("--cfg_scale, --classifier_workdir and --prompt do not apply to the super-resolution "
                         "stage (it is sampled unguided, as guided-diffusion's super_res_sample.py)")
    m, diff = cfg["model"], cfg["diffusion"]
    schedule = samplers.plan_schedule(diff, opts.timestep_respacing)
    c, small = m["in_channels"] // 2, low_res_size(cfg)
    sampler = samplers.choose(opts.sampler, use_ddim=opts.use_ddim, eta=opts.eta, clip_denoised=opts.clip_denoised,
                              sampler_options=opts.sampler_options)
    return SRPlan(schedule, diff["mean_type"], diff["var_type"], (m["image_size"], m["image_size"], c),
                  (small, small, c), m["num_classes"] is not None, sampler)


def load_base_samples(path: str, plan: SRPlan) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 images `[N, h, w, C]`, int32 labels `[N]` or None) from an OpenAI-format samples file.

    Raises:
      FileNotFoundError / ValueError: naming the file, the shapes found and expected, and the fix.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--base_samples={path}: no such file")
    with np.load(path, allow_pickle=False) as f:
        if "arr_0" not in f:
            raise ValueError(f"--base_samples={path} has no arr_0 (it holds {sorted(f.files)}); expected OpenAI's "
                             "sample layout: arr_0 uint8 [N, H, W, C], arr_1 labels [N]")
        x, labels = f["arr_0"], (f["arr_1"] if "arr_1" in f else None)
    h, w, c = plan.low_res_shape
    if x.ndim != 4 or x.shape[1:] != (h, w, c):
        raise ValueError(
            f"--base_samples={path} holds images of shape {tuple(x.shape)}, but this upsampler takes "
            f"[N, {h}, {w}, {c}] (it makes {plan.image_shape[0]}x{plan.image_shape[1]} images from "
            f"{h}x{w}, {c}-channel inputs); sample the base model at {h}x{w} with {c} channels, or use an "
            "upsampler trained for this size")
    if x.dtype != np.uint8:
        raise ValueError(f"--base_samples={path}: arr_0 is {x.dtype}, expected uint8 pixels in [0, 255] "
                         "(OpenAI's sample files)")
    if plan.class_conditional and labels is None:
        raise ValueError(f"--base_samples={path} has no arr_1 labels but the upsampler is class-conditional; "
                         "write the base samples with labels (sample.py does for class-conditional models)")
    if labels is not None and labels.shape != (x.shape[0],):
        raise ValueError(f"--base_samples={path}: arr_1 has shape {labels.shape}, expected [N={x.shape[0]}]")
    return x, (np.asarray(labels, np.int32) if plan.class_conditional else None)


def make_sr_sample_fn(module, plan: SRPlan, progress: bool = False) -> Callable:
    """The engine's function: `fn(params, rng, sample_ids [B], cond) -> x [B, H, W, C]` in [-1, 1].

    `cond = {"low_res": float32 [B, h, w, C] in [-1, 1], "y": int32 [B]}` ("y" only for
    class-conditional models); the network is `module.apply(p, x, t, low_res, y)`
    (OpenAI's `SuperResModel(x, t, low_res=..., y=...)`).
    """
    loop = samplers.make_loop(plan.sampler)

    def fn(params, rng, sample_ids, cond):
        low_res = cond["low_res"]

        def model_fn(x, t, y):
            return module.apply({"params": params}, x, t, low_res, y)

        shape = (sample_ids.shape[0],) + plan.image_shape
        return loop(rng, model_fn, plan.schedule, shape, mean_type=plan.mean_type, var_type=plan.var_type,
                    y=cond.get("y"), sample_ids=sample_ids, progress=progress)

    return fn


def upsample(module, params, plan: SRPlan, low_res: np.ndarray, labels: np.ndarray | None, opts,
             log: Callable[[str], None] | None = print) -> np.ndarray:
    """uint8 `[N, H, W, C]` upsampled from uint8 `[N, h, w, C]` (labels `[N]` for class-conditional models)."""
    cond = {"low_res": np.asarray(low_res, np.float32) / 127.5 - 1.0}
    if plan.class_conditional:
        cond["y"] = np.asarray(labels, np.int32)
    out = engine.generate(make_sr_sample_fn(module, plan, opts.progress), low_res.shape[0],
                          batch_size=opts.batch_size, rng=jax.random.fold_in(jax.random.key(opts.seed), SR_STAGE),
                          args=params, conditioning=cond, log=log, desc="upsample ")
    return out.images


def pairs_grid(low_res: np.ndarray, high_res: np.ndarray, max_pairs: int = 64) -> np.ndarray:
    """uint8 grid: each low-res input (nearest-enlarged to the output size) beside its upsampled sample."""
    n = min(max_pairs, low_res.shape[0])
    f = high_res.shape[1] // low_res.shape[1]
    big = np.repeat(np.repeat(low_res[:n], f, axis=1), f, axis=2)
    pairs = np.stack([big, high_res[:n]], axis=1).reshape((2 * n,) + high_res.shape[1:])
    return images.image_grid(pairs, nrow=2 * min(n, 8))


def applies(cfg: dict, opts, workdir: str) -> bool:
    """Whether `sample.py` runs this workflow: a super_res --workdir, --base_samples, or a U-Net cascade."""
    cascade = bool(opts.upsampler_workdir) and kinds.denoiser_taking(cfg["kind"], "labels")
    return kinds.denoiser_taking(cfg["kind"], "labels", "low_res") or bool(opts.base_samples) or cascade


def run(module, params, cfg: dict, workdir: str, opts, load: Callable, log: Callable[[str], None] = print):
    """`--base_samples` on a super_res model, or `--upsampler_workdir` on a base U-Net; writes on process 0.

    `load(workdir) -> (module, params, cfg)` reads the upsampler of a cascade.
    """
    base = labels = None
    if kinds.denoiser_taking(cfg["kind"], "labels", "low_res"):
        if not opts.base_samples:
            raise ValueError(f"{workdir} holds a super-resolution model: pass --base_samples=FILE.npz (uint8 "
                             "low-res samples), or pass a base model as --workdir and this one as --upsampler_workdir")
        if opts.upsampler_workdir:
            raise ValueError("--upsampler_workdir takes the base model as --workdir, not a super_res model")
        if opts.labels is not None:
            raise ValueError("--labels does not apply with --base_samples: each image's label is read from the "
                             f"file's arr_1 ({opts.base_samples}); drop --labels, or write the labels you want "
                             "into arr_1")
        sr, sr_params, plan = module, params, make_sr_plan(cfg, opts, "--workdir")
        low_res, labels = load_base_samples(opts.base_samples, plan)
    else:
        if opts.base_samples:
            raise ValueError(f"--base_samples needs a 'super_res' model as --workdir; {workdir} holds {cfg['kind']!r}")
        sr, sr_params, sr_cfg = load(opts.upsampler_workdir)
        # Guidance options belong to the base stage; the upsampler runs unguided.
        plan = make_sr_plan(sr_cfg, dataclasses.replace(opts, cfg_scale=None, classifier_workdir=None),
                            "--upsampler_workdir")
        base_opts = dataclasses.replace(opts, upsampler_workdir=None)
        clf = clf_params = clf_cfg = None
        if opts.classifier_workdir:
            clf, clf_params, clf_cfg = load(opts.classifier_workdir)
        base_plan = unet.make_plan(cfg, base_opts, clf_cfg)
        if base_plan.image_shape != plan.low_res_shape:
            raise ValueError(f"the base model samples {base_plan.image_shape} images but the upsampler takes "
                             f"{plan.low_res_shape}; pair models of matching sizes")
        low_res, labels = unet.generate(module, params, base_plan, base_opts, clf, clf_params, log=log)
        base = low_res
        if plan.class_conditional and labels is None:
            raise ValueError("the upsampler is class-conditional but the base samples have no labels; "
                             "use a class-conditional base model")
    high = upsample(sr, sr_params, plan, low_res, labels, opts, log=log)
    if jax.process_index() != 0:
        return None
    out = opts.out or os.path.join(workdir, "samples")
    folder = os.path.dirname(out) if out.endswith(".npz") else out
    if base is not None:
        images.write_samples(os.path.join(folder, "base"), base, labels, max_grid_images=opts.max_grid_images)
    images.write_png(os.path.join(folder, "pairs.png"), pairs_grid(low_res, high))
    return images.write_samples(out, high, labels,
                                max_grid_images=opts.max_grid_images)
