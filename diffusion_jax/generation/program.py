"""Orchestration behind `sample.py`: load a model, validate options, sample sharded, write files.

The batch is sharded over every device of every host with `jax.jit` over a 1-D
('data',) mesh.  Each host feeds only its own slice of the sample index range;
sample i is a pure function of (seed, i) (see `diffusion_jax.sampling`), so the
output does not depend on the device count, the host count or the batch size.
Outputs follow OpenAI's layout: `samples_NxHxWxC.npz` with `arr_0` (uint8 NHWC)
and `arr_1` (labels, for class-conditional sampling), plus a PNG grid.
Text (GLIDE) models take `prompts` instead of labels; `diffusion_jax.generation.text`
samples them (caption-guided, optional upsampler stage).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import convert, guidance, sampling, schedules


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Command-line options of sample.py (DESIGN §5)."""

    num_samples: int = 16
    batch_size: int = 16
    timestep_respacing: str | None = None  # None: the checkpoint's own respacing.
    use_ddim: bool = False
    eta: float = 0.0
    clip_denoised: bool = True
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


# ----------------------------------------------------------------------------- loading
def load_for_inference(workdir: str, ema_rate: float | None = None):
    """(module, params, cfg) for a training workdir or a converted OpenAI directory.

    Uses `diffusion_jax.runtime.checkpoints.load_for_inference` when that module exists;
    otherwise reads a converted directory (`convert.load_converted`).
    """
    if importlib.util.find_spec("diffusion_jax.runtime.checkpoints") is not None:
        from diffusion_jax.runtime import checkpoints

        if hasattr(checkpoints, "load_for_inference"):
            return checkpoints.load_for_inference(workdir, ema_rate=ema_rate)
    if not (os.path.isfile(os.path.join(workdir, "config.json"))
            and os.path.isfile(os.path.join(workdir, "params.safetensors"))):
        raise FileNotFoundError(
            f"{workdir} is not a converted checkpoint directory (config.json + params.safetensors)")
    if ema_rate is not None:
        raise ValueError(f"--ema_rate={ema_rate}: {workdir} is a converted checkpoint, it holds a single set of params")
    return convert.load_converted(workdir)


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
    if cls_cfg.get("kind") != "classifier":
        raise ValueError(f"--classifier_workdir holds a {cls_cfg.get('kind')!r} model, not a classifier")
    cm = cls_cfg["model"]
    if cm["image_size"] != model_cfg["image_size"] or cm.get("in_channels", 3) != model_cfg.get("in_channels", 3):
        raise ValueError(
            f"the classifier takes {cm['image_size']}px images with {cm.get('in_channels', 3)} channels but the model "
            f"samples {model_cfg['image_size']}px with {model_cfg.get('in_channels', 3)}")
    if num_classes is not None and cm["out_channels"] != num_classes:
        raise ValueError(
            f"the classifier has {cm['out_channels']} classes but the model is conditioned on {num_classes}")
    return int(cm["out_channels"])


def _label_mode(opts: SampleOptions, conditional: bool, has_null: bool, guided_by_classifier: bool):
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


def make_plan(model_cfg_all: dict, opts: SampleOptions, classifier_cfg: dict | None = None) -> Plan:
    """Check every option against the model (and classifier) config; fail loudly.

    Raises:
      ValueError: labels out of range or given to an unconditional model,
        cfg_scale on a model without a null label, a classifier that does not
        fit the model, an impossible respacing, or bad counts.
    """
    kind, model_cfg, diff = model_cfg_all["kind"], model_cfg_all["model"], model_cfg_all["diffusion"]
    if kind != "unet":
        raise ValueError(f"sample.py samples 'unet' models; this checkpoint is a {kind!r} model")
    if opts.num_samples < 1 or opts.batch_size < 1:
        raise ValueError(f"--num_samples and --batch_size must be >= 1 (got {opts.num_samples}, {opts.batch_size})")
    if opts.eta != 0.0 and not opts.use_ddim:
        raise ValueError(f"--eta={opts.eta} only applies to DDIM: add --use_ddim")
    if opts.eta < 0:
        raise ValueError(f"--eta must be >= 0, got {opts.eta}")
    num_classes = model_cfg.get("num_classes")
    conditional = num_classes is not None
    has_null = conditional and bool(model_cfg.get("null_label", False))
    if opts.cfg_scale is not None and not has_null:
        raise ValueError(
            "--cfg_scale needs a class-conditional model trained with a null label (model config null_label=True); "
            f"this model has num_classes={num_classes}, null_label={model_cfg.get('null_label', False)}")
    if classifier_cfg is not None:
        num_classes = _check_classifier(model_cfg, classifier_cfg, num_classes)
    mode, values = _label_mode(opts, conditional, has_null, classifier_cfg is not None)
    bad = [v for v in values if not 0 <= v < (num_classes or 0)]
    if bad:
        raise ValueError(f"--labels {bad} out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    respacing = diff.get("timestep_respacing", "") if opts.timestep_respacing is None else opts.timestep_respacing
    try:
        schedule = schedules.make_schedule(diff["noise_schedule"], diff["diffusion_steps"], respacing,
                                           rescale_timesteps=diff.get("rescale_timesteps", False))
    except ValueError as e:
        raise ValueError(f"--timestep_respacing={respacing!r} for a {diff['diffusion_steps']}-step model: {e}") from None
    size = model_cfg["image_size"]
    return Plan(schedule, diff["mean_type"], diff["var_type"], (size, size, model_cfg.get("in_channels", 3)),
                mode, values, num_classes, conditional, num_classes if has_null else None)


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


# ----------------------------------------------------------------------------- compiled sampler
def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 with ((x + 1) * 127.5).round().clip(0, 255)."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def make_sample_fn(module, plan: Plan, opts: SampleOptions, classifier=None) -> Callable:
    """`fn(params, classifier_params, rng, sample_ids [B], labels [B] | None) -> uint8 [B, H, W, C]`."""

    def fn(params, cls_params, rng, sample_ids, labels):
        def model_fn(x, t, y):
            return module.apply({"params": params}, x, t, y if plan.model_conditional else None)

        if opts.cfg_scale is not None:
            model_fn = guidance.classifier_free(model_fn, opts.cfg_scale, null_label=plan.null_index)
        cond_fn = None
        if classifier is not None:
            cond_fn = guidance.classifier_cond_fn(
                lambda x, t: classifier.apply({"params": cls_params}, x, t), opts.classifier_scale)
        shape = (sample_ids.shape[0],) + plan.image_shape
        kw = {"mean_type": plan.mean_type, "var_type": plan.var_type, "clip_denoised": opts.clip_denoised,
                  "cond_fn": cond_fn, "y": labels, "sample_ids": sample_ids, "progress": opts.progress}
        if opts.use_ddim:
            x = sampling.ddim_sample_loop(rng, model_fn, plan.schedule, shape, eta=opts.eta, **kw)
        else:
            x = sampling.p_sample_loop(rng, model_fn, plan.schedule, shape, **kw)
        return to_uint8(x)

    return fn


def make_mesh() -> jax.sharding.Mesh:
    # Auto axes: under Explicit axes an nn.Embed gather on a sharded batch raises.
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _local_range(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """[start, stop) of the batch rows this process's devices hold."""
    idx = sharding.addressable_devices_indices_map((global_batch,)).values()
    starts = [s[0].start or 0 for s in idx]
    stops = [global_batch if s[0].stop is None else s[0].stop for s in idx]
    return min(starts), max(stops)


def _gather(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def generate(module, params, plan: Plan, opts: SampleOptions, classifier=None, classifier_params=None,
             log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray | None]:
    """Sample `opts.num_samples` images, sharded over every device.

    Returns:
      (uint8 `[N, H, W, C]`, int32 labels `[N]` or None), the same on every host.
    """
    mesh = make_mesh()
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    n_dev = jax.device_count()
    global_batch = -(-opts.batch_size // n_dev) * n_dev  # a multiple of the device count
    if global_batch != opts.batch_size:
        log(f"batch_size {opts.batch_size} rounded up to {global_batch} ({n_dev} devices)")
    num_batches = -(-opts.num_samples // global_batch)
    fn = jax.jit(make_sample_fn(module, plan, opts, classifier),
                 in_shardings=(repl, repl, repl, data, data), out_shardings=data)
    params = jax.device_put(params, repl)
    classifier_params = None if classifier_params is None else jax.device_put(classifier_params, repl)
    rng = jax.device_put(jax.random.fold_in(jax.random.key(opts.seed), 0), repl)
    start, stop = _local_range(data, global_batch)
    images, labels = [], []
    for b in range(num_batches):
        local_ids = np.arange(b * global_batch + start, b * global_batch + stop, dtype=np.int32)
        local_labels = labels_for(plan, opts.seed, local_ids)
        put = lambda a: None if a is None else jax.make_array_from_process_local_data(data, a, (global_batch,))
        out = fn(params, classifier_params, rng, put(local_ids), put(local_labels))
        images.append(_gather(out))
        if local_labels is not None:
            labels.append(labels_for(plan, opts.seed, np.arange(b * global_batch, (b + 1) * global_batch)))
        log(f"batch {b + 1}/{num_batches}: {min((b + 1) * global_batch, opts.num_samples)} samples")
    n = opts.num_samples
    return np.concatenate(images)[:n], (np.concatenate(labels)[:n] if labels else None)


# ----------------------------------------------------------------------------- files
def image_grid(images: np.ndarray, max_images: int = 256) -> np.ndarray:
    """uint8 `[N, H, W, C]` -> one `[rows*H, cols*W, C]` grid of the first max_images."""
    images = images[:max_images]
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def write_outputs(images: np.ndarray, labels: np.ndarray | None, out: str, max_grid_images: int = 256,
                  extra: dict | None = None):
    """Write OpenAI's `samples_NxHxWxC.npz` (plus `extra` arrays) and a PNG grid; return their paths."""
    from PIL import Image

    shape_str = "x".join(str(d) for d in images.shape)
    if out.endswith(".npz"):
        npz_path = out
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    else:
        os.makedirs(out, exist_ok=True)
        npz_path = os.path.join(out, f"samples_{shape_str}.npz")
    arrays: dict[str, Any] = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels
    arrays.update(extra or {})
    np.savez(npz_path, **arrays)
    png_path = npz_path[: -len(".npz")] + ".png"
    grid = image_grid(images, max_grid_images)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(png_path)
    return npz_path, png_path


def run(workdir: str, opts: SampleOptions, log: Callable[[str], None] = print) -> tuple[str, str] | None:
    """Load, validate, sample and (on process 0) write; returns (npz_path, png_path) there."""
    module, params, cfg = load_for_inference(workdir, ema_rate=opts.ema_rate)
    if cfg["kind"].startswith("glide"):
        from diffusion_jax.generation import text as sample_text

        return sample_text.run_text(module, params, cfg, workdir, opts, log=log)
    if opts.prompts or opts.upsampler_workdir or opts.tokenizer_dir:
        raise ValueError(f"--prompt, --prompts_file, --tokenizer_dir and --upsampler_workdir need a text (GLIDE) "
                         f"model; {workdir} holds a {cfg['kind']!r} model")
    classifier = cls_params = cls_cfg = None
    if opts.classifier_workdir:
        classifier, cls_params, cls_cfg = load_for_inference(opts.classifier_workdir)
    elif opts.classifier_scale != 1.0:
        raise ValueError("--classifier_scale given without --classifier_workdir")
    plan = make_plan(cfg, opts, cls_cfg)
    images, labels = generate(module, params, plan, opts, classifier, cls_params, log=log)
    if jax.process_index() != 0:
        return None
    out = opts.out or os.path.join(workdir, "samples")
    return write_outputs(images, labels if plan.label_mode in ("list", "random") else None, out,
                         opts.max_grid_images)
