"""Does classifier-free guidance hurt cross-entropy?  Bits/dim and sample accuracy vs CFG scale on digits.

For a class-conditional digits model trained with a null label (default
runs/digits: `python train.py`, learned Sigma), at every CFG scale S:

  - bits/dim: the exact variational bound (all T steps + prior) on the digits
    test split of the chain `sample.py --cfg_scale=S` samples, eps_hat =
    eps(null) + S (eps(y) - eps(null)) with each test image's TRUE label y
    (`evaluate.py --metric=nll --cfg_scale=S`, through `evaluation.run`; the
    reports and resumable partials go to <out>/nll_cfg<S>.json);
  - acc: how often the clean digits CNN (`digits_eval.CleanClassifier`)
    recognises the requested class in N samples of that chain (labels cycling
    0..9, a respaced sampler, sample.py's engine);
  - FDD: the Fréchet digits distance of those samples to the train split.

S = 1 is the plain conditional model.  S = 0 takes eps from the null label
but, like every CFG chain here (GLIDE's convention), the learned variance
from the conditional pass.

  python scripts/digits_guided_nll_table.py                     # 180 test images, 1000 samples per scale
  python scripts/digits_guided_nll_table.py --num_examples 4 --num_samples 20 --nll_batch_size 4   # smoke
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
import numpy as np  # noqa: E402

from digits_eval import CleanClassifier, digits_split  # noqa: E402
from diffusion_jax.evaluation import run  # noqa: E402
from diffusion_jax.generation import program, unet  # noqa: E402
from diffusion_jax.runtime import checkpoints  # noqa: E402


def nll_options(args, scale: float) -> dict:
    """`evaluate.py --metric=nll --cfg_scale=S` options: the full chain, clipped x0, the test split."""
    return dict(workdir=args.workdir, data="digits", data_dir=None, split="test", num_samples=args.num_examples,
                batch_size=args.nll_batch_size, t_chunk=args.t_chunk, start=0, stop=None, seed=args.seed,
                timestep_respacing="", clip_denoised=True, allow_resize=False, ema_rate=None,
                out=os.path.join(args.out, f"nll_cfg{scale:g}.json"), cfg_scale=scale, classifier_workdir=None,
                classifier_scale=None)


def sample_at(module, params, cfg, args, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 samples [N, 8, 8, 1], their labels [N]) of `sample.py --cfg_scale=S --labels=0,...,9`."""
    opts = program.SampleOptions(num_samples=args.num_samples, batch_size=args.sample_batch_size,
                                 timestep_respacing=str(args.steps), sampler=args.sampler,
                                 labels=",".join(str(c) for c in range(cfg["model"]["num_classes"])),
                                 cfg_scale=scale, seed=args.seed, progress=False)
    plan = unet.make_plan(cfg, opts)
    return unet.generate(module, params, plan, opts, log=lambda s: None)


def markdown(rows: list[dict], args) -> str:
    head = (f"digits test split: bits/dim over {rows[0]['num_examples']} images (T = {rows[0]['num_timesteps']}, "
            f"true labels); samples: {args.num_samples} per scale, {args.sampler} {args.steps} steps, labels 0..9")
    out = [head, "", "| CFG scale | bits/dim ± s.e. | sample accuracy | FDD |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['cfg_scale']:g} | {r['bits_per_dim']:.4f} ± {r['stderr']:.4f} | {r['acc']:.3f} | "
                   f"{r['fdd']:.3f} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/digits", help="class-conditional digits model with a null label")
    ap.add_argument("--scales", default="0,1,2,3,5", help="CFG scales")
    ap.add_argument("--num_examples", type=int, default=180, help="test images in the bound (180: the whole split)")
    ap.add_argument("--nll_batch_size", type=int, default=60, help="examples per NLL step (x device count)")
    ap.add_argument("--t_chunk", type=int, default=25, help="timesteps per NLL forward pass")
    ap.add_argument("--num_samples", type=int, default=1000, help="samples per scale for accuracy / FDD")
    ap.add_argument("--sample_batch_size", type=int, default=500)
    ap.add_argument("--sampler", default="ancestral", help="sample.py's --sampler")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (respaced chain)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clean_cnn", default="runs/steps_table/clean_cnn.npz", help="trained there if missing")
    ap.add_argument("--out", default="runs/guided_nll_table")
    args = ap.parse_args()

    module, params, cfg = checkpoints.load_for_inference(args.workdir)
    clf = CleanClassifier.train_or_load(args.clean_cnn)
    reference = clf.stats(digits_split("train")[0])
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        report = run.evaluate_nll(nll_options(args, scale))  # resumes from <out>/nll_cfg<S>.partial.npz
        images, labels = sample_at(module, params, cfg, args, scale)
        row = dict(cfg_scale=scale, bits_per_dim=report["bits_per_dim"], stderr=report["bits_per_dim_stderr"],
                   num_examples=report["num_examples"], num_timesteps=report["num_timesteps"],
                   acc=clf.accuracy(images, labels), fdd=clf.fdd(images, reference),
                   checkpoint_step=cfg.get("checkpoint_step"), sampler=args.sampler, steps=args.steps,
                   num_samples=args.num_samples)
        rows.append(row)
        print(f"S={scale:g}: {row['bits_per_dim']:.4f} ± {row['stderr']:.4f} bits/dim, acc {row['acc']:.3f}, "
              f"FDD {row['fdd']:.3f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump({"workdir": os.path.abspath(args.workdir), "rows": rows}, f, indent=2)
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
