"""XLA:CPU options for the programs, set before JAX starts its backend.

`set_cpu_flags()` is called by train.py, sample.py, evaluate.py, the
benchmarks and the test suite's conftest before anything imports JAX; the
library import itself changes nothing global. No effect on GPU/TPU.
"""

from __future__ import annotations

import os
from importlib import metadata


# XLA:CPU options this package sets before JAX starts its backend (no effect on GPU/TPU).
CPU_XLA_FLAGS = (
    # Convolutions and dots to Eigen, reductions to YNNPACK (default: all three to YNNPACK).
    "--xla_cpu_experimental_ynn_fusion_type=reduce",
    # 512-bit vectors in XLA's own elementwise loops on AVX-512 machines (default 256).
    "--xla_cpu_prefer_vector_width=512",
)


def set_cpu_flags() -> None:
    """Append CPU_XLA_FLAGS to XLA_FLAGS (jaxlib 0.10-0.11 only).

    jaxlib 0.10 sends convolutions and dots through YNNPACK, which runs the
    U-Net's convolutions ~1.5x slower than Eigen on x86 and its batched
    attention matmuls ~2x slower; reductions stay on YNNPACK, which is
    faster for them. Figures in bench/model.py's docstring. Each option is
    skipped when XLA_FLAGS already names it (set it yourself to choose);
    nothing is set on other jaxlib versions (the YNNPACK option is
    experimental and an unknown flag aborts XLA). XLA reads its flags when
    the backend starts, so this has no effect if a JAX computation ran before
    this call.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    try:
        major, minor = (int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return
    if (major, minor) not in ((0, 10), (0, 11)):
        return
    extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()

