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

from diffusion_jax.runtime import host_malloc  # noqa: E402
if __name__ == "__main__":
    host_malloc.reexec()  # huge pages for XLA:CPU's per-call buffers, before JAX loads
from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
from diffusion_jax.runtime import cli, parallel
from diffusion_jax.generation import sampling_flags

flags.DEFINE_string("workdir", None, "Training workdir or converted OpenAI checkpoint directory.", required=True)
flags.DEFINE_integer("num_samples", 16, "Number of images.")
sampling_flags.define()  # --batch_size, --sampler, --labels, --cfg_scale, ... --seed, --ema_rate
flags.adopt_module_key_flags(sampling_flags)  # listed by --help
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
flags.DEFINE_string("clip_workdir", None, "CLIP guidance towards --prompt: a CLIP pair workdir (kind 'clip', "
                    "configs/digits_clip.py) or OpenAI's converted towers (convert --preset=clip). Text models sample "
                    "the prompt without --cfg_scale (GLIDE's recipe); U-Nets keep --labels as their condition.")
flags.DEFINE_float("clip_scale", 1.0, "CLIP guidance scale.")
flags.DEFINE_string("out", None, "Output directory (or a .npz path); default <workdir>/samples.")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")
flags.DEFINE_boolean("write_shards", None, "Write the samples to <npz stem>.shards/ batch by batch (bounded "
                     "memory; a rerun resumes there), then assemble the npz; default: when they exceed 1 GiB.")
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
    from diffusion_jax.generation import program

    return sampling_flags.options_from_flags(program.SampleOptions, FLAGS, prompts=_prompts())


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
