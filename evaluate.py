r"""Evaluate a checkpoint: exact NLL in bits/dim, or sample metrics (FID, sFID, IS, P/R).

  python evaluate.py --workdir=runs/digits --metric=nll [--split=test] [--num_samples=N]
      [--batch_size=B] [--t_chunk=C] [--start=I --stop=J] [--out=report.json]
  python evaluate.py --metric=fid --samples=samples.npz --ref=VIRTUAL_imagenet64.npz \
      --inception_path=pt_inception-2015-12-05-6726825d.pth

Writes a JSON report (NLL: `bits_per_dim`, its standard error, prior, per-t-quartile
terms, settings) and prints a short table.  The logic lives in
`diffusion_jax.evaluation.run`.
"""

import os

from absl import app, flags

from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
from diffusion_jax.runtime import cli, parallel

flags.DEFINE_string("workdir", None, "training workdir or converted OpenAI checkpoint directory")
flags.DEFINE_enum("metric", "nll", ["nll", "fid", "samples"],
                  "nll: full-chain bits/dim; fid / samples: FID, sFID, IS, precision/recall of --samples vs --ref")
flags.DEFINE_string("data", None, "dataset name (default: the workdir config's data.name)")
flags.DEFINE_string("data_dir", None, "TFDS data directory")
flags.DEFINE_string("split", "test", "dataset split")
flags.DEFINE_integer("num_samples", None, "evaluate at most this many examples from --start")
flags.DEFINE_integer("batch_size", 64, "global batch size (examples per step; multiple of the device count)")
flags.DEFINE_integer("t_chunk", 16, "timesteps per forward pass (the pass sees batch_size * t_chunk images)")
flags.DEFINE_integer("start", 0, "first example index")
flags.DEFINE_integer("stop", None, "one past the last example index (default: end of split)")
flags.DEFINE_integer("seed", 0, "noise seed (noise of example i at t is keyed by (seed, i, t))")
flags.DEFINE_string("timestep_respacing", "", "evaluate the bound of a respaced chain ('' = the full chain)")
flags.DEFINE_bool("clip_denoised", True, "clip pred_xstart to [-1, 1] (OpenAI's image_nll.py default)")
flags.DEFINE_bool("allow_resize", False, "resize images whose size differs from the model's")
flags.DEFINE_float("ema_rate", None, "which EMA of a training workdir (default: the first; 0 = raw params)")
flags.DEFINE_string("out", None, "report path (default: <workdir>/eval/<metric>_<split>.json)")
flags.DEFINE_string("samples", None, "samples .npz (arr_0 uint8 NHWC) for sample metrics")
flags.DEFINE_string("ref", None, "reference .npz: OpenAI VIRTUAL_*.npz (mu, sigma, ...) or arr_0 images")
flags.DEFINE_string("inception_path", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
parallel.define_multihost_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax

    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from diffusion_jax.evaluation import run

    o = {name: FLAGS[name].value for name in FLAGS if name in _OURS}
    if o["out"] is None:
        base = o["workdir"] or os.path.dirname(os.path.abspath(o["samples"] or "."))
        o["out"] = os.path.join(base, "eval", f"{o['metric']}_{o['split']}.json")
    if o["metric"] == "nll":
        if not o["workdir"]:
            raise app.UsageError("--metric=nll needs --workdir")
        report = run.evaluate_nll(o)
    else:
        report = run.evaluate_samples(o)
    if jax.process_index() == 0:
        print(run.format_table(report))
        print(f"report: {o['out']}")


_OURS = ("workdir", "metric", "data", "data_dir", "split", "num_samples", "batch_size", "t_chunk", "start",
         "stop", "seed", "timestep_respacing", "clip_denoised", "allow_resize", "ema_rate", "out", "samples",
         "ref", "inception_path", "coordinator_address", "num_processes", "process_id")

if __name__ == "__main__":
    cli.run_main(main)
