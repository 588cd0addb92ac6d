"""Does the captioned-digits GLIDE model draw the digit it is asked for? Accuracy per guidance scale.

    python train.py --config=configs/glide_digits.py            # -> runs/glide_digits
    python scripts/glide_digits_demo.py --workdir=runs/glide_digits --scales=1,3

Samples `--num_per_prompt` images for each prompt "a handwritten zero" ...
"a handwritten nine" with `generation.program.run` (classifier-free guidance over
captions at each scale), classifies them with a clean (t = 0) digits
classifier and prints how often the classifier agrees with the prompt.

The clean classifier is `runs/clean_classifier` when that work directory holds
one (an `EncoderUNet` trained with `configs/digits_classifier.py` and
`--config.diffusion.diffusion_steps=1`, applied at t = 0); otherwise a
scikit-learn logistic regression on the 64 pixels of the digits train split
(its test-split accuracy is printed as a reference).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

flags.DEFINE_string("workdir", "runs/glide_digits", "The text model's training workdir.")
flags.DEFINE_string("classifier_workdir", "runs/clean_classifier", "A clean classifier workdir, if it exists.")
flags.DEFINE_string("scales", "1,3", "Comma list of classifier-free guidance scales.")
flags.DEFINE_integer("num_per_prompt", 10, "Samples per prompt.")
flags.DEFINE_string("timestep_respacing", "100", "Sampling respacing.")
flags.DEFINE_string("template", "a handwritten {w}", "Prompt template ({w}: the digit as a word, {d}: numeral).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_float("ema_rate", None, "Which EMA of the newest checkpoint (default the first; 0: raw params).")
flags.DEFINE_string("out", None, "Output directory (default <workdir>/demo).")
FLAGS = flags.FLAGS


def _digits(split: str):
    import numpy as np

    from diffusion_jax.data import pipeline

    source = pipeline.make_source("digits", split)
    return np.asarray(source.arrays["image"]), np.asarray(source.arrays["label"])


def clean_classifier(workdir: str):
    """(predict(uint8 [N, 8, 8, 1]) -> int [N], description)."""
    import numpy as np

    from diffusion_jax.runtime import checkpoints

    if os.path.isdir(workdir) and checkpoints.has_checkpoints(workdir):
        import jax.numpy as jnp

        module, params, cfg = checkpoints.load_for_inference(workdir)
        if cfg["kind"] == "classifier":
            def predict(images):
                x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
                logits = module.apply({"params": params}, x, jnp.zeros((x.shape[0],), jnp.int32))
                return np.asarray(jnp.argmax(logits, -1))

            return predict, f"EncoderUNet at t=0 from {workdir} (step {cfg['checkpoint_step']})"
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = _digits("train")
    x_test, y_test = _digits("test")
    flat = lambda a: a.reshape(len(a), -1).astype(np.float32) / 255.0
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(flat(x_train), y_train)
    acc = float((clf.predict(flat(x_test)) == y_test).mean())
    return (lambda images: clf.predict(flat(images))), \
        f"scikit-learn logistic regression on pixels (digits test accuracy {acc:.3f})"


def score_samples(npz_path: str, predict) -> tuple[float, str]:
    """(accuracy, one-line summary) of a samples file whose arr_1 holds the prompted digits."""
    import numpy as np

    with np.load(npz_path) as z:
        images, wanted = z["arr_0"], z["arr_1"]
    got = predict(images)
    per_digit = [float((got[wanted == d] == d).mean()) for d in range(10)]
    acc = float((got == wanted).mean())
    return acc, (f"accuracy {acc:.3f} ({int((got == wanted).sum())}/{len(got)})"
                 f"  per digit {' '.join(f'{a:.1f}' for a in per_digit)}")


def main(argv):
    from diffusion_jax.runtime.xla_flags import set_cpu_flags

    set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
    del argv

    from diffusion_jax.generation import program

    predict, about = clean_classifier(FLAGS.classifier_workdir)
    print(f"clean classifier: {about}")
    prompts = tuple(FLAGS.template.format(w=w, d=d) for d, w in enumerate(WORDS))
    out_root = FLAGS.out or os.path.join(FLAGS.workdir, "demo")
    results = {}
    for scale in [float(s) for s in FLAGS.scales.split(",")]:
        opts = program.SampleOptions(
            num_samples=10 * FLAGS.num_per_prompt, batch_size=10 * FLAGS.num_per_prompt,
            timestep_respacing=FLAGS.timestep_respacing, cfg_scale=scale, prompts=prompts, seed=FLAGS.seed,
            ema_rate=FLAGS.ema_rate, out=os.path.join(out_root, f"cfg{scale:g}"), progress=False)
        npz_path, png_path = program.run(FLAGS.workdir, opts, log=lambda s: None)
        results[scale], line = score_samples(npz_path, predict)
        print(f"guidance scale {scale:g}: {line}  grid {png_path}", flush=True)
    print("summary: " + ", ".join(f"scale {s:g} -> {a:.3f}" for s, a in results.items()))


if __name__ == "__main__":
    app.run(main)
