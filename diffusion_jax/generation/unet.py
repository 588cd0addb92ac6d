"""Sampling an ADM U-Net (kind 'unet'): options checked against the model config, labels, the sample loop.

`make_plan` validates `sample.py`'s options (`program.SampleOptions`) against the
model's (and an optional noisy classifier's) filled config; `generate` samples
through `generation.engine` with classifier-free guidance (`--cfg_scale`, Ho &
Salimans 2022, eq. 6) and/or classifier guidance (`--classifier_workdir`,
Dhariwal & Nichol 2021, algorithm 1) and/or CLIP guidance (`--clip_workdir`,
`generation.clip_guidance`: `plan.clip`, the prompts captions for CLIP only).
`generation.superres` reuses both for the base stage of a cascade.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import guidance, schedules
from diffusion_jax.convert import kinds
from diffusion_jax.generation import clip_guidance, engine, samplers


@dataclasses.dataclass(frozen=True)
class Plan:
    """Validated sampling settings derived from the options and the configs."""

    schedule: schedules.Schedule
    mean_type: str
    var_type: str
    image_shape: tuple[int, int, int]  # (H, W, C)
    label_mode: str  # "none" | "list" | "random" | "null"
    label_values: tuple[int, ...]
    num_classes: int | None  # range of user labels
    model_conditional: bool
    null_index: int | None  # the model's null-label row, if it has one
    sampler: samplers.Choice = samplers.Choice("ancestral", True)
    clip: clip_guidance.ClipGuide | None = None  # CLIP guidance towards prompts[i % P] (program.run sets it)
    prompts: tuple[str, ...] = ()  # the CLIP's captions, cycled over the samples


# ----------------------------------------------------------------------------- validation
def _parse_label_spec(spec: str | None) -> tuple[str, tuple[int, ...]]:
    if spec is None or spec.strip() == "":
        return "default", ()
    spec = spec.strip()
    if spec in ("random", "null"):
        return spec, ()
    try:
        values = tuple(int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--labels={spec!r}: expected a comma list of class indices, 'random' or 'null'") from None
    return "list", values


def _check_classifier(model_cfg: dict, cls_cfg: dict, num_classes: int | None) -> int:
    if kinds.get(cls_cfg["kind"]).role != "classifier":
        raise ValueError(f"--classifier_workdir holds a {cls_cfg['kind']!r} model, not a classifier")
    cm = cls_cfg["model"]
    if cm["image_size"] != model_cfg["image_size"] or cm["in_channels"] != model_cfg["in_channels"]:
        raise ValueError(
            f"the classifier takes {cm['image_size']}px images with {cm['in_channels']} channels but the model "
            f"samples {model_cfg['image_size']}px with {model_cfg['in_channels']}")
    if num_classes is not None and cm["out_channels"] != num_classes:
        raise ValueError(
            f"the classifier has {cm['out_channels']} classes but the model is conditioned on {num_classes}")
    return int(cm["out_channels"])


def _label_mode(opts, conditional: bool, has_null: bool, guided_by_classifier: bool):
    mode, values = _parse_label_spec(opts.labels)
    needs = conditional or guided_by_classifier
    if mode == "default":
        mode = "random" if needs else "none"
    if not needs and mode != "none":
        raise ValueError(f"--labels={opts.labels!r} given but the model is unconditional and no classifier is used")
    if mode == "null":
        if not has_null:
            raise ValueError("--labels=null needs a class-conditional model trained with a null label (null_label)")
        if guided_by_classifier or opts.cfg_scale is not None:
            raise ValueError("--labels=null cannot be combined with --cfg_scale or classifier guidance")
    return mode, values


def make_plan(model_cfg_all: dict, opts, classifier_cfg: dict | None = None) -> Plan:
    """Check every option against the model (and classifier) config; fail loudly.

    Raises:
      ValueError: labels out of range or given to an unconditional model,
        cfg_scale on a model without a null label, a classifier that does not
        fit the model, an impossible respacing, or bad counts.
    """
    kind, model_cfg, diff = model_cfg_all["kind"], model_cfg_all["model"], model_cfg_all["diffusion"]
    if not kinds.denoiser_taking(kind, "labels"):  # the ADM U-Net
        raise ValueError(f"sample.py samples 'unet' models; this checkpoint is a {kind!r} model")
    if opts.num_samples < 1 or opts.batch_size < 1:
        raise ValueError(f"--num_samples and --batch_size must be >= 1 (got {opts.num_samples}, {opts.batch_size})")
    name = opts.sampler
    if name is None and not opts.use_ddim and (model_cfg_all.get("distill") or {}).get("teacher_workdir"):
        name = "ddim"  # a distilled student (training/distill.py) learned deterministic DDIM steps on its grid
    sampler = samplers.choose(name, use_ddim=opts.use_ddim, eta=opts.eta, clip_denoised=opts.clip_denoised,
                              sampler_options=opts.sampler_options)
    num_classes = model_cfg["num_classes"]
    conditional = num_classes is not None
    has_null = conditional and bool(model_cfg["null_label"])
    if opts.cfg_scale is not None and not has_null:
        raise ValueError(
            "--cfg_scale needs a class-conditional model trained with a null label (model config null_label=True); "
            f"this model has num_classes={num_classes}, null_label={model_cfg['null_label']}")
    if classifier_cfg is not None:
        num_classes = _check_classifier(model_cfg, classifier_cfg, num_classes)
    mode, values = _label_mode(opts, conditional, has_null, classifier_cfg is not None)
    bad = [v for v in values if not 0 <= v < (num_classes or 0)]
    if bad:
        raise ValueError(f"--labels {bad} out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    schedule = samplers.plan_schedule(diff, opts.timestep_respacing)
    size = model_cfg["image_size"]
    return Plan(schedule, diff["mean_type"], diff["var_type"], (size, size, model_cfg["in_channels"]),
                mode, values, num_classes, conditional, num_classes if has_null else None, sampler)


def labels_for(plan: Plan, seed: int, sample_ids: np.ndarray) -> np.ndarray | None:
    """int32 labels of the given global sample indices (None when sampling unconditionally).

    "random" labels are `randint(fold_in(fold_in(key(seed), 1), i))`, a function of (seed, i).
    """
    ids = np.asarray(sample_ids)
    if plan.label_mode == "none":
        return None
    if plan.label_mode == "null":
        return np.full(ids.shape, plan.null_index, np.int32)
    if plan.label_mode == "list":
        return np.asarray(plan.label_values, np.int32)[ids % len(plan.label_values)]
    label_rng = jax.random.fold_in(jax.random.key(seed), 1)
    draw = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(label_rng, i), (), 0, plan.num_classes))
    return np.asarray(draw(jnp.asarray(ids, jnp.uint32)), np.int32)


# ----------------------------------------------------------------------------- sampling
def guided_fns(module, classifier, args, *, conditional: bool, cfg_scale: float | None, null_index: int | None,
               classifier_scale: float):
    """(model_fn, cond_fn) of the chain `sample.py` samples, also the chain whose bound
    `evaluate.py --metric=nll` computes with the same guidance flags.

    Args:
      module, classifier: the U-Net and the noisy classifier (None: no classifier guidance).
      args: (params, classifier params).
      conditional: the U-Net takes labels.
      cfg_scale: classifier-free guidance scale (None: none); `null_index` is the null-label row.
      classifier_scale: the classifier guidance scale.

    Returns:
      `model_fn(x, timesteps, y)` (CFG applied) and `cond_fn(x, timesteps, y)` (None without a classifier).
    """
    params, cls_params = args

    def model_fn(x, t, y):
        return module.apply({"params": params}, x, t, y if conditional else None)

    if cfg_scale is not None:
        model_fn = guidance.classifier_free(model_fn, cfg_scale, null_label=null_index)
    cond_fn = None
    if classifier is not None:
        cond_fn = guidance.classifier_cond_fn(
            lambda x, t: classifier.apply({"params": cls_params}, x, t), classifier_scale)
    return model_fn, cond_fn


def make_sample_fn(module, plan: Plan, opts, classifier=None) -> Callable:
    """The engine's per-batch function for a U-Net (and optional noisy classifier).

    Returns:
      `fn((params, classifier_params[, (clip_params, prompt_tokens)]), rng, sample_ids [B], labels [B] | None)
      -> x [B, H, W, C]` in [-1, 1]: the chosen sampler with classifier-free guidance
      (`--cfg_scale`) and/or the mean shifted by classifier and/or CLIP guidance gradients.
    """
    loop = samplers.make_loop(plan.sampler)

    def fn(args, rng, sample_ids, labels):
        model_fn, cond_fn = guided_fns(module, classifier, args[:2], conditional=plan.model_conditional,
                                       cfg_scale=opts.cfg_scale, null_index=plan.null_index,
                                       classifier_scale=opts.classifier_scale)
        if plan.clip is not None:
            cond_fn = clip_guidance.add_cond_fn(cond_fn, clip_guidance.cycled_cond_fn(plan.clip, args[2], sample_ids))
        shape = (sample_ids.shape[0],) + plan.image_shape
        return loop(rng, model_fn, plan.schedule, shape, mean_type=plan.mean_type, var_type=plan.var_type,
                    cond_fn=cond_fn, y=labels, sample_ids=sample_ids, progress=opts.progress)

    return fn


def _engine_inputs(module, params, plan: Plan, opts, classifier, classifier_params) -> dict:
    """The `engine.generate` / `engine.stream` arguments of a U-Net: sample i keyed by
    `fold_in(fold_in(key(seed), 0), i)`, labelled `labels_for(plan, seed, i)`."""
    labels = None if plan.label_mode == "none" else (lambda ids: labels_for(plan, opts.seed, ids))
    return dict(sample_fn=make_sample_fn(module, plan, opts, classifier), num_samples=opts.num_samples,
                batch_size=opts.batch_size, rng=jax.random.fold_in(jax.random.key(opts.seed), 0),
                args=(params, classifier_params) + clip_guidance.engine_args(plan.clip, plan.prompts),
                conditioning=labels)


def generate(module, params, plan: Plan, opts, classifier=None, classifier_params=None,
             log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray | None]:
    """Sample `opts.num_samples` images through `engine.generate` (every device of every host).

    Sample i uses the key `fold_in(fold_in(key(seed), 0), i)` and the label
    `labels_for(plan, seed, i)`.

    Returns:
      (uint8 `[N, H, W, C]`, int32 labels `[N]` or None), the same on every host.
    """
    out = engine.generate(**_engine_inputs(module, params, plan, opts, classifier, classifier_params), log=log)
    return out.images, out.conditioning


def stream(module, params, plan: Plan, opts, classifier=None, classifier_params=None, *, start: int = 0,
           mesh=None, log: Callable[[str], None] | None = print) -> Iterator[engine.Batch]:
    """`generate`'s samples `start .. opts.num_samples - 1` as `engine.Batch`es left on the devices
    (the same images for the same ids); labels of a batch: `labels_for(plan, opts.seed, ids)`."""
    return engine.stream(**_engine_inputs(module, params, plan, opts, classifier, classifier_params),
                         start=start, mesh=mesh, log=log)
