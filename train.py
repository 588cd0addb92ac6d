"""Train a diffusion model (or a noisy classifier): `python train.py [--config=...] [--workdir=...]`.

With no flags it trains configs/digits.py into runs/digits.  Re-running with
the same workdir resumes from its newest checkpoint.  Override any config
field: `--config.train.batch_size=256`.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from diffusion_jax.runtime import host_malloc  # noqa: E402
if __name__ == "__main__":
    host_malloc.reexec()  # huge pages for XLA:CPU's per-call buffers, before JAX loads
from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
from diffusion_jax.runtime import cli, parallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `configs` importable from anywhere

config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "configs", "digits.py"),
                                "Config file (ml_collections).", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory (default: runs/<config name>).")
parallel.define_multihost_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv

    from diffusion_jax.training import loop as train_lib

    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename or "digits"))[0]
    workdir = FLAGS.workdir or os.path.join("runs", name)
    train_lib.train_and_evaluate(cli.load_config_flag("config"), workdir)


if __name__ == "__main__":
    cli.run_main(main)
