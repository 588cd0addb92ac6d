"""Sample images from a trained or converted diffusion model.

    python sample.py --workdir=runs/digits --num_samples=64 --timestep_respacing=100
    python sample.py --workdir=runs/digits --sampler=dpm++2m --timestep_respacing=20
    python sample.py --workdir=converted/256x256_diffusion_uncond --use_ddim --timestep_respacing=ddim25 \
        --classifier_workdir=converted/256x256_classifier --classifier_scale=10
    python sample.py --workdir=runs/glide_digits --prompt="a handwritten seven" --cfg_scale=3 --num_samples=16
    python sample.py --workdir=converted/glide_base --tokenizer_dir=glide_tokenizer --prompts_file=prompts.txt \
        --cfg_scale=3 --upsampler_workdir=converted/glide_upsample

Writes `samples_NxHxWxC.npz` (OpenAI's `arr_0` uint8 NHWC / `arr_1` labels) and a
PNG grid to --out (default <workdir>/samples) and prints both paths.  The work
lives in `diffusion_jax.generation.program`.
"""

from absl import app, flags

from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
from diffusion_jax.runtime import cli, parallel
from diffusion_jax.generation import samplers

flags.DEFINE_string("workdir", None, "Training workdir or converted OpenAI checkpoint directory.", required=True)
flags.DEFINE_integer("num_samples", 16, "Number of images.")
flags.DEFINE_integer("batch_size", 16, "Global batch size (rounded up to a multiple of the device count).")
flags.DEFINE_string("timestep_respacing", None, "'N', 'a,b,c', 'ddimN', or solver spacings 'quadN' / "
                    "'logsnrN'; default: the checkpoint's own.")
flags.DEFINE_enum("sampler", None, list(samplers.SAMPLERS), "Sampling loop (default: ancestral, or ddim with "
                  "--use_ddim); see diffusion_jax/generation/samplers.py.")
flags.DEFINE_boolean("use_ddim", False, "Alias of --sampler=ddim.")
flags.DEFINE_float("eta", 0.0, "DDIM eta (needs --sampler=ddim).")
flags.DEFINE_boolean("clip_denoised", None, "Clip the x0 prediction to [-1, 1] at every step; default: the "
                     "sampler's (on for ancestral/ddim, off for the DPM solvers).")
flags.DEFINE_string("labels", None, "Comma list of classes (cycled), 'random' or 'null'; default random if needed.")
flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale (model must have a null label).")
flags.DEFINE_string("classifier_workdir", None, "Noisy classifier (workdir or converted dir) for guidance.")
flags.DEFINE_float("classifier_scale", 1.0, "Classifier guidance scale.")
flags.DEFINE_multi_string("prompt", None, "Text models: a caption (repeatable); samples cycle through them.")
flags.DEFINE_string("prompts_file", None, "Text models: a file of captions, one per line (added to --prompt).")
flags.DEFINE_string("tokenizer_dir", None, "Directory with GLIDE's encoder.json and vocab.bpe (converted GLIDE "
                    "checkpoints); default: the training config's tokenizer.")
flags.DEFINE_string("upsampler_workdir", None, "A second stage run on the base samples: a 'glide_upsample' "
                    "(or 'glide_upsample_inpaint') model after GLIDE, a 'super_res' model after a U-Net.")
flags.DEFINE_string("base_samples", None, "Super-resolution: OpenAI-format .npz (arr_0 uint8 [N, h, w, C]; arr_1 "
                    "labels for class-conditional models) upsampled by the 'super_res' model of --workdir.")
flags.DEFINE_string("inpaint_image", None, "GLIDE inpainting: PNG/JPEG, or .npz (arr_0 uint8 [H, W, C] or "
                    "[N, H, W, C]). Resized to the model's size with PIL bicubic; the upsampler re-reads it at its "
                    "size.")
flags.DEFINE_string("inpaint_mask", None, "GLIDE inpainting: PNG (255/white = keep, 0/black = generate) or .npz "
                    "(0/1), the image's height and width. Resized by nearest neighbour (pixel i <- floor(i * H / "
                    "size)); the upsampler gets the base mask enlarged by nearest neighbour.")
flags.DEFINE_string("upsample_respacing", "fast27", "The upsampler's respacing (GLIDE: fast27).")
flags.DEFINE_boolean("upsample_ddim", True, "DDIM for the upsampler (GLIDE's recipe); --noupsample_ddim: ancestral.")
flags.DEFINE_float("upsample_temp", 0.997, "The upsampler's initial-noise multiplier (GLIDE: 0.997).")
flags.DEFINE_string("clip_workdir", None, "CLIP guidance of a text model: a CLIP pair workdir (kind 'clip', "
                    "configs/digits_clip.py); the model samples the prompt without --cfg_scale (GLIDE's recipe).")
flags.DEFINE_float("clip_scale", 1.0, "CLIP guidance scale.")
flags.DEFINE_integer("seed", 0, "Sample i is a function of (seed, i) only.")
flags.DEFINE_float("ema_rate", None, "Which EMA of a training workdir to use; default: the checkpoint's choice.")
flags.DEFINE_string("out", None, "Output directory (or a .npz path); default <workdir>/samples.")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")
parallel.define_multihost_flags()

FLAGS = flags.FLAGS


def _prompts() -> tuple[str, ...]:
    prompts = list(FLAGS.prompt or [])
    if FLAGS.prompts_file:
        with open(FLAGS.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
        if not prompts:
            raise app.UsageError(f"--prompts_file={FLAGS.prompts_file} holds no prompts")
    return tuple(prompts)


def _options():
    """The flags as `program.SampleOptions` (every field of it is a flag of the same name)."""
    import dataclasses

    from diffusion_jax.generation import program

    fields = {f.name for f in dataclasses.fields(program.SampleOptions)} & set(FLAGS)
    values = {name: FLAGS[name].value for name in fields}
    return program.SampleOptions(**dict(values, prompts=_prompts()))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from diffusion_jax.generation import program

    paths = program.run(FLAGS.workdir, _options())
    if paths is not None:
        print(f"wrote {paths[0]}")
        print(f"wrote {paths[1]}")


if __name__ == "__main__":
    cli.run_main(main)
