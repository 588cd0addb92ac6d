"""Quality vs sampling steps on digits: FDD and clean-classifier accuracy per (model, sampler, steps).

For every model workdir, sampler and step count K, draws N class-conditional
samples (labels cycling 0..9, no guidance: the plain conditional model) on
the chain respaced to K steps, and measures

  - FDD, the Fréchet digits distance (`digits_eval`): Fréchet distance in
    the 64-d penultimate features of a clean CNN trained on the digits train
    split, against the feature statistics of the whole train split (1437
    images; the test split's FDD to the same reference is the real-data floor);
  - acc, how often that classifier recognises the requested class;
  - s/1k, wall seconds of the compiled loop per 1000 samples (compile excluded).

Cells are appended to <out>/cells.jsonl as they finish; a rerun skips cells
already there (same model, sampler, steps, N, spacing), so the table can be
filled in several sittings.  Train the models first (equal budgets):

  python train.py                                                    # L_hybrid -> runs/digits
  python train.py --workdir=runs/steps_table/simple --config.diffusion.var_type=fixed_large \\
      --config.diffusion.loss_type=mse --config.model.out_channels=1
  python train.py --workdir=runs/steps_table/v --config.diffusion.mean_type=v \\
      --config.diffusion.var_type=fixed_large --config.diffusion.loss_type=mse --config.model.out_channels=1
  python scripts/digits_steps_table.py --steps 10,25,50,100,250            # 1000 samples per cell
  python scripts/digits_steps_table.py --steps 1000 --samplers ancestral

(The README's table: `--models NAME=runs/steps_table/m1000/NAME`, each run's step-1000 checkpoint copied
there; ~70 min on two idle cores, ~0.42 ms per sample-step.)
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from digits_eval import CleanClassifier, digits_split  # noqa: E402
from diffusion_jax import sampling, schedules  # noqa: E402
from diffusion_jax.generation import samplers  # noqa: E402
from diffusion_jax.generation.images import to_uint8  # noqa: E402
from diffusion_jax.runtime import checkpoints  # noqa: E402

DEFAULT_MODELS = "simple=runs/steps_table/simple,hybrid=runs/digits,v=runs/steps_table/v"


def respacing(steps: int, spacing: str) -> str:
    """The `timestep_respacing` spec of K steps: OpenAI's even "K", or a solver spacing ("quadK")."""
    return f"{spacing}{steps}" if spacing else str(steps)


def sample_cell(module, params, cfg, sampler: str, steps: int, spacing: str, num_samples: int,
                seed: int, clip: bool) -> tuple[np.ndarray, float]:
    """(uint8 samples `[N, 8, 8, 1]`, seconds of the compiled run) for one table cell."""
    d, m = cfg["diffusion"], cfg["model"]
    sched = schedules.make_schedule(d["noise_schedule"], d["diffusion_steps"], respacing(steps, spacing),
                                    d.get("rescale_timesteps", False))
    loop = sampling.named_sampler(sampler)
    shape = (num_samples, m["image_size"], m["image_size"], m["in_channels"])
    ids = jnp.arange(num_samples, dtype=jnp.int32)
    labels = ids % m["num_classes"]
    model_fn = lambda x, t, y: module.apply({"params": params}, x, t, y)

    def run(rng, ids, y):
        return to_uint8(loop(rng, model_fn, sched, shape, mean_type=d["mean_type"], var_type=d["var_type"],
                             clip_denoised=clip, y=y, sample_ids=ids))

    rng = jax.random.key(seed)
    compiled = jax.jit(run).lower(rng, ids, labels).compile()
    start = time.perf_counter()
    images = np.asarray(jax.block_until_ready(compiled(rng, ids, labels)))
    return images, time.perf_counter() - start


def _done(path: str) -> dict:
    cells = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                clip = row.get("clip", samplers.SAMPLERS[row["sampler"]].clip_denoised)  # older rows: the default
                cells[(row["model"], row["sampler"], row["steps"], row["num_samples"], row["spacing"], clip)] = row
    return cells


def markdown(rows: list[dict], models: list[str], samplers_: list[str], steps: list[int]) -> str:
    """One table: a row per step count, a column per (model, sampler): 'FDD / acc / s per 1k'."""
    by = {(r["model"], r["sampler"], r["steps"]): r for r in rows}
    cols = [(m, s) for m in models for s in samplers_]
    out = ["| steps | " + " | ".join(f"{m} {s}" for m, s in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k in steps:
        cells = []
        for m, s in cols:
            r = by.get((m, s, k))
            cells.append(f"{r['fdd']:.2f} / {r['acc']:.2f} / {r['sec_per_1k']:.0f}s" if r else "-")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="name=workdir,...")
    ap.add_argument("--samplers", default="ancestral,ddim,dpm++2m", help=f"of {', '.join(sampling.SAMPLER_NAMES)}")
    ap.add_argument("--steps", default="10,25,50,100,250,1000")
    ap.add_argument("--num_samples", type=int, default=1000, help="samples per cell")
    ap.add_argument("--num_samples_at", default="", help="per-step-count overrides, e.g. '1000=200'")
    ap.add_argument("--spacing", default="", help="'' (OpenAI's even respacing) or a solver spacing: "
                                                   f"{', '.join(schedules.SOLVER_SPACINGS)}")
    ap.add_argument("--clip_denoised", default="", choices=["", "true", "false"],
                    help="clip x0 predictions to [-1, 1]; '': each sampler's sample.py default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/steps_table")
    args = ap.parse_args()

    models = dict(item.split("=", 1) for item in args.models.split(","))
    sampler_names = args.samplers.split(",")
    steps = [int(k) for k in args.steps.split(",")]
    per_steps = {int(k): int(n) for k, n in (i.split("=") for i in args.num_samples_at.split(",") if i)}
    os.makedirs(args.out, exist_ok=True)
    cells_path = os.path.join(args.out, "cells.jsonl")
    done = _done(cells_path)

    clf = CleanClassifier.train_or_load(os.path.join(args.out, "clean_cnn.npz"))
    train_x, _ = digits_split("train")
    test_x, test_y = digits_split("test")
    reference = clf.stats(train_x)
    print(f"clean CNN: test accuracy {clf.accuracy(test_x, test_y):.3f}; FDD(test split, train reference) "
          f"{clf.fdd(test_x, reference):.3f} (real-data floor)", flush=True)

    rows = []
    for name, workdir in models.items():
        module, params, cfg = checkpoints.load_for_inference(workdir)
        for k in steps:
            n = per_steps.get(k, args.num_samples)
            for s in sampler_names:
                clip = (samplers.SAMPLERS[s].clip_denoised if not args.clip_denoised
                        else args.clip_denoised == "true")
                key = (name, s, k, n, args.spacing, clip)
                if key in done:
                    rows.append(done[key])
                    continue
                images, secs = sample_cell(module, params, cfg, s, k, args.spacing, n, args.seed, clip)
                labels = np.arange(n) % cfg["model"]["num_classes"]
                row = dict(model=name, workdir=workdir, sampler=s, steps=k, num_samples=n, spacing=args.spacing, clip=clip,
                           fdd=clf.fdd(images, reference), acc=clf.accuracy(images, labels),
                           sec_per_1k=secs * 1000 / n, mean_type=cfg["diffusion"]["mean_type"],
                           var_type=cfg["diffusion"]["var_type"], loss_type=cfg["diffusion"]["loss_type"])
                rows.append(row)
                with open(cells_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name:>7} {s:>9} K={k:<5} N={n} clip={clip} {args.spacing}: FDD {row['fdd']:.3f}  acc {row['acc']:.3f}  "
                      f"{row['sec_per_1k']:.1f} s/1k", flush=True)
    print(markdown(rows, list(models), sampler_names, steps))


if __name__ == "__main__":
    main()
