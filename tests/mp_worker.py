"""One process of a multi-process run on localhost (spawned by multiprocess_test.py).

Usage: python tests/mp_worker.py MODE PROCESS_ID NUM_PROCESSES PORT OUT [WORKDIR [OVERRIDES_JSON]]
MODE "steps": three train steps on fixed global batches, this process feeding
its half; writes losses and params to OUT.  MODE "train": the whole
train.py program (tiny config, 2 steps, or OVERRIDES_JSON's dotted
overrides) into WORKDIR.  MP_DEVICES sets the devices per process (default 2).
"""
import json
import os
import sys

mode, pid, nproc, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.environ.get('MP_DEVICES', '2')}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
from diffusion_jax.runtime import parallel  # noqa: E402

parallel.initialize_distributed(f"localhost:{port}", nproc, pid)

import numpy as np  # noqa: E402

from tests import train_test  # noqa: E402

if mode == "steps":
    config = train_test._tiny(**{"optim.lr": 1e-4, "diffusion.schedule_sampler": "loss-second-moment"})
    mesh, state, step = train_test._setup(config, None)
    rng = parallel.replicated_key(mesh, 1)
    losses = []
    per = 8 // nproc
    for b in train_test._batches(3, 8):
        local = {k: v[pid * per:(pid + 1) * per] for k, v in b.items()}
        state, metrics = step(state, parallel.global_batch(mesh, local), rng)
        losses.append(float(metrics["loss"]))
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    params = {jax.tree_util.keystr(path): np.asarray(x).tolist() for path, x in flat}
    with open(out, "w") as f:
        json.dump({"losses": losses, "params": params, "devices": jax.device_count()}, f)
else:
    from diffusion_jax.training import loop as train_lib  # noqa: E402

    overrides = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {"train.num_steps": 2, "train.checkpoint_every": 2}
    config = train_test._tiny(**overrides)
    train_lib.train_and_evaluate(config, sys.argv[6])
    with open(out, "w") as f:
        json.dump({"ok": True, "process": jax.process_index()}, f)
jax.distributed.shutdown()
