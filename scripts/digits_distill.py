"""Progressive distillation of the digits model, every stage in sequence, then the students scored.

    python scripts/digits_distill.py                      # runs/digits -> s16 -> s8 -> s4 under runs/distill
    python scripts/digits_distill.py --start 64 --num_steps 800 --nice 10

Stage N is `python train.py --config=configs/digits_distill.py:N,START --workdir=ROOT/sN` with
`--config.distill.teacher_workdir` the previous stage (the first: --teacher, the main job's EMA model) and
`--config.train.num_steps`.  Re-running resumes: a finished stage (its step --num_steps checkpoint exists) is
skipped, an interrupted one resumes from its newest checkpoint (train.py's own resume).  Each sitting's wall time
per stage is appended to ROOT/stages.jsonl with the stage's last logged loss.

Then every student is scored on its own grid with deterministic DDIM (`scripts/digits_steps_table.py --spacing
distill --samplers ddim`: FDD in the clean digits CNN's features and its accuracy, --num_samples per cell), and
the teacher's own DDIM on the same grids (and on the first teacher's) as the baseline; cells go to ROOT/table/cells.jsonl (cached: a rerun
skips cells already there).
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage_steps(start: int, end: int) -> list[int]:
    """The students' step counts: start/2, start/4, ..., end."""
    steps, n = [], start // 2
    while n >= end:
        steps.append(n)
        n //= 2
    return steps


def last_loss(workdir: str) -> float | None:
    path = os.path.join(workdir, "metrics.jsonl")
    loss = None
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                loss = row.get("loss", loss)
    return loss


def run_stage(n: int, args, teacher: str) -> dict | None:
    workdir = os.path.join(args.root, f"s{n}")
    if os.path.isdir(os.path.join(workdir, "checkpoints", str(args.num_steps))):
        print(f"stage {2 * n} -> {n}: done ({workdir})", flush=True)
        return None
    cmd = (["nice", "-n", str(args.nice)] if args.nice else []) + [
        sys.executable, os.path.join(REPO, "train.py"), f"--config={REPO}/configs/digits_distill.py:{n},{args.start}",
        f"--workdir={workdir}", f"--config.distill.teacher_workdir={teacher}",
        f"--config.train.num_steps={args.num_steps}"]
    print(f"stage {2 * n} -> {n}: {' '.join(cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    row = dict(student_steps=n, teacher=teacher, workdir=workdir, num_steps=args.num_steps,
               wall_s=round(time.time() - start, 1), final_loss=last_loss(workdir))
    with open(os.path.join(args.root, "stages.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"stage {2 * n} -> {n}: {row['wall_s']:.0f} s, final loss {row['final_loss']}", flush=True)
    return row


def score(models: dict[str, str], steps: str, args) -> None:
    cmd = [sys.executable, os.path.join(REPO, "scripts", "digits_steps_table.py"),
           "--models", ",".join(f"{k}={v}" for k, v in models.items()), "--steps", steps, "--samplers", "ddim",
           "--spacing", "distill", "--num_samples", str(args.num_samples), "--out", os.path.join(args.root, "table")]
    subprocess.run((["nice", "-n", str(args.nice)] if args.nice else []) + cmd, check=True, cwd=REPO)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="runs/digits", help="the first stage's teacher workdir")
    ap.add_argument("--root", default="runs/distill", help="students go to ROOT/s<N>")
    ap.add_argument("--start", type=int, default=32, help="the first teacher's grid (steps)")
    ap.add_argument("--end", type=int, default=4, help="the last student's steps")
    ap.add_argument("--num_steps", type=int, default=800, help="optimizer steps per stage")
    ap.add_argument("--num_samples", type=int, default=1000, help="samples per scored cell (0: no scoring)")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the child processes (0: none)")
    args = ap.parse_args()
    os.makedirs(args.root, exist_ok=True)
    students = stage_steps(args.start, args.end)
    teacher = args.teacher
    for n in students:
        run_stage(n, args, teacher)
        teacher = os.path.join(args.root, f"s{n}")
    if args.num_samples:
        for n in students:
            score({f"s{n}": os.path.join(args.root, f"s{n}")}, str(n), args)
        score({"teacher": args.teacher}, ",".join(str(n) for n in sorted(students + [args.start])), args)


if __name__ == "__main__":
    main()
