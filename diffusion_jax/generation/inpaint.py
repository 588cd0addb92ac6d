"""`sample.py --inpaint_image=IMG --inpaint_mask=MASK --prompt ...` for GLIDE inpainting models.

GLIDE's recipe (glide-text2im `notebooks/inpaint.ipynb`):

* the network receives `image * mask` and `mask` as extra input channels
  (`models.glide.InpaintText2ImUNet`), with caption classifier-free guidance
  (`--cfg_scale`) as for text-to-image;
* after every step the known region of the x0 prediction is replaced by the
  given pixels (`inpainting.known_region_fn` as the loop's `denoised_fn`;
  x_t itself is not touched), so the output keeps them exactly;
* the upsampler stage (`--upsampler_workdir`, a `glide_upsample_inpaint`
  model) gets the base samples on the 8-bit grid as `low_res`, the image
  re-read at its own size, and the base mask enlarged by nearest neighbour;
  it runs unguided, ancestral (`p_sample_loop`, as the notebook; not DDIM) on
  `--upsample_respacing` from x_T x `--upsample_temp`.

Files (`RESIZE_RULE`): images are PNG/JPEG (converted to the model's
grayscale or RGB) or `.npz` (`arr_0` uint8 `[H, W, C]` or `[N, H, W, C]`);
masks are PNG (grayscale, every pixel 0 or 255) or `.npz` (`arr_0` `[H, W]`,
`[H, W, 1]`, `[N, H, W]` or `[N, H, W, 1]`, values 0/1, or uint8 0/255).
1 (white) keeps the given pixel, 0 (black) is generated. Image and mask must
have the same height and width; a batch of N images and/or masks pairs up
(the other side has 1 or N), and sample i uses pair i mod N (prompts cycle
independently, sample i gets prompt i mod P).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np

from diffusion_jax import inpainting, sampling
from diffusion_jax.generation import engine, images, samplers
from diffusion_jax.generation import text as text_program
from diffusion_jax.convert import kinds
from diffusion_jax.runtime import text_conditioning as tc

RESIZE_RULE = ("images are resized to the model's size with PIL's bicubic filter (GLIDE's read_image), masks with "
               "nearest neighbour (pixel i takes source pixel floor(i * H / size)); the upsampler stage re-reads "
               "the image at its own size and enlarges the base model's mask by nearest neighbour")
INPAINT_STAGE = 0  # key stages: base 0, upsampler 2 (as text-to-image cascades)
UPSAMPLE_STAGE = 2


# ----------------------------------------------------------------------------- files
def read_image_file(path: str, channels: int) -> np.ndarray:
    """uint8 `[N, H, W, C]` from a PNG/JPEG (N = 1; converted to grayscale or RGB) or an `.npz` (`arr_0`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--inpaint_image={path}: no such file")
    if path.endswith(".npz"):
        raw = _npz_array(path, "--inpaint_image")
        x = raw[None] if raw.ndim == 3 else raw
        if x.ndim != 4 or x.shape[-1] != channels or x.dtype != np.uint8:
            raise ValueError(f"--inpaint_image={path}: arr_0 is {raw.dtype} {tuple(raw.shape)}, but the model takes "
                             f"uint8 [H, W, {channels}] or [N, H, W, {channels}] images; write uint8 pixels with "
                             f"{channels} channel(s)")
        return x
    from PIL import Image

    with Image.open(path) as im:
        x = np.asarray(im.convert("L" if channels == 1 else "RGB"), np.uint8)
    return x.reshape((1,) + x.shape[:2] + (channels,))


def read_mask_file(path: str) -> np.ndarray:
    """float32 `[N, H, W, 1]` of 0/1 from a PNG (0 or 255 per pixel) or an `.npz` (`arr_0`, 0/1 or uint8 0/255)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--inpaint_mask={path}: no such file")
    if path.endswith(".npz"):
        m = _npz_array(path, "--inpaint_mask")
        m = m[None] if m.ndim == 2 or (m.ndim == 3 and m.shape[-1] == 1) else m
        m = m[..., None] if m.ndim == 3 else m
        if m.ndim != 4 or m.shape[-1] != 1:
            raise ValueError(f"--inpaint_mask={path}: arr_0 has shape {tuple(m.shape)}; expected [H, W], [H, W, 1], "
                             "[N, H, W] or [N, H, W, 1]")
    else:
        from PIL import Image

        with Image.open(path) as im:
            m = np.asarray(im.convert("L"))[None, ..., None]
    values = np.unique(m)
    if np.all(np.isin(values, (0, 1))):
        return m.astype(np.float32)
    if m.dtype == np.uint8 and np.all(np.isin(values, (0, 255))):
        return (m // 255).astype(np.float32)
    raise ValueError(f"--inpaint_mask={path} is not binary: it holds values {values[:8].tolist()}"
                     f"{' ...' if len(values) > 8 else ''}; a mask has only 0 (black, generate) and 255 "
                     "(white, keep) pixels (npz: 0 and 1); threshold it, e.g. (mask > 127) * 255")


def _npz_array(path: str, flag: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as f:
        if "arr_0" not in f:
            raise ValueError(f"{flag}={path} has no arr_0 (it holds {sorted(f.files)})")
        return f["arr_0"]


def pair_up(image: np.ndarray, mask: np.ndarray, image_path: str, mask_path: str):
    """Broadcast image `[Ni, H, W, C]` and mask `[Nm, H, W, 1]` to N = max(Ni, Nm) pairs.

    Raises:
      ValueError: different heights/widths, or batch sizes that are neither 1 nor N.
    """
    if image.shape[1:3] != mask.shape[1:3]:
        raise ValueError(f"--inpaint_mask={mask_path} is {mask.shape[1]}x{mask.shape[2]} but --inpaint_image="
                         f"{image_path} is {image.shape[1]}x{image.shape[2]}; give a mask of the image's size")
    n = max(image.shape[0], mask.shape[0])
    if {image.shape[0], mask.shape[0]} - {1, n}:
        raise ValueError(f"--inpaint_image={image_path} holds {image.shape[0]} images and --inpaint_mask={mask_path} "
                         f"{mask.shape[0]} masks; give one of each, one image with N masks, N images with one "
                         "mask, or N of both")
    return (np.broadcast_to(image, (n,) + image.shape[1:]), np.broadcast_to(mask, (n,) + mask.shape[1:]))


def resize_nearest(x: np.ndarray, size: int) -> np.ndarray:
    """`[N, H, W, C]` -> `[N, size, size, C]`, output pixel i = input pixel floor(i * H / size)
    (PyTorch's `F.interpolate(mode="nearest")`; an exact k-fold repeat when size = k * H)."""
    rows = (np.arange(size) * x.shape[1]) // size
    cols = (np.arange(size) * x.shape[2]) // size
    return x[:, rows][:, :, cols]


def resize_bicubic(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[N, H, W, C]` -> uint8 `[N, size, size, C]` with PIL's bicubic filter, per channel."""
    from PIL import Image

    if x.shape[1:3] == (size, size):
        return np.array(x)
    out = [[np.asarray(Image.fromarray(img[..., c]).resize((size, size), Image.BICUBIC)) for c in range(x.shape[-1])]
           for img in x]
    return np.stack([np.stack(planes, -1) for planes in out])


def load_inputs(image_path: str, mask_path: str, size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 `[N, size, size, C]` in [-1, 1], mask float32 `[N, size, size, 1]` of 0/1), `RESIZE_RULE`."""
    image, mask = pair_up(read_image_file(image_path, channels), read_mask_file(mask_path), image_path, mask_path)
    image = resize_bicubic(np.asarray(image), size).astype(np.float32) / 127.5 - 1.0
    return image, resize_nearest(np.asarray(mask), size)


# ----------------------------------------------------------------------------- plans and sampling
# One inpainting stage's validated settings: a text stage's (`low_res`: the upsample-inpaint stage).
InpaintPlan = text_program.TextPlan


def make_plan(cfg: dict, opts, tokenizer, *, upsampler: bool = False) -> InpaintPlan:
    """Check sample.py's options against a GLIDE inpainting model's config.

    Raises:
      ValueError: a model of another kind, no prompts, class-label options, a bad respacing.
    """
    want = "glide_upsample_inpaint" if upsampler else "glide_inpaint"
    if not kinds.denoiser_taking(cfg["kind"], *kinds.get(want).inputs):
        flag = "--upsampler_workdir" if upsampler else "--workdir"
        raise ValueError(f"inpainting needs a {want!r} model as {flag}; it holds {cfg['kind']!r}")
    if not opts.prompts:
        raise ValueError("this is a text-conditional model: pass --prompt=\"...\" (repeatable) or --prompts_file")
    if opts.labels is not None or opts.classifier_workdir:
        raise ValueError("--labels and --classifier_workdir apply to class-conditional models, not text models")
    m, diff = cfg["model"], cfg["diffusion"]
    if upsampler:
        respacing, what = opts.upsample_respacing, "--upsample_respacing"
        sampler, cfg_scale, scale = samplers.choose("ancestral"), None, opts.upsample_temp
    else:
        respacing = opts.timestep_respacing
        what, cfg_scale, scale = "--timestep_respacing", opts.cfg_scale, 1.0
        sampler = samplers.choose(opts.sampler, use_ddim=opts.use_ddim, eta=opts.eta, clip_denoised=opts.clip_denoised,
                                  sampler_options=opts.sampler_options)
    schedule = samplers.plan_schedule(diff, respacing, what)
    c = (m["in_channels"] - 1) // (3 if upsampler else 2)
    return InpaintPlan(schedule, diff["mean_type"], diff["var_type"], (m["image_size"], m["image_size"], c),
                       tuple(opts.prompts), int(m["text_ctx"]), tokenizer, cfg_scale, sampler,
                       noise_scale=scale, low_res=upsampler)


def make_sample_fn(module, plan: InpaintPlan, progress: bool = False) -> Callable:
    """The engine's function: `fn(params, rng, sample_ids [B], cond) -> x [B, H, W, C]` in [-1, 1].

    `cond` = {"tokens" [B, L], "mask" [B, L], "inpaint_image" [B, H, W, C] in [-1, 1],
    "inpaint_mask" [B, H, W, 1]} (+ "low_res" [B, h, w, C] for the upsampler stage).
    """
    loop = samplers.make_loop(plan.sampler)
    null = tc.null_caption(plan.tokenizer, plan.text_ctx)

    def fn(params, rng, sample_ids, cond):
        img, msk = cond["inpaint_image"], cond["inpaint_mask"]
        fixed = {"inpaint_image": img * msk, "inpaint_mask": msk}
        if plan.low_res:
            fixed["low_res"] = cond["low_res"]
        model_fn, y = tc.text_model_fn(module, params, cond["tokens"], cond["mask"], null=null,
                                       cfg_scale=plan.cfg_scale, **fixed)
        shape = (sample_ids.shape[0],) + plan.image_shape
        x_T = None
        if plan.noise_scale != 1.0:
            x_T = sampling.initial_noise(sampling.sample_keys(rng, sample_ids), shape) * plan.noise_scale
        return loop(rng, model_fn, plan.schedule, shape, mean_type=plan.mean_type, var_type=plan.var_type, y=y,
                    sample_ids=sample_ids, x_T=x_T, progress=progress,
                    denoised_fn=inpainting.known_region_fn(img, msk))

    return fn


def conditioning(plan: InpaintPlan, image: np.ndarray, mask: np.ndarray, low_res: np.ndarray | None = None):
    """`ids [B] -> cond` for the engine: prompt i mod P, image/mask pair i mod N, low_res (uint8) row i."""
    def cond(ids):
        captions = np.asarray(plan.prompts)[ids % len(plan.prompts)]
        out = tc.caption_batch(plan.tokenizer, captions, plan.text_ctx)
        out["inpaint_image"], out["inpaint_mask"] = image[ids % len(image)], mask[ids % len(mask)]
        if plan.low_res:
            out["low_res"] = np.asarray(low_res[ids], np.float32) / 127.5 - 1.0
        return out

    return cond


def applies(cfg: dict, opts, workdir: str) -> bool:
    """Whether `sample.py` runs this workflow (an inpainting model, or --inpaint_image/--inpaint_mask).

    Raises:
      ValueError: inpainting flags on a model that does not inpaint.
    """
    flagged = bool(opts.inpaint_image or opts.inpaint_mask)
    inpaints = kinds.takes(cfg["kind"], "inpaint")
    if flagged and not inpaints:
        raise ValueError(f"--inpaint_image/--inpaint_mask need a GLIDE inpainting model ('glide_inpaint', e.g. "
                         f"python train.py --config=configs/glide_digits_inpaint.py, or GLIDE's converted "
                         f"base-inpaint); {workdir} holds a {cfg['kind']!r} model")
    return flagged or inpaints


def run(module, params, cfg: dict, workdir: str, opts, load: Callable, log: Callable[[str], None] = print):
    """Inpaint (+ optional upsample-inpaint stage); writes on process 0; returns (npz, png) paths there.

    `load(workdir) -> (module, params, cfg)` reads the upsampler.
    """
    if not (opts.inpaint_image and opts.inpaint_mask):
        raise ValueError(f"{workdir} holds a {cfg['kind']!r} model: pass both --inpaint_image and --inpaint_mask")
    plan = make_plan(cfg, opts, text_program.load_tokenizer(cfg, opts.tokenizer_dir))
    image, mask = load_inputs(opts.inpaint_image, opts.inpaint_mask, plan.image_shape[0], plan.image_shape[2])
    rng = jax.random.key(opts.seed)
    samples = engine.generate(make_sample_fn(module, plan, opts.progress), opts.num_samples,
                              batch_size=opts.batch_size, rng=jax.random.fold_in(rng, INPAINT_STAGE), args=params,
                              conditioning=conditioning(plan, image, mask), log=log, desc="inpaint ").images
    base = None
    if opts.upsampler_workdir:
        up, up_params, up_cfg = load(opts.upsampler_workdir)
        up_plan = make_plan(up_cfg, opts, text_program.load_tokenizer(up_cfg, opts.tokenizer_dir), upsampler=True)
        size = up_plan.image_shape[0]
        if up_plan.image_shape[2] != plan.image_shape[2] or size % plan.image_shape[0]:
            raise ValueError(f"the upsampler makes {up_plan.image_shape} images but the base model samples "
                             f"{plan.image_shape}; pair models of matching channels and sizes")
        up_image, _ = load_inputs(opts.inpaint_image, opts.inpaint_mask, size, plan.image_shape[2])
        base, samples = samples, engine.generate(
            make_sample_fn(up, up_plan, opts.progress), opts.num_samples, batch_size=opts.batch_size,
            rng=jax.random.fold_in(rng, UPSAMPLE_STAGE), args=up_params,
            conditioning=conditioning(up_plan, up_image, resize_nearest(mask, size), samples), log=log,
            desc="upsample ").images
    if jax.process_index() != 0:
        return None
    out = opts.out or os.path.join(workdir, "samples")
    extra = {"prompts": np.asarray(plan.prompts, np.str_)}
    index = (np.arange(opts.num_samples) % len(plan.prompts)).astype(np.int32)
    if base is not None:
        folder = os.path.dirname(out) if out.endswith(".npz") else out
        images.write_samples(os.path.join(folder, "base"), base, index, max_grid_images=opts.max_grid_images,
                             extra=extra)
    return images.write_samples(out, samples, index, max_grid_images=opts.max_grid_images, extra=extra)
