"""Improved DDPM's objective table, small: test bits/dim of L_simple, L_hybrid, L_vlb on digits.

Trains three digits models with equal budgets (same network, steps, batch,
learning rate): L_simple with fixed Sigma (fixed_large, mse), L_hybrid
(learned Sigma, rescaled_mse), and L_vlb (learned Sigma, rescaled_kl) with
loss-second-moment importance sampling; then evaluates the exact bound
(all T = 1000 steps + prior, discretized decoder) on the digits test split
with evaluate.py and prints the table.  The paper's ordering in NLL is
L_vlb < L_hybrid < L_simple (Nichol & Dhariwal 2021, Table 2).

  python scripts/digits_nll_table.py [--steps 800] [--num_samples 180]
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "L_simple": ["--config.diffusion.var_type=fixed_large", "--config.diffusion.loss_type=mse",
                 "--config.model.out_channels=1"],
    "L_hybrid": ["--config.diffusion.loss_type=rescaled_mse"],
    "L_vlb": ["--config.diffusion.loss_type=rescaled_kl", "--config.diffusion.schedule_sampler=loss-second-moment"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--num_samples", type=int, default=180)
    ap.add_argument("--out", default="runs/nll_table")
    args = ap.parse_args()
    rows = {}
    for name, overrides in MODELS.items():
        workdir = os.path.join(args.out, name)
        common = [f"--config.train.num_steps={args.steps}", "--config.train.sample_every=0",
                  "--config.train.eval_every=0", f"--config.train.checkpoint_every={args.steps}"]
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}"] + common + overrides,
                       check=True)
        report = os.path.join(workdir, "eval", "nll_test.json")
        subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), f"--workdir={workdir}", "--metric=nll",
                        "--split=test", f"--num_samples={args.num_samples}", "--batch_size=60", "--t_chunk=25",
                        f"--out={report}"], check=True)
        with open(report) as f:
            r = json.load(f)
        rows[name] = (r["bits_per_dim"], r.get("bits_per_dim_stderr", r.get("stderr", float("nan"))))
    print(f"\ndigits test split, {args.num_samples} images, T=1000, {args.steps} steps each (batch 64):")
    print(f"{'objective':>10} | bits/dim")
    for name, (bpd, se) in rows.items():
        print(f"{name:>10} | {bpd:.3f} ± {se:.3f}")
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump({k: {"bits_per_dim": v[0], "stderr": v[1]} for k, v in rows.items()}, f, indent=2)


if __name__ == "__main__":
    main()
