"""Orchestration behind `evaluate.py`: the resumable NLL loop, its report, sample metrics.

The NLL loop keeps, per evaluated example, its total bits/dim, prior and
per-t-quartile term sums, and per timestep the sums of vb / mse / xstart_mse
over examples.  After every batch (on process 0) it rewrites
`<out>.partial.npz`; a rerun with the same settings continues after the last
finished example, a rerun with other settings is refused with the differences.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import numpy as np

from diffusion_jax.evaluation import nll, nll_guidance
from diffusion_jax.runtime import resume

# Settings that do not change the results (beyond float reduction order) and
# may differ between a run and its resumption.
RESUME_FREE = ("batch_size", "t_chunk", "out", "num_processes", "process_id", "coordinator_address")


ResumeError = resume.ResumeError  # where the NLL loop's callers have always found it


class Partial(NamedTuple):
    """Accumulated results: per example `[n]`/`[n, 4]`, per timestep sums `[K]`."""

    index: np.ndarray
    total: np.ndarray
    prior: np.ndarray
    vb_q: np.ndarray
    mse_q: np.ndarray
    xstart_mse_q: np.ndarray
    vb_t: np.ndarray
    mse_t: np.ndarray
    xstart_mse_t: np.ndarray


def empty_partial(num_timesteps: int) -> Partial:
    q = np.zeros((0, nll.NUM_QUARTILES), np.float64)
    zk = np.zeros((num_timesteps,), np.float64)
    return Partial(np.zeros((0,), np.int64), np.zeros((0,)), np.zeros((0,)), q, q, q, zk, zk, zk)


def append(partial: Partial, out: nll.NllBatch, index, valid) -> Partial:
    """Add one batch's valid rows (a new Partial; float64 on the host)."""
    valid = np.asarray(valid, bool)
    rows = lambda a: np.asarray(a, np.float64)[valid]
    cat = lambda old, new: np.concatenate([old, new])
    return Partial(
        index=cat(partial.index, np.asarray(index, np.int64)[valid]),
        total=cat(partial.total, rows(out.total)), prior=cat(partial.prior, rows(out.prior)),
        vb_q=cat(partial.vb_q, rows(out.vb_q)), mse_q=cat(partial.mse_q, rows(out.mse_q)),
        xstart_mse_q=cat(partial.xstart_mse_q, rows(out.xstart_mse_q)),
        vb_t=partial.vb_t + np.asarray(out.vb_t, np.float64),
        mse_t=partial.mse_t + np.asarray(out.mse_t, np.float64),
        xstart_mse_t=partial.xstart_mse_t + np.asarray(out.xstart_mse_t, np.float64))


def settings_differences(stored: dict, current: dict) -> list[str]:
    """Human-readable differences of two settings dicts, ignoring `RESUME_FREE` keys."""
    return resume.settings_differences(stored, current, RESUME_FREE)


def partial_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".partial.npz"


def save_partial(path: str, partial: Partial, settings: dict) -> None:
    """Atomic write (tmp file + rename), so a killed run leaves a readable file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, settings=np.array(json.dumps(settings, sort_keys=True)), **partial._asdict())
    os.replace(tmp, path)


def load_partial(path: str, settings: dict, num_timesteps: int) -> Partial:
    """The saved progress for these settings, or an empty Partial if there is none.

    Raises:
      ResumeError: the file was written with other settings (all differences listed).
    """
    if not os.path.exists(path):
        return empty_partial(num_timesteps)
    with np.load(path) as f:
        resume.check_settings(path, json.loads(str(f["settings"])), settings, RESUME_FREE)
        return Partial(**{k: f[k] for k in Partial._fields})


def run_nll(step: Callable, params, make_batches: Callable[[int], Iterable[dict]], *, mesh, rng,
            num_timesteps: int, settings: dict, start: int, stop: int, batch_size: int,
            partial_file: str | None = None, progress: bool = True) -> Partial:
    """Evaluate examples [start, stop) with a `nll.make_chain_fn` step, resumably.

    Args:
      step: `(params, global batch, rng) -> (NllBatch, index, valid)`.
      make_batches: `resume_start -> iterator` of this process's rows of the
        global batches covering [resume_start, stop) (see
        `data.pipeline.make_eval_iterator`).
      settings: everything that determines the results (checked on resume).
      partial_file: where progress is saved after every batch (None: not saved).

    Returns:
      The accumulated `Partial` over [start, stop).
    """
    partial = (load_partial(partial_file, settings, num_timesteps) if partial_file
               else empty_partial(num_timesteps))
    done = len(partial.index)
    if not np.array_equal(partial.index, np.arange(start, start + done)):
        raise ResumeError(f"{partial_file}: saved examples are not the contiguous range starting at {start}")
    if start + done >= stop:
        return partial
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=stop - start, initial=done, desc=f"NLL ({num_timesteps} steps)", unit="img")
    for local in make_batches(start + done):
        out, index, valid = step(params, nll.global_batch(mesh, local), rng)
        partial = append(partial, out, index, valid)
        if partial_file and jax.process_index() == 0:
            save_partial(partial_file, partial, settings)
        if bar is not None:
            bar.update(int(np.sum(np.asarray(valid))))
            bar.set_postfix(bpd=f"{partial.total.mean():.4f}")
    if bar is not None:
        bar.close()
    return partial


def _quartile_terms(partial: Partial, num_timesteps: int) -> dict:
    """Per term and t-quartile: mean over examples of the sum over t, and the per-(example, t) mean."""
    counts = np.bincount(nll.quartile_of(np.arange(num_timesteps), num_timesteps), minlength=nll.NUM_QUARTILES)
    out = {}
    for name in nll.TERMS:
        sums = getattr(partial, f"{name}_q").mean(axis=0)
        out[name] = {f"q{q}": {"sum": float(sums[q]), "mean": float(sums[q] / max(counts[q], 1))}
                     for q in range(nll.NUM_QUARTILES)}
    return out


def nll_report(partial: Partial, settings: dict, *, start: int, stop: int) -> dict:
    """The JSON report: bits/dim, its standard error, prior, per-quartile breakdown, settings."""
    n = len(partial.total)
    if n == 0:
        raise ValueError("no examples were evaluated (empty index range?)")
    k = partial.vb_t.shape[0]
    total = partial.total
    stderr = float(np.std(total, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "metric": "nll",
        "bits_per_dim": float(total.mean()),
        "bits_per_dim_stderr": stderr,
        "prior_bpd": float(partial.prior.mean()),
        "vb_bpd": float((total - partial.prior).mean()),
        "num_examples": n,
        "index_range": [int(start), int(stop)],
        "num_timesteps": int(k),
        "terms_by_quartile": _quartile_terms(partial, k),
        "settings": settings,
    }


def save_nll_outputs(out: str, report: dict, partial: Partial) -> None:
    """`out` (JSON report) and `<out stem>_terms.npz` (per-t means, per-example totals)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    n = max(len(partial.total), 1)
    np.savez(os.path.splitext(out)[0] + "_terms.npz", index=partial.index, total_bpd=partial.total,
             prior_bpd=partial.prior, vb=partial.vb_t / n, mse=partial.mse_t / n,
             xstart_mse=partial.xstart_mse_t / n)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)


def format_table(report: dict) -> str:
    """A short human-readable summary of a report."""
    if report.get("metric") != "nll":
        rows = [(k, v) for k, v in report.items() if isinstance(v, (int, float))]
        return "\n".join(f"{k:>24s}  {v:.6g}" for k, v in rows)
    lo, hi = report["index_range"]
    lines = [(f"bits/dim  {report['bits_per_dim']:.5f} ± {report['bits_per_dim_stderr']:.5f} (s.e.)  "
              f"over {report['num_examples']} examples [{lo}, {hi})"),
             f"prior     {report['prior_bpd']:.6f}   sum_t vb  {report['vb_bpd']:.5f}",
             f"{'term':>10s} " + " ".join(f"{'q' + str(q) + ' sum':>12s}" for q in range(4))]
    for name, qs in report["terms_by_quartile"].items():
        lines.append(f"{name:>10s} " + " ".join(f"{qs[f'q{q}']['sum']:12.5f}" for q in range(4)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry-point logic
def load_model(workdir: str, ema_rate: float | None = None):
    """(module, params, cfg) of a training workdir or a converted OpenAI directory (cfg filled, see
    `runtime.checkpoints.load_for_inference`)."""
    from diffusion_jax.runtime import checkpoints

    return checkpoints.load_for_inference(workdir, ema_rate)


def _check_image_size(source, image_size: int, channels: int, allow_resize: bool) -> None:
    shape = np.asarray(source[0]["image"]).shape
    hw = tuple(shape[:2])
    if hw != (image_size, image_size) and not allow_resize:
        raise ValueError(
            f"the dataset's images are {hw[0]}x{hw[1]} but the model takes {image_size}x{image_size}: "
            "bits/dim of resized images are not comparable to published numbers. Evaluate on data of the "
            "model's size, or pass --allow_resize to resize (OpenAI's center_crop_arr) anyway.")


def dataset_range(o: dict, cfg: dict):
    """(o with `data` and `stop` filled in, the split's source) for the likelihood metrics: the dataset named
    by --data or the workdir's config, its images checked against the model's size, [start, stop) cut to
    the split and --num_samples, and the batch checked against the device count."""
    from diffusion_jax.data import pipeline

    m = cfg["model"]
    o = dict(o, data=o.get("data") or cfg["data"]["name"])
    if not o["data"]:
        raise ValueError("no dataset: pass --data (the workdir's config names none)")
    source = pipeline.make_source(o["data"], o["split"], data_dir=o.get("data_dir"))
    _check_image_size(source, m["image_size"], m["in_channels"], o["allow_resize"])
    stop = len(source) if o.get("stop") is None else min(o["stop"], len(source))
    if o.get("num_samples"):
        stop = min(stop, o["start"] + o["num_samples"])
    if o["batch_size"] % jax.device_count():
        raise ValueError(f"--batch_size {o['batch_size']} must be a multiple of the {jax.device_count()} devices")
    return dict(o, stop=stop), source


def eval_batches(source, o: dict, model_cfg: dict, *, with_labels: bool) -> Callable[[int], Iterable[dict]]:
    """`resume_start -> iterator` of this process's rows of the global batches covering [resume_start, stop)."""
    from diffusion_jax.data import pipeline

    return lambda resume_start: pipeline.make_eval_iterator(
        source, batch_size=o["batch_size"], image_size=model_cfg["image_size"], channels=model_cfg["in_channels"],
        start=resume_start, stop=o["stop"], with_labels=with_labels)


def nll_settings(cfg: dict, o: dict, schedule) -> dict:
    """Everything that determines the NLL numbers (stored in the report, checked on resume)."""
    d = cfg["diffusion"]
    return {
        "workdir": os.path.abspath(o["workdir"]), "checkpoint_step": cfg.get("checkpoint_step"),
        "ema_rate": cfg.get("ema_rate", o.get("ema_rate")), "data": o["data"], "split": o["split"],
        "seed": o["seed"], "start": o["start"], "stop": o["stop"],
        "noise_schedule": d["noise_schedule"], "diffusion_steps": d["diffusion_steps"],
        "timestep_respacing": o["timestep_respacing"], "num_timesteps": schedule.num_timesteps,
        "rescale_timesteps": d["rescale_timesteps"], "mean_type": d["mean_type"],
        "var_type": d["var_type"], "clip_denoised": o["clip_denoised"], "allow_resize": o["allow_resize"],
        "batch_size": o["batch_size"], "t_chunk": o["t_chunk"],
    }


def check_options(o: dict) -> None:
    """Numeric flags in range and named input files present (ValueError / FileNotFoundError), before any work."""
    for name in ("batch_size", "t_chunk", "num_samples"):
        if o.get(name) is not None and int(o[name]) < 1:
            raise ValueError(f"--{name}={o[name]} must be at least 1")
    if int(o.get("start") or 0) < 0:
        raise ValueError(f"--start={o['start']} must be >= 0")
    if o.get("stop") is not None and int(o["stop"]) <= int(o.get("start") or 0):
        raise ValueError(f"--stop={o['stop']} must be greater than --start={o.get('start') or 0}")
    for name in ("workdir", "samples", "ref", "inception_path"):
        path = o.get(name)
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"--{name}={path}: no such file or directory")


def check_samples(samples: np.ndarray, path: str) -> None:
    """Sample metrics read uint8 NHWC RGB images in [0, 255] (what sample.py writes as arr_0)."""
    if samples.dtype != np.uint8:
        lo, hi = (float(samples.min()), float(samples.max())) if samples.size else (0.0, 0.0)
        raise ValueError(
            f"{path}: arr_0 is {samples.dtype} with values in [{lo:.3g}, {hi:.3g}], but sample metrics need uint8 "
            "images in [0, 255] (sample.py's output); from [-1, 1] floats: ((x + 1) * 127.5).round().clip(0, 255)"
            ".astype(np.uint8)")
    if samples.ndim != 4 or samples.shape[-1] != 3 or samples.shape[0] < 2:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3] (NHWC, RGB, N >= 2), got shape {samples.shape}")


def evaluate_nll(o: dict) -> dict:
    """`evaluate.py --metric=nll`: full-chain bits/dim of a checkpoint on a dataset split."""
    import jax.numpy as jnp

    from diffusion_jax import schedules

    check_options(o)
    module, params, cfg = load_model(o["workdir"], o.get("ema_rate"))
    d, m = cfg["diffusion"], cfg["model"]
    guide = nll_guidance.load_guidance(o, cfg)  # --cfg_scale / --classifier_workdir: the bound of a guided chain
    schedule = schedules.make_schedule(d["noise_schedule"], d["diffusion_steps"], o["timestep_respacing"],
                                       d["rescale_timesteps"])
    o, source = dataset_range(o, cfg)
    nll_guidance.check_labels(guide, source, o["data"], o["split"])
    stop = o["stop"]
    mesh = nll.make_mesh()
    class_cond = m.get("num_classes") is not None
    apply_fn, cond_apply_fn = nll_guidance.apply_fns(module, guide, conditional=class_cond,
                                                     null_index=m["num_classes"] if m.get("null_label") else None)
    step = nll.make_chain_fn(apply_fn, schedule, mesh=mesh, t_chunk=o["t_chunk"],
                             mean_type=d["mean_type"], var_type=d["var_type"], clip_denoised=o["clip_denoised"],
                             class_cond=class_cond, cond_apply_fn=cond_apply_fn)
    settings = dict(nll_settings(cfg, o, schedule), **nll_guidance.settings(guide))

    batches = eval_batches(source, o, m, with_labels=class_cond or guide.classifier is not None)
    params = jax.tree.map(jnp.asarray, (params, guide.classifier_params))  # both replicated
    partial = run_nll(step, params, batches, mesh=mesh, rng=jax.random.key(o["seed"]),
                      num_timesteps=schedule.num_timesteps, settings=settings, start=o["start"], stop=stop,
                      batch_size=o["batch_size"], partial_file=partial_path(o["out"]))
    report = nll_report(partial, settings, start=o["start"], stop=stop)
    if jax.process_index() == 0:
        save_nll_outputs(o["out"], report, partial)
    return report


def evaluate_samples(o: dict) -> dict:
    """`evaluate.py --metric=fid|samples`: IS, FID, sFID, precision/recall of --samples vs --ref."""
    from diffusion_jax.evaluation import inception, metrics

    if not o.get("samples") or not o.get("ref"):
        raise ValueError("sample metrics need --samples=<samples.npz> and --ref=<reference .npz>")
    check_options(o)
    try:
        with np.load(o["samples"], allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise ValueError(f"{o['samples']} has no arr_0 (uint8 NHWC samples, as sample.py writes)")
            samples = f["arr_0"]
    except (OSError, EOFError) as e:  # not an .npz at all
        raise ValueError(f"--samples={o['samples']} is not a readable .npz file ({e})") from e
    check_samples(samples, o["samples"])
    ref = metrics.load_reference(o["ref"])
    module, params = inception.load_inception(o.get("inception_path"))
    features_fn = inception.make_feature_fn(module, params, batch_size=o.get("batch_size") or 100)
    report = {"metric": "samples", **metrics.sample_metrics(features_fn, samples, ref),
              "settings": {"samples": os.path.abspath(o["samples"]), "ref": os.path.abspath(o["ref"])}}
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(o["out"])), exist_ok=True)
        with open(o["out"], "w") as f:
            json.dump(report, f, indent=2)
    return report
