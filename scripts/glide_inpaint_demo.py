"""Does the captioned-digits inpainting model complete a half-erased digit, and does it listen to the prompt?

    python train.py --config=configs/glide_digits_inpaint.py     # -> runs/glide_digits_inpaint
    python scripts/glide_inpaint_demo.py --workdir=runs/glide_digits_inpaint

Takes `--num_per_digit` test-split digits of each class, keeps the rows
`--keep` of each ("top": rows 0-3 of 8; "left": columns 0-3) and generates the
rest with `generation.program.run` (sample.py's inpainting path, GLIDE's
recipe), twice:

- prompted with the digit's own caption ("a handwritten seven"): how often a
  clean classifier reads the completed image as that digit, and the mean
  absolute error (0-255) of the generated pixels against the erased ones;
- prompted with another digit ((d + 5) mod 10): how often the completion
  follows the prompt instead of the kept half.

For reference it also scores the originals and the inputs with the erased half
left black.

Writes `<out>/inpaint_demo.png`: per column a test digit; rows: the input with
the erased region grey, the completion with its own prompt, the completion
with the other prompt, the original.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import glide_digits_demo as base  # noqa: E402  (its flags: workdir, classifier_workdir, num_per_prompt, ...)

flags.DEFINE_string("keep", "top", "Which half is given: top | bottom | left | right.")
flags.DEFINE_integer("num_per_digit", 10, "Test digits per class.")
flags.DEFINE_float("cfg_scale", 3.0, "Classifier-free guidance scale over captions.")
FLAGS = flags.FLAGS
FLAGS.set_default("workdir", "runs/glide_digits_inpaint")


def half_mask(keep: str, size: int) -> np.ndarray:
    """0/1 `[size, size]`: 1 on the kept half."""
    m = np.zeros((size, size), np.uint8)
    h = size // 2
    index = {"top": np.s_[:h, :], "bottom": np.s_[h:, :], "left": np.s_[:, :h], "right": np.s_[:, h:]}
    if keep not in index:
        raise ValueError(f"--keep={keep!r}: use top, bottom, left or right")
    m[index[keep]] = 1
    return m


def pick_digits(per_digit: int):
    """uint8 `[10 * per_digit, 8, 8, 1]` test digits and labels, ordered so that image i shows digit i mod 10."""
    x, y = base._digits("test")
    rows = [np.flatnonzero(y == d)[:per_digit] for d in range(10)]
    if min(len(r) for r in rows) < per_digit:
        raise ValueError(f"--num_per_digit={per_digit}: the test split has only {min(len(r) for r in rows)} of some digit")
    order = np.stack(rows, axis=1).reshape(-1)  # digit-major within each block of 10
    return x[order], y[order]


def main(argv):
    from diffusion_jax.runtime.xla_flags import set_cpu_flags

    set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
    del argv
    from diffusion_jax.runtime import cli

    cli.set_verbosity(None)  # library logs (orbax's restore chatter) hidden, as in the programs
    from diffusion_jax.generation import images as images_io
    from diffusion_jax.generation import program

    predict, about = base.clean_classifier(FLAGS.classifier_workdir)
    print(f"clean classifier: {about}")
    out = FLAGS.out or os.path.join(FLAGS.workdir, "inpaint_demo")
    os.makedirs(out, exist_ok=True)
    x, y = pick_digits(FLAGS.num_per_digit)
    mask = half_mask(FLAGS.keep, x.shape[1])
    np.savez(os.path.join(out, "inputs.npz"), x)
    np.savez(os.path.join(out, "mask.npz"), mask)
    erased = np.broadcast_to(mask[None, :, :, None] == 0, x.shape)  # the generated pixels of every image
    n = len(x)
    black = np.where(erased, np.uint8(0), x)
    print(f"references: the originals read as their digit {float((predict(x) == y).mean()):.3f}; with the erased "
          f"half left black {float((predict(black) == y).mean()):.3f}", flush=True)
    results = {}
    for name, shift in (("own prompt", 0), ("other prompt", 5)):
        prompts = tuple(f"a handwritten {base.WORDS[(d + shift) % 10]}" for d in range(10))
        opts = program.SampleOptions(
            num_samples=n, batch_size=n, timestep_respacing=FLAGS.timestep_respacing, cfg_scale=FLAGS.cfg_scale,
            prompts=prompts, seed=FLAGS.seed, ema_rate=FLAGS.ema_rate, progress=False,
            inpaint_image=os.path.join(out, "inputs.npz"), inpaint_mask=os.path.join(out, "mask.npz"),
            out=os.path.join(out, name.replace(" ", "_")))
        npz_path, _ = program.run(FLAGS.workdir, opts, log=lambda s: None)
        with np.load(npz_path) as z:
            samples = z["arr_0"]
        kept = bool(np.all(samples[~erased] == x[~erased]))
        got = predict(samples)
        mae = float(np.abs(samples.astype(np.float32) - x.astype(np.float32))[erased].mean())
        results[name] = samples
        print(f"{name} (cfg {FLAGS.cfg_scale:g}): reads as the true digit {float((got == y).mean()):.3f}, "
              f"as the prompted digit {float((got == (y + shift) % 10).mean()):.3f}; "
              f"MAE on the erased half {mae:.1f}/255; kept half unchanged: {kept}", flush=True)
    shown = min(n, 20)
    grey = np.where(erased, np.uint8(128), x)
    rows = [grey[:shown], results["own prompt"][:shown], results["other prompt"][:shown], x[:shown]]
    path = images_io.write_png(os.path.join(out, "inpaint_demo.png"),
                               images_io.image_grid(np.concatenate(rows), nrow=shown))
    print(f"picture: {path} (rows: input with the erased half grey | own prompt | prompt of (d + 5) mod 10 | original)")


if __name__ == "__main__":
    app.run(main)
