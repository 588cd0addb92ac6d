"""Does CLIP guidance make the captioned-digits GLIDE model draw the prompted digit more often?

    python train.py --config=configs/glide_digits.py             # -> runs/glide_digits
    python train.py --config=configs/digits_clip.py              # -> runs/digits_clip
    python scripts/digits_clip_demo.py --workdir=runs/glide_digits --clip_workdir=runs/digits_clip \
        --clip_scales=0,1,3,10

For each CLIP scale, samples `--num_per_prompt` images for each prompt "a
handwritten zero" ... "a handwritten nine" with `generation.program.run`
following GLIDE's CLIP-guided recipe (the text model conditioned on the prompt,
no classifier-free guidance; scale 0 = CLIP guidance off, the same samples as
without `--clip_workdir`), classifies them with the clean digits classifier of
`scripts/glide_digits_demo.py` and prints how often it agrees with the prompt.
The same seed at every scale: sample i starts from the same noise.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import glide_digits_demo as base  # noqa: E402  (its flags: workdir, classifier_workdir, num_per_prompt, ...)

flags.DEFINE_string("clip_workdir", "runs/digits_clip", "The CLIP pair's training workdir.")
flags.DEFINE_string("clip_scales", "0,1,3", "Comma list of CLIP guidance scales (0: guidance off).")
FLAGS = flags.FLAGS


def clip_zero_shot(clip_workdir: str, prompts, timesteps=(0, 250, 500, 750)) -> dict:
    """CLIP's zero-shot accuracy on noised digits test images, per original timestep t.

    x_t = q_sample(x_0, t, noise) (noise from key(0)); the predicted digit is the prompt with the
    largest cosine similarity to the image embedding.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffusion_jax import gaussian, schedules
    from diffusion_jax.generation import clip_guidance
    from diffusion_jax.runtime import checkpoints
    from diffusion_jax.runtime import text_conditioning as tc

    module, params, cfg = checkpoints.load_for_inference(clip_workdir)
    guide = clip_guidance.pair_guide(module, params, tc.tokenizer_from_config(cfg), int(cfg["model"]["text_ctx"]))
    tokens = clip_guidance.prompt_tokens(guide, prompts)
    text = guide.encode_text(params, tokens["tokens"], tokens["lens"])
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    images, labels = base._digits("test")
    x0 = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    schedule = schedules.make_schedule(cfg["diffusion"]["noise_schedule"], cfg["diffusion"]["diffusion_steps"])
    out = {}
    for t in timesteps:
        tt = jnp.full((x0.shape[0],), t, jnp.int32)
        x_t = gaussian.q_sample(schedule, x0, tt, jax.random.normal(jax.random.key(0), x0.shape))
        pred = np.asarray(jnp.argmax(guide.encode_image(params, x_t, tt) @ text.T, axis=-1))
        out[t] = float((pred == labels).mean())
    return out


def main(argv):
    from diffusion_jax.runtime.xla_flags import set_cpu_flags

    set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
    del argv

    from diffusion_jax.generation import program

    predict, about = base.clean_classifier(FLAGS.classifier_workdir)
    print(f"clean classifier: {about}")
    prompts = tuple(FLAGS.template.format(w=w, d=d) for d, w in enumerate(base.WORDS))
    zero_shot = clip_zero_shot(FLAGS.clip_workdir, prompts)
    print("CLIP zero-shot accuracy on noised test digits: "
          + ", ".join(f"t={t}: {a:.3f}" for t, a in zero_shot.items()), flush=True)
    out_root = FLAGS.out or os.path.join(FLAGS.workdir, "clip_demo")
    n = 10 * FLAGS.num_per_prompt
    results = {}
    for scale in [float(s) for s in FLAGS.clip_scales.split(",")]:
        opts = program.SampleOptions(
            num_samples=n, batch_size=n, timestep_respacing=FLAGS.timestep_respacing, prompts=prompts,
            clip_workdir=FLAGS.clip_workdir if scale else None, clip_scale=scale if scale else 1.0,
            seed=FLAGS.seed, out=os.path.join(out_root, f"clip{scale:g}"), progress=False)
        npz_path, png_path = program.run(FLAGS.workdir, opts, log=lambda s: None)
        results[scale], line = base.score_samples(npz_path, predict)
        print(f"CLIP scale {scale:g}: {line}  grid {png_path}", flush=True)
    print("summary: " + ", ".join(f"CLIP scale {s:g} -> {a:.3f}" for s, a in results.items()))


if __name__ == "__main__":
    app.run(main)
