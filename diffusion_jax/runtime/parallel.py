"""Device mesh, shardings and host-local -> global arrays.

Data parallelism over every device of every host: a 1-D ('data',) mesh,
batches split along it (`P('data')`), parameters and keys replicated (`P()`).
Each host feeds only its own rows (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process run when flags or the environment say so.

    With explicit flags (or `JAX_COORDINATOR_ADDRESS` set), calls
    `jax.distributed.initialize`; on TPU pods and SLURM, where the environment
    describes the cluster, `initialize()` with no arguments discovers it
    (set `DIFFUSION_JAX_DISTRIBUTED=1`).  Single-process runs do nothing.
    On CPU, JAX's default cross-process collectives are gloo, so N local
    processes can stand in for N hosts.
    """
    if coordinator_address or num_processes or process_id is not None:
        if not (coordinator_address and num_processes and process_id is not None):
            raise ValueError("--coordinator_address, --num_processes and --process_id must be given together")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=int(num_processes),
                                   process_id=int(process_id))
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("DIFFUSION_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def define_multihost_flags() -> None:
    """The --coordinator_address/--num_processes/--process_id flags every program takes."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D ('data',) mesh over the first `num_devices` devices (default: all).

    Auto axes: current `jax.make_mesh` defaults to Explicit sharding-in-types,
    under which e.g. `nn.Embed`'s gather on a sharded batch raises.
    """
    n = num_devices or jax.device_count()
    if num_devices is not None and num_devices != jax.device_count():
        devices = np.array(jax.devices()[:n])
        return jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def check_batch_divisible(global_batch: int, mesh: jax.sharding.Mesh, what: str = "batch size") -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"{what} {global_batch} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n} (e.g. --config.train.batch_size={max(n, global_batch // n * n)})"
        )


def global_batch(mesh: jax.sharding.Mesh, local: dict) -> dict:
    """Host-local numpy batch (this process's rows) -> global arrays sharded on 'data'."""
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def put_global(mesh: jax.sharding.Mesh, x, spec=P()) -> jax.Array:
    """A host array that every process holds in full -> a global array with `spec`.

    Unlike `jax.device_put`, this also works when the mesh spans devices of
    other processes (each process fills only its own shards).
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


def replicated_key(mesh: jax.sharding.Mesh, seed: int) -> jax.Array:
    """`jax.random.key(seed)` replicated over the whole (possibly multi-host) mesh."""
    return jax.jit(lambda: jax.random.key(seed), out_shardings=replicated(mesh))()


def is_main_process() -> bool:
    """Only process 0 writes logs, images and JSON files."""
    return jax.process_index() == 0
