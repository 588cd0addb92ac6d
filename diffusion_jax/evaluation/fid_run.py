"""`evaluate.py --metric=fid --workdir=...`: sample and score in one pass, streaming, sharded, resumable.

The U-Net samples through `generation.unet.stream` (sample.py's engine and
options: sample i is a function of (seed, i)); each batch goes from the
sampler into Inception on the devices, and only the features are gathered to
the hosts, where `evaluation.streaming` adds them to float64 running sums in
sample order (host memory O(batch), not O(N)).  Process 0 saves the sums
with the settings to `<out stem>.partial.npz` every `--save_every` batches;
a rerun with the same settings continues after the last saved sample (and
gives the same numbers as an uninterrupted run), a rerun with other settings
is refused with the differences.  Every host must see that file (a shared
filesystem), as for the NLL loop.

Metrics (`--metrics`): fid, is, and sfid.  By default fid and is, plus sfid
when N >= 2023 (the spatial feature dimension: fewer samples give a singular
covariance) and the reference has spatial statistics or images; naming sfid
with fewer samples is an error.  Precision/recall need every feature at once
and are not computed here (sample.py, then `evaluate.py --samples`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.evaluation import metrics, run, streaming
from diffusion_jax.generation import engine

POOL_DIM, SPATIAL_DIM, NUM_LOGITS = 2048, 2023, 1008  # Inception's pool_3, mixed_6/conv[:7], fc
METRICS = ("fid", "sfid", "is")
# Settings that do not change the sums beyond float reduction order.
RESUME_FREE = run.RESUME_FREE + ("save_every", "ref", "metric")


def choose_metrics(requested, num_samples: int, ref: dict, spatial_dim: int = SPATIAL_DIM) -> tuple[str, ...]:
    """The metrics to stream (see the module docstring).

    Raises:
      ValueError: an unknown name, sfid asked for with fewer than
        `spatial_dim` samples, or a reference without what a metric needs.
    """
    if requested:
        names = tuple(dict.fromkeys(str(m).strip().lower() for m in requested))
        bad = [m for m in names if m not in METRICS]
        if bad:
            raise ValueError(f"--metrics: unknown {bad}; choose from {list(METRICS)} (precision/recall need "
                             "every feature at once: sample.py, then evaluate.py --samples)")
        if "sfid" in names and num_samples < spatial_dim:
            raise ValueError(f"--metrics names sfid but --num_samples={num_samples} is smaller than the "
                             f"{spatial_dim}-dimensional spatial features (singular covariance); pass "
                             f"--num_samples >= {spatial_dim} or leave sfid out")
    else:
        has_spatial = "stats_s" in ref or "images" in ref
        names = ("fid", "is") + (("sfid",) if num_samples >= spatial_dim and has_spatial else ())
    for name, key in (("fid", "stats"), ("sfid", "stats_s")):
        if name in names and key not in ref and "images" not in ref:
            mu = "mu" if name == "fid" else "mu_s"
            raise ValueError(f"--ref has neither {mu}/{mu.replace('mu', 'sigma')} statistics nor arr_0 images, "
                             f"which {name} needs")
    return names


def inception_features(module) -> Callable:
    """`(params, images uint8 [B, H, W, C]) -> (pool, spatial, logits)`; grayscale is repeated to RGB."""
    def fn(params, images):
        if images.shape[-1] == 1:  # PIL's convert("RGB") of an "L" image
            images = jnp.repeat(images, 3, axis=-1)
        return tuple(module.apply({"params": params}, images))

    return fn


def array_batches(images: np.ndarray, batch_size: int, mesh, start: int = 0) -> Iterator[engine.Batch]:
    """Rows start.. of a host array (the same on every host) as `engine.Batch`es on the mesh, the last padded."""
    from diffusion_jax.runtime import parallel

    b = engine.round_up_batch(batch_size, mesh)
    for first in range(start, len(images), b):
        chunk = np.asarray(images[first:first + b])
        count = len(chunk)
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - count, 0)]) if count < b else chunk
        yield engine.Batch(first, count, parallel.put_global(mesh, chunk, parallel.batch_spec(mesh)))


def reference_stats(ref: dict, names, features_fn, params, *, batch_size: int, mesh) -> dict:
    """{"fid": Stats, "sfid": Stats} of the reference: its stored statistics, else its images' features."""
    need = [n for n in names if n in ("fid", "sfid")]
    stored = {"fid": ref.get("stats"), "sfid": ref.get("stats_s")}
    if all(stored[n] is not None for n in need):
        return {n: stored[n] for n in need}
    images = ref["images"]
    sums = streaming.empty(len(images), pool_dim=POOL_DIM, spatial_dim=SPATIAL_DIM, num_logits=0)
    sums = streaming.accumulate(array_batches(images, batch_size, mesh), features_fn, params, sums, mesh=mesh)
    computed = {"fid": streaming.stats(sums.pool_sum, sums.pool_outer, sums.count),
                "sfid": streaming.stats(sums.spatial_sum, sums.spatial_outer, sums.count)}
    return {n: stored[n] if stored[n] is not None else computed[n] for n in need}


def report_of(sums: streaming.Sums, names, ref_stats: dict) -> dict:
    """FID / sFID / IS from the sums (and the reference statistics)."""
    out = {"num_samples": int(sums.count)}
    if "is" in names:
        out["inception_score"] = streaming.inception_score(sums)
    if "fid" in names:
        out["fid"] = metrics.frechet_distance(ref_stats["fid"], streaming.stats(sums.pool_sum, sums.pool_outer,
                                                                               sums.count))
    if "sfid" in names:
        out["sfid"] = metrics.frechet_distance(ref_stats["sfid"], streaming.stats(
            sums.spatial_sum, sums.spatial_outer, sums.count))
    return out


def run_streaming(batches, features_fn, params, *, num_samples: int, names, settings: dict, mesh,
                  partial_file: str | None, save_every: int = 1, dims=(POOL_DIM, SPATIAL_DIM, NUM_LOGITS),
                  split_size: int = streaming.SPLIT_SIZE, progress: bool = True) -> streaming.Sums:
    """Stream `batches(start)` (engine batches from sample `start`) into resumable sums.

    Args:
      batches: `start -> iterable of engine.Batch` covering samples start..N-1.
      features_fn, params: see `streaming.accumulate`.
      names: the metrics (`choose_metrics`); the others' sums stay empty.
      settings: what determines the samples and features (checked on resume).
      partial_file: saved by process 0 every `save_every` batches and at the
        end (None: not saved).
      dims: (pool, spatial, logits) feature sizes.
    """
    pool, spatial, logits = dims
    sums = streaming.empty(num_samples, pool_dim=pool if "fid" in names else 0,
                           spatial_dim=spatial if "sfid" in names else 0,
                           num_logits=logits if "is" in names else 0, split_size=split_size)
    if partial_file:
        sums = streaming.load(partial_file, settings, sums, RESUME_FREE)
    done = int(sums.count)
    if done >= num_samples:
        return sums
    writer = jax.process_index() == 0 and partial_file
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=num_samples, initial=done, desc="sample + Inception", unit="img")
    seen = [0]

    def on_batch(s):
        seen[0] += 1
        if writer and (seen[0] % max(1, save_every) == 0 or int(s.count) == num_samples):
            streaming.save(partial_file, s, settings)
        if bar is not None:
            bar.update(int(s.count) - bar.n)

    sums = streaming.accumulate(batches(done), features_fn, params, sums, mesh=mesh, split_size=split_size,
                                on_batch=on_batch)
    if bar is not None:
        bar.close()
    return sums


def fid_settings(cfg: dict, o: dict, names, inception_path: str) -> dict:
    """Everything that determines the streamed sums (stored in the report, checked on resume)."""
    from diffusion_jax.generation import sampling_flags

    keep = {k: o.get(k) for k in sampling_flags.NAMES}
    return dict(keep, metric="fid", workdir=os.path.abspath(o["workdir"]), checkpoint_step=cfg.get("checkpoint_step"),
                ema_rate=cfg.get("ema_rate", o.get("ema_rate")), num_samples=int(o["num_samples"]),
                metrics=sorted(names), inception_path=os.path.abspath(inception_path),
                split_size=streaming.SPLIT_SIZE, ref=os.path.abspath(o["ref"]),
                classifier_workdir=o.get("classifier_workdir") and os.path.abspath(o["classifier_workdir"]))


def evaluate_fid(o: dict) -> dict:
    """`evaluate.py --metric=fid --workdir=W --num_samples=N --ref=R --inception_path=P [sampling flags]`."""
    import dataclasses

    from diffusion_jax.evaluation import inception
    from diffusion_jax.generation import program, unet
    from diffusion_jax.runtime import checkpoints, parallel

    if not o.get("num_samples") or not o.get("ref"):
        raise ValueError("--metric=fid --workdir samples and scores: it needs --num_samples=N (>= 2) and "
                         "--ref=<reference .npz>")
    if int(o["num_samples"]) < 2:
        raise ValueError(f"--num_samples={o['num_samples']} must be at least 2 (a covariance)")
    run.check_options(o)
    if not o.get("inception_path"):
        inception.load_inception(None)  # raises FileNotFoundError naming where to get the weights
    ref = metrics.load_reference(o["ref"])
    names = choose_metrics(o.get("metrics"), int(o["num_samples"]), ref)
    module, params, cfg = checkpoints.load_for_inference(o["workdir"], ema_rate=o.get("ema_rate"))
    fields = {f.name for f in dataclasses.fields(program.SampleOptions)}
    opts = program.SampleOptions(**{k: v for k, v in o.items() if k in fields and k != "out"}, progress=False)
    classifier = cls_params = cls_cfg = None
    if opts.classifier_workdir:
        classifier, cls_params, cls_cfg = checkpoints.load_for_inference(opts.classifier_workdir)
    elif opts.classifier_scale != 1.0:
        raise ValueError("--classifier_scale given without --classifier_workdir")
    plan = unet.make_plan(cfg, opts, cls_cfg)
    inc_module, inc_params = inception.load_inception(o["inception_path"])
    settings = fid_settings(cfg, o, names, o["inception_path"])
    mesh = parallel.make_mesh()
    features_fn = inception_features(inc_module)

    def batches(start):
        return unet.stream(module, params, plan, opts, classifier, cls_params, start=start, log=None)

    sums = run_streaming(batches, features_fn, inc_params, num_samples=opts.num_samples, names=names,
                         settings=settings, mesh=mesh, partial_file=run.partial_path(o["out"]),
                         save_every=int(o.get("save_every") or 1))
    ref_stats = reference_stats(ref, names, features_fn, inc_params, batch_size=opts.batch_size, mesh=mesh)
    report = {"metric": "fid", **report_of(sums, names, ref_stats), "settings": settings}
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(o["out"])), exist_ok=True)
        with open(o["out"], "w") as f:
            json.dump(report, f, indent=2)
    return report
