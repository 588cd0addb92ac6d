"""Progressive distillation of the digits model (Salimans & Ho 2022): one stage = one train.py run.

    python train.py --config=configs/digits_distill.py:16 --workdir=runs/distill/s16   # teacher runs/digits, 32 steps
    python train.py --config=configs/digits_distill.py:8 --workdir=runs/distill/s8     # teacher runs/distill/s16
    python train.py --config=configs/digits_distill.py:4 --workdir=runs/distill/s4     # teacher runs/distill/s8
    python sample.py --workdir=runs/distill/s4     # 4 deterministic DDIM steps on its grid, by default

The argument is the student's step count N, optionally with the first
teacher grid, "N,START" (default START = 32): the stage whose teacher grid is
START distils the main job's EMA model (runs/digits: eps, learned Sigma), the
later ones the previous student (runs/distill/s{2N}, v).  scripts/digits_distill.py
runs the whole chain, resumably, and scores the students.

Why 32 and not 1024 (or 256): on digits the eps teacher's DDIM is on its
plateau by 25 steps (FDD 7.6 at 25, 7.8 at 50, 7.5 at 250; README's steps
table), so a 32-step teacher is as good a target as a 256-step one, while every
halving stage costs minutes of a 2-core CPU (three stages reach 4 steps instead
of six from 256); 1024 is more than the model's T = 1000 anyway.  START=64
(`:N,64`) adds the 64 -> 32 stage.  The grids are the nested "distillN" respacings (schedules.distill_timesteps).

The student: v-prediction (the paper's choice: eps cannot predict x at the
lowest SNR), fixed variance and one output channel: the teacher's variance half
is dropped (DDIM never reads it), the rest of its weights initialise the
student.  Loss: truncated-SNR weighted x-space MSE against the two-teacher-step
target (diffusion_jax/distillation.py).  Labels and the null label as the
teacher, with the same dropout, so classifier-free guidance still works.
"""

from configs import digits

START_STEPS = 32  # the first stage's teacher grid


def get_config(arg=None):
    parts = [int(p) for p in str(arg).split(",")] if arg else [START_STEPS // 2]
    n, start = parts[0], parts[1] if len(parts) > 1 else START_STEPS
    c = digits.get_config()
    c.model.update(out_channels=1)
    c.diffusion.update(mean_type="v", var_type="fixed_small", loss_type="mse", timestep_respacing=f"distill{n}")
    first = 2 * n == start
    c.distill.update(teacher_workdir="runs/digits" if first else f"runs/distill/s{2 * n}", teacher_steps=2 * n,
                     teacher_mean_type="epsilon" if first else "v")
    # From the teacher's weights: a lower peak rate than from scratch, annealed to 0 (the paper's schedule).
    c.optim.update(lr=3e-4, warmup_steps=20, anneal=True, grad_clip=1.0)
    c.train.update(num_steps=800, batch_size=64, ema_rates=(0.999,), ema_warmup=True, p_uncond=0.1, log_every=50,
                   checkpoint_every=200, sample_every=0, eval_every=0)
    c.sample.update(timestep_respacing=f"distill{n}", use_ddim=True)
    return c
