r"""Evaluate a checkpoint: exact NLL in bits/dim, or sample metrics (FID, sFID, IS, P/R).

  python evaluate.py --workdir=runs/digits --metric=nll [--split=test] [--num_samples=N]
      [--batch_size=B] [--t_chunk=C] [--start=I --stop=J] [--out=report.json]
      [--cfg_scale=S] [--classifier_workdir=D --classifier_scale=S]   # the bound of sample.py's guided chain
  python evaluate.py --workdir=runs/digits --metric=ode_nll [--ode_probes=P] [--ode_solver=dopri5|rk4]
      [--ode_rtol=R --ode_atol=A | --ode_steps=N] [--num_samples=N] ...   # probability-flow ODE bits/dim
  python evaluate.py --metric=fid --samples=samples.npz --ref=VIRTUAL_imagenet64.npz \
      --inception_path=pt_inception-2015-12-05-6726825d.pth
  python evaluate.py --metric=fid --workdir=runs/digits --num_samples=50000 --ref=VIRTUAL_imagenet64.npz \
      --inception_path=pt_inception-2015-12-05-6726825d.pth [sample.py's sampling flags] [--metrics=fid,sfid,is]

With --workdir (and no --samples) FID samples through sample.py's engine and
streams each batch into Inception on device, keeping only running sums
(host memory O(batch)); it resumes from `<out>.partial.npz`.  Precision /
recall need all features at once and are computed only from --samples.

Writes a JSON report (NLL: `bits_per_dim`, its standard error, prior, per-t-quartile
terms, settings) and prints a short table.  The logic lives in
`diffusion_jax.evaluation.run`.
"""

import os

from absl import app, flags

from diffusion_jax.runtime import host_malloc  # noqa: E402
if __name__ == "__main__":
    host_malloc.reexec()  # huge pages for XLA:CPU's per-call buffers, before JAX loads
from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
from diffusion_jax.generation import sampling_flags
from diffusion_jax.runtime import cli, parallel

flags.DEFINE_string("workdir", None, "training workdir or converted OpenAI checkpoint directory")
flags.DEFINE_enum("metric", "nll", ["nll", "ode_nll", "fid", "samples"],
                  "nll: full-chain bits/dim; ode_nll: probability-flow ODE bits/dim (score_sde); "
                  "fid / samples: FID, sFID, IS, precision/recall of --samples vs --ref")
flags.DEFINE_string("data", None, "dataset name (default: the workdir config's data.name)")
flags.DEFINE_string("data_dir", None, "TFDS data directory")
flags.DEFINE_string("split", "test", "dataset split")
flags.DEFINE_integer("num_samples", None, "nll: evaluate at most this many examples from --start; fid with "
                     "--workdir: sample and score this many images")
flags.DEFINE_integer("t_chunk", 16, "timesteps per forward pass (the pass sees batch_size * t_chunk images)")
flags.DEFINE_integer("start", 0, "first example index")
flags.DEFINE_integer("stop", None, "one past the last example index (default: end of split)")
flags.DEFINE_bool("allow_resize", False, "resize images whose size differs from the model's")
flags.DEFINE_string("out", None, "report path (default: <workdir>/eval/<metric>_<split>.json)")
flags.DEFINE_string("samples", None, "samples .npz (arr_0 uint8 NHWC) for sample metrics")
flags.DEFINE_string("ref", None, "reference .npz: OpenAI VIRTUAL_*.npz (mu, sigma, ...) or arr_0 images")
flags.DEFINE_string("inception_path", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
flags.DEFINE_list("metrics", None, "--metric=fid --workdir: which of fid,sfid,is to stream (default: fid and is, "
                  "plus sfid when --num_samples >= 2023, the spatial feature dimension); precision/recall need every "
                  "feature at once and are not computed in this mode (use sample.py, then --samples)")
flags.DEFINE_integer("ode_probes", 1, "ode_nll: Hutchinson probes per example (0: exact divergence, D VJPs)")
flags.DEFINE_enum("ode_solver", "dopri5", ["dopri5", "rk4"], "ode_nll: adaptive Dormand-Prince or fixed-step RK4")
flags.DEFINE_float("ode_rtol", 1e-5, "ode_nll, dopri5: relative tolerance")
flags.DEFINE_float("ode_atol", 1e-5, "ode_nll, dopri5: absolute tolerance")
flags.DEFINE_integer("ode_steps", 100, "ode_nll, rk4: steps (uniform in log-SNR)")
flags.DEFINE_integer("save_every", 1, "--metric=fid --workdir: save the partial statistics every this many batches")
sampling_flags.define(defaults={"batch_size": 64}, notes={
    "batch_size": " nll: examples per step (a multiple of the device count).",
    "timestep_respacing": " nll: the bound of a respaced chain (default: the full chain).",
    "clip_denoised": " nll: default on (OpenAI's image_nll.py).",
    "seed": " nll: the noise of example i at t is keyed by (seed, i, t).",
    "ema_rate": " 0: raw params.",
    "cfg_scale": " nll: the bound of this CFG chain, y = each example's true label.",
    "classifier_workdir": " nll: the bound of the classifier-guided chain (true labels).",
    "classifier_scale": " nll: needs --classifier_workdir."})
flags.adopt_module_key_flags(sampling_flags)  # listed by --help
parallel.define_multihost_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax

    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from diffusion_jax.evaluation import nll_guidance, run

    o = {name: FLAGS[name].value for name in FLAGS if name in _OURS}
    streaming = o["metric"] in ("fid", "samples") and bool(o["workdir"]) and not o["samples"]
    if not streaming:  # the NLL metrics' defaults (OpenAI's image_nll.py): the full chain, clipped x0
        o.update(timestep_respacing=o["timestep_respacing"] or "", clip_denoised=o["clip_denoised"] is not False)
    elif o["out"] is None:
        o["out"] = os.path.join(o["workdir"], "eval", f"fid_{o['num_samples']}.json")
    if o["metric"] == "nll":  # classifier_scale None: not given; a guided bound gets its own default report
        o["classifier_scale"] = o["classifier_scale"] if FLAGS["classifier_scale"].present else None
        if o["out"] is None and o["workdir"]:
            o["out"] = os.path.join(o["workdir"], "eval", f"nll_{o['split']}{nll_guidance.tag(o)}.json")
    if o["out"] is None:
        base = o["workdir"] or os.path.dirname(os.path.abspath(o["samples"] or "."))
        o["out"] = os.path.join(base, "eval", f"{o['metric']}_{o['split']}.json")
    if o["metric"] == "nll":
        if not o["workdir"]:
            raise app.UsageError("--metric=nll needs --workdir")
        report = run.evaluate_nll(o)
    elif o["metric"] == "ode_nll":
        if not o["workdir"]:
            raise app.UsageError("--metric=ode_nll needs --workdir")
        from diffusion_jax.evaluation import ode_run

        report = ode_run.evaluate_ode_nll(o)
    elif streaming:  # sample through the engine and stream the batches into Inception
        from diffusion_jax.evaluation import fid_run

        report = fid_run.evaluate_fid(o)
    else:
        report = run.evaluate_samples(o)
    if jax.process_index() == 0:
        print((ode_run.format_table if o["metric"] == "ode_nll" else run.format_table)(report))
        print(f"report: {o['out']}")


_OURS = ("workdir", "metric", "data", "data_dir", "split", "num_samples", "batch_size", "t_chunk", "start",
         "stop", "seed", "timestep_respacing", "clip_denoised", "allow_resize", "ema_rate", "out", "samples",
         "ref", "inception_path", "coordinator_address", "num_processes", "process_id",
         "metrics", "save_every", "ode_probes", "ode_solver", "ode_rtol", "ode_atol", "ode_steps") + sampling_flags.NAMES

if __name__ == "__main__":
    cli.run_main(main)
