"""Cross-entropy two ways on digits: the variational bound (VLB) beside the probability-flow ODE likelihood.

For every model workdir, runs `evaluate.py --metric=nll` (the exact bound:
all T = 1000 steps + prior, discretized decoder) and `evaluate.py
--metric=ode_nll` (the probability-flow ODE of the same network, uniform
dequantization, Skilling-Hutchinson divergence; score_sde's recipe) on the same
test examples, and prints one markdown table (bits/dim ± standard error, the
ODE's mean number of function evaluations, wall seconds).  Reports land in
<out>/<name>_{nll,ode_nll}.json; a rerun reuses finished reports (evaluate.py
itself resumes unfinished ones).

The README's table uses the steps-table models (see
scripts/digits_steps_table.py for how they are trained; their step-1000
checkpoints are in runs/steps_table/m1000/NAME):

  python scripts/digits_ode_table.py --models simple=runs/steps_table/m1000/simple \\
      hybrid=runs/steps_table/m1000/hybrid v=runs/steps_table/m1000/v --num_samples 60
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluate(workdir: str, metric: str, out: str, extra: list[str]) -> tuple[dict, float]:
    """(report, wall seconds) of one evaluate.py run; an existing report is read, not recomputed."""
    if os.path.exists(out):
        with open(out) as f:
            return json.load(f), float("nan")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), f"--workdir={workdir}", f"--metric={metric}",
                    f"--out={out}", *extra], check=True)
    with open(out) as f:
        return json.load(f), time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", required=True, help="NAME=WORKDIR pairs")
    ap.add_argument("--num_samples", type=int, default=60, help="test examples (the digits test split has 180)")
    ap.add_argument("--ode_probes", type=int, default=1, help="Hutchinson probes per example (0: exact divergence)")
    ap.add_argument("--ode_rtol", type=float, default=1e-5)
    ap.add_argument("--ode_atol", type=float, default=1e-5)
    ap.add_argument("--batch_size", type=int, default=60, help="examples per step (padding rows cost as much)")
    ap.add_argument("--out", default="runs/ode_table")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    common = [f"--num_samples={args.num_samples}", f"--batch_size={args.batch_size}"]
    ode = [f"--ode_probes={args.ode_probes}", f"--ode_rtol={args.ode_rtol}", f"--ode_atol={args.ode_atol}"]
    rows = ["| model | VLB bits/dim | ODE bits/dim | ODE NFE | VLB s | ODE s |", "|---|---|---|---|---|---|"]
    for spec in args.models:
        name, workdir = spec.split("=", 1)
        vlb, vlb_s = evaluate(workdir, "nll", os.path.join(args.out, f"{name}_nll.json"), common)
        flow, ode_s = evaluate(workdir, "ode_nll", os.path.join(args.out, f"{name}_ode_nll.json"), common + ode)
        rows.append(f"| {name} | {vlb['bits_per_dim']:.3f} ± {vlb['bits_per_dim_stderr']:.3f} | "
                    f"{flow['bits_per_dim']:.3f} ± {flow['bits_per_dim_stderr']:.3f} | {flow.get('nfe_mean', float('nan')):.0f} | "
                    f"{vlb_s:.0f} | {ode_s:.0f} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
