"""`sample.py --prompt ...` for GLIDE text models: caption-guided sampling, optional upsampling.

Sample i gets prompt `prompts[i % len(prompts)]`; its noise is a function of
(seed, i) only, as for class-conditional sampling (`sample_lib`). Each batch's
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import sampling, schedules, text
from diffusion_jax.runtime import text_conditioning as tc


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
    use_ddim: bool
    eta: float
    noise_scale: float = 1.0  # x_T multiplier (GLIDE's upsampler: 0.997)
    low_res: bool = False  # an upsampler: takes the previous stage's images


def load_tokenizer(cfg: dict, tokenizer_dir: str | None):
    """The tokenizer of a text model: GLIDE's BPE from `tokenizer_dir`, else the training config's.

    Raises:
      FileNotFoundError: a converted GLIDE checkpoint without `--tokenizer_dir`, or a
        directory lacking encoder.json / vocab.bpe (the message names the files and their source).
    """
    if tokenizer_dir:
        encoder_json, vocab_bpe = tc.tokenizer_files(tokenizer_dir)
        tokenizer = tc.make_tokenizer("glide", encoder_json=encoder_json, vocab_bpe=vocab_bpe)
    elif "text" in cfg:
        tokenizer = tc.tokenizer_from_config(cfg)
    else:
        raise FileNotFoundError(
            "this GLIDE checkpoint stores no tokenizer settings (a converted OpenAI checkpoint): pass "
            "--tokenizer_dir=DIR with GLIDE's tokenizer files encoder.json and vocab.bpe (or .gz copies). "
            + text._WHERE)
    tc.check_tokenizer_fits(tokenizer, int(cfg["model"].get("n_vocab", 50257)))
    return tokenizer


def _schedule(diff: dict, respacing: str, what: str) -> schedules.Schedule:
    try:
        return schedules.make_schedule(diff["noise_schedule"], diff["diffusion_steps"], respacing,
                                       rescale_timesteps=diff.get("rescale_timesteps", False))
    except ValueError as e:
        raise ValueError(f"{what}={respacing!r} for a {diff['diffusion_steps']}-step model: {e}") from None


def _image_shape(cfg: dict, low_res: bool) -> tuple[int, int, int]:
    m = cfg["model"]
    channels = m.get("in_channels", 3) // (2 if low_res else 1)
    if cfg["kind"] in ("glide_inpaint", "glide_upsample_inpaint"):
        raise ValueError(f"sample.py does not sample {cfg['kind']!r} (inpainting) models")
    return m["image_size"], m["image_size"], channels


def make_text_plan(cfg: dict, opts, tokenizer) -> TextPlan:
    """Check sample.py's options against a base GLIDE model's config.

    Raises:
      ValueError: no prompts, class labels or classifier guidance given, an
        upsampler passed as the base model, or an impossible respacing.
    """
    if cfg["kind"] != "glide":
        hint = " (pass it as --upsampler_workdir)" if cfg["kind"] == "glide_upsample" else ""
        raise ValueError(f"the base model must be a 'glide' text model; this is {cfg['kind']!r}{hint}")
    if not opts.prompts:
        raise ValueError("this is a text-conditional model: pass --prompt=\"...\" (repeatable) or --prompts_file")
    if opts.labels is not None or opts.classifier_workdir:
        raise ValueError("--labels and --classifier_workdir apply to class-conditional models, not text models")
    if opts.num_samples < 1 or opts.batch_size < 1:
        raise ValueError(f"--num_samples and --batch_size must be >= 1 (got {opts.num_samples}, {opts.batch_size})")
    if opts.eta != 0.0 and not opts.use_ddim:
        raise ValueError(f"--eta={opts.eta} only applies to DDIM: add --use_ddim")
    diff = cfg["diffusion"]
    respacing = diff.get("timestep_respacing", "") if opts.timestep_respacing is None else opts.timestep_respacing
    return TextPlan(_schedule(diff, respacing, "--timestep_respacing"), diff["mean_type"], diff["var_type"],
                    _image_shape(cfg, False), tuple(opts.prompts), int(cfg["model"]["text_ctx"]), tokenizer,
                    opts.cfg_scale, opts.use_ddim, opts.eta)


def make_upsample_plan(cfg: dict, opts, tokenizer, base_shape: tuple[int, int, int]) -> TextPlan:
    """The upsampler stage's plan (GLIDE: DDIM on "fast27", noise x 0.997, no guidance)."""
    if cfg["kind"] != "glide_upsample":
        raise ValueError(f"--upsampler_workdir must hold a 'glide_upsample' model; it holds {cfg['kind']!r}")
    shape = _image_shape(cfg, True)
    if shape[2] != base_shape[2] or shape[0] != base_shape[0] * tc.LOW_RES_FACTOR:
        raise ValueError(f"the upsampler makes {shape} images from {shape[0] // tc.LOW_RES_FACTOR} px, "
                         f"{shape[2]}-channel inputs (it was trained on 1/{tc.LOW_RES_FACTOR} size) but the base "
                         f"model samples {base_shape}")
    return TextPlan(_schedule(cfg["diffusion"], opts.upsample_respacing, "--upsample_respacing"),
                    cfg["diffusion"]["mean_type"], cfg["diffusion"]["var_type"], shape, tuple(opts.prompts),
                    int(cfg["model"]["text_ctx"]), tokenizer, None, opts.upsample_ddim, 0.0,
                    noise_scale=opts.upsample_temp, low_res=True)


def prompt_index(plan: TextPlan, sample_ids: np.ndarray) -> np.ndarray:
    """int32 index into `plan.prompts` of each global sample index (prompts cycle)."""
    return (np.asarray(sample_ids) % len(plan.prompts)).astype(np.int32)


def make_text_sample_fn(module, plan: TextPlan, progress: bool) -> Callable:
    """`fn(params, rng, sample_ids [B], tokens [B, L], mask [B, L], low_res) -> float32 [B, H, W, C]`."""
    null = tc.null_caption(plan.tokenizer, plan.text_ctx)

    def fn(params, rng, sample_ids, tokens, mask, low_res):
        fixed = {"low_res": low_res} if plan.low_res else {}
        model_fn, y = tc.text_model_fn(module, params, tokens, mask, null=null, cfg_scale=plan.cfg_scale, **fixed)
        shape = (sample_ids.shape[0],) + plan.image_shape
        x_T = None
        if plan.noise_scale != 1.0:
            x_T = sampling.initial_noise(sampling.sample_keys(rng, sample_ids), shape) * plan.noise_scale
        kw = {"mean_type": plan.mean_type, "var_type": plan.var_type, "y": y, "sample_ids": sample_ids,
              "x_T": x_T, "progress": progress}
        if plan.use_ddim:
            return sampling.ddim_sample_loop(rng, model_fn, plan.schedule, shape, eta=plan.eta, **kw)
        return sampling.p_sample_loop(rng, model_fn, plan.schedule, shape, **kw)

    return fn


def generate_text(module, params, plan: TextPlan, opts, *, stage: int = 0, low_res: np.ndarray | None = None,
                  log: Callable[[str], None] = print) -> np.ndarray:
    """`opts.num_samples` uint8 images `[N, H, W, C]`, sharded over every device (same on every host).

    `low_res`: uint8 `[N, h, w, C]` previous-stage images (upsamplers); `stage` picks the key
    (`fold_in(key(seed), stage)`), so the stages draw independent noise.
    """
    from diffusion_jax.generation import program as sample_lib

    mesh = sample_lib.make_mesh()
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    n_dev = jax.device_count()
    global_batch = -(-opts.batch_size // n_dev) * n_dev
    num_batches = -(-opts.num_samples // global_batch)
    fn = jax.jit(make_text_sample_fn(module, plan, opts.progress), in_shardings=(repl, repl, data, data, data, data),
                 out_shardings=data)
    params = jax.device_put(params, repl)
    rng = jax.device_put(jax.random.fold_in(jax.random.key(opts.seed), stage), repl)
    start, stop = sample_lib._local_range(data, global_batch)
    n = opts.num_samples
    images = []
    for b in range(num_batches):
        ids = np.arange(b * global_batch + start, b * global_batch + stop, dtype=np.int32)
        captions = np.asarray(plan.prompts)[prompt_index(plan, ids)]
        cond = tc.caption_batch(plan.tokenizer, captions, plan.text_ctx)
        put = lambda a: jax.make_array_from_process_local_data(data, a, (global_batch,) + a.shape[1:])
        lr = None
        if plan.low_res:
            lr = put(np.asarray(low_res[np.minimum(ids, n - 1)], np.float32) / 127.5 - 1.0)  # 8-bit grid
        out = fn(params, rng, put(ids), put(cond["tokens"]), put(cond["mask"]), lr)
        images.append(sample_lib._gather(sample_lib.to_uint8(out)))
        log(f"{'upsample ' if plan.low_res else ''}batch {b + 1}/{num_batches}: "
            f"{min((b + 1) * global_batch, n)} samples")
    return np.concatenate(images)[:n]


def run_text(module, params, cfg: dict, workdir: str, opts, log: Callable[[str], None] = print):
    """Base stage (+ optional upsampler) for a GLIDE model; writes files on process 0."""
    from diffusion_jax.generation import program as sample_lib

    plan = make_text_plan(cfg, opts, load_tokenizer(cfg, opts.tokenizer_dir))
    images = generate_text(module, params, plan, opts, log=log)
    base = None
    if opts.upsampler_workdir:
        up_module, up_params, up_cfg = sample_lib.load_for_inference(opts.upsampler_workdir)
        up_plan = make_upsample_plan(up_cfg, opts, load_tokenizer(up_cfg, opts.tokenizer_dir), plan.image_shape)
        base, images = images, generate_text(up_module, up_params, up_plan, opts, stage=2, low_res=images, log=log)
    if jax.process_index() != 0:
        return None
    out = opts.out or os.path.join(workdir, "samples")
    extra = {"prompts": np.asarray(plan.prompts, np.str_)}
    index = prompt_index(plan, np.arange(opts.num_samples))
    if base is not None:
        base_dir = os.path.join(os.path.dirname(out) if out.endswith(".npz") else out, "base")
        sample_lib.write_outputs(base, index, base_dir, opts.max_grid_images, extra=extra)
    return sample_lib.write_outputs(images, index, out, opts.max_grid_images, extra=extra)
