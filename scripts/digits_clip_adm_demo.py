"""Does CLIP guidance make the class-conditional digits U-Net draw the prompted digit?

    python train.py                                          # the ADM digits model -> runs/digits
    python train.py --config=configs/digits_clip.py          # the noised CLIP pair -> runs/digits_clip
    python scripts/digits_clip_adm_demo.py --workdir=runs/digits --clip_workdir=runs/digits_clip \\
        --prompt="a handwritten seven" --digit=7 --clip_scales=0,3,10,30 --num_samples=100 --timestep_respacing=50

For each CLIP scale, `generation.program.run` draws `--num_samples` samples of
the U-Net with `--labels` (default "null": the null label, i.e. the
unconditional model that classifier-free training learned, so only CLIP says
which digit to draw), guided towards `--prompt` by the noised CLIP
(`sample.py --clip_workdir`; scale 0 = no CLIP, the same samples as without
it). The same seed at every scale: sample i starts from the same noise. The
samples are classified by the clean digits CNN of `scripts/digits_eval.py`
(trained on the digits train split, or loaded from `--clean_cnn`), and the
script prints the fraction classified as `--digit` and the histogram of
predicted digits. Results go to `<out>/results.json`.
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
from diffusion_jax.generation import program  # noqa: E402


def measure(workdir: str, clip_workdir: str, prompt: str, scale: float, *, labels: str, num_samples: int,
            respacing: str, sampler: str | None, seed: int, out: str) -> np.ndarray:
    """uint8 samples `[N, 8, 8, 1]` of the U-Net at one CLIP scale (0: no CLIP guidance)."""
    opts = program.SampleOptions(
        num_samples=num_samples, batch_size=num_samples, timestep_respacing=respacing, sampler=sampler,
        labels=labels, prompts=(prompt,) if scale else (), clip_workdir=clip_workdir if scale else None,
        clip_scale=scale if scale else 1.0, seed=seed, out=out, progress=False)
    npz_path, _ = program.run(workdir, opts, log=lambda s: None)
    with np.load(npz_path) as z:
        return z["arr_0"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/digits", help="the class-conditional digits U-Net")
    ap.add_argument("--clip_workdir", default="runs/digits_clip", help="a CLIP for 8x8x1 digits (kind 'clip')")
    ap.add_argument("--prompt", default="a handwritten seven")
    ap.add_argument("--digit", type=int, default=7, help="the digit the prompt names")
    ap.add_argument("--clip_scales", default="0,3,10,30", help="comma list (0: CLIP guidance off)")
    ap.add_argument("--labels", default="null", help="the model's labels: 'null' (unconditional) or a list")
    ap.add_argument("--num_samples", type=int, default=100)
    ap.add_argument("--timestep_respacing", default="50")
    ap.add_argument("--sampler", default=None, help="a sample.py --sampler name (default ancestral)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clean_cnn", default="runs/steps_table/clean_cnn.npz", help="trained here if missing")
    ap.add_argument("--out", default=None, help="default <workdir>/clip_adm_demo")
    args = ap.parse_args()

    clf = CleanClassifier.train_or_load(args.clean_cnn)
    test_x, test_y = digits_split("test")
    print(f"clean CNN: digits test accuracy {clf.accuracy(test_x, test_y):.3f}", flush=True)
    out_root = args.out or os.path.join(args.workdir, "clip_adm_demo")
    results = {}
    for scale in [float(s) for s in args.clip_scales.split(",")]:
        images = measure(args.workdir, args.clip_workdir, args.prompt, scale, labels=args.labels,
                         num_samples=args.num_samples, respacing=args.timestep_respacing, sampler=args.sampler,
                         seed=args.seed, out=os.path.join(out_root, f"clip{scale:g}"))
        hist = np.bincount(clf.predict(images), minlength=10)
        results[f"{scale:g}"] = {"fraction": float(hist[args.digit] / len(images)), "histogram": hist.tolist()}
        print(f"CLIP scale {scale:g}: {hist[args.digit]}/{len(images)} classified as {args.digit} "
              f"(predicted digits {hist.tolist()})", flush=True)
    summary = {"prompt": args.prompt, "digit": args.digit, "labels": args.labels, "num_samples": args.num_samples,
               "timestep_respacing": args.timestep_respacing, "sampler": args.sampler or "ancestral",
               "seed": args.seed, "results": results}
    with open(os.path.join(out_root, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("summary: " + ", ".join(f"scale {s} -> {r['fraction']:.2f}" for s, r in results.items()))


if __name__ == "__main__":
    main()
