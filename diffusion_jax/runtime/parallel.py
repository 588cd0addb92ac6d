"""Device mesh, shardings and host-local -> global arrays.

Data parallelism over every device of every host, optionally fully sharded
(FSDP / ZeRO-3): a 2-D ('data', 'fsdp') mesh; batches are split over both axes
(`P(('data', 'fsdp'))`), keys are replicated (`P()`), and parameters,
optimizer moments and EMAs are either replicated (fsdp = 1) or each leaf is
split along its largest axis divisible by the 'fsdp' size (`fsdp_shardings`).
Each host feeds only its own rows (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import math
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


MESH_AXES = ("data", "fsdp")


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> jax.sharding.Mesh:
    """A ('data', 'fsdp') mesh of shape (n / fsdp, fsdp) over the first `num_devices` devices.

    Args:
      num_devices: devices to use (default: all, of every process).
      fsdp: size of the 'fsdp' axis, over which parameters and optimizer state
        are split; must divide the device count.

    Auto axes: current `jax.make_mesh` defaults to Explicit sharding-in-types,
    under which e.g. `nn.Embed`'s gather on a sharded batch raises.
    """
    n = num_devices or jax.device_count()
    fsdp = int(fsdp)
    if fsdp < 1 or n % fsdp:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ValueError(f"config.parallel.fsdp={fsdp} does not divide the {n} devices; "
                         f"use one of {divisors} (e.g. --config.parallel.fsdp={max(d for d in divisors if d <= max(fsdp, 1))})")
    shape, auto = (n // fsdp, fsdp), (jax.sharding.AxisType.Auto,) * 2
    if num_devices is not None and num_devices != jax.device_count():
        devices = np.array(jax.devices()[:n]).reshape(shape)
        return jax.sharding.Mesh(devices, MESH_AXES, axis_types=auto)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)


def batch_spec(mesh: jax.sharding.Mesh) -> P:
    """The batch dimension split over every mesh axis (`P(('data', 'fsdp'))`; `P('data')` on 1-D meshes)."""
    names = tuple(mesh.axis_names)
    return P(names if len(names) > 1 else names[0])


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows split over all devices: every device holds B / mesh.size of them."""
    return NamedSharding(mesh, batch_spec(mesh))


def fsdp_size(mesh: jax.sharding.Mesh) -> int:
    return int(mesh.shape.get("fsdp", 1))


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """The partition of one leaf: its largest axis divisible by `fsdp` split on 'fsdp'.

    Leaves with fewer than `min_size` elements, or with no divisible axis, are
    replicated (`P()`); ties go to the last such axis (a kernel's output channels).
    """
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    axes = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not axes:
        return P()
    best = max(axes, key=lambda i: (shape[i], i))
    return P(*([None] * best + ["fsdp"]))


def fsdp_shardings(mesh: jax.sharding.Mesh, tree, min_size: int = 2**12):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) by `fsdp_spec`'s rule."""
    f = fsdp_size(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), f, min_size)), tree)


def check_batch_divisible(global_batch: int, mesh: jax.sharding.Mesh, what: str = "batch size") -> None:
    n = mesh.devices.size
    if global_batch % n:
        shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
        raise ValueError(
            f"{what} {global_batch} is not divisible by the {n} devices of the mesh ({shape}); "
            f"use a multiple of {n} (e.g. --config.train.batch_size={max(n, global_batch // n * n)})"
        )


def per_device_bytes(tree, device=None) -> int:
    """Bytes of `tree`'s arrays held on `device` (default: this process's first device)."""
    device = device or jax.local_devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def global_batch(mesh: jax.sharding.Mesh, local: dict) -> dict:
    """Host-local numpy batch (this process's rows) -> global arrays split over every device."""
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
