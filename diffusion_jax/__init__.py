"""diffusion_jax: Improved DDPM / ADM / classifier-free guidance / GLIDE in JAX.

Layers (imports run one way only):
  math           schedules, gaussian, likelihood, objectives, sampling, guidance
  models         models/ (Flax modules; no diffusion math)
  orchestration  data/, parallel, train_lib, checkpoints, evaluation/, convert
"""

import os as _os
from importlib import metadata as _metadata

__version__ = "0.1.0"

# XLA:CPU option this package sets before JAX starts its backend (no effect on GPU/TPU).
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type=reduce,individual_dot"


def _prefer_eigen_convolutions() -> None:
    """Route XLA:CPU convolutions to Eigen instead of YNNPACK (jaxlib 0.10-0.11 only).

    jaxlib 0.10's default sends convolutions through YNNPACK, which runs the
    U-Net's convolutions ~1.5x slower on x86 than Eigen (figures in
    bench/model.py's docstring; ``--xla_flags`` there compares the two).
    Matmuls and reductions stay on YNNPACK. Skipped when XLA_FLAGS already
    names the option (set it yourself to choose) and on other jaxlib versions
    (the option is experimental and an unknown flag aborts XLA). XLA reads
    its flags when the backend starts, so this has no effect if a JAX
    computation ran before ``import diffusion_jax``.
    """
    flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return
    try:
        major, minor = (int(p) for p in _metadata.version("jaxlib").split(".")[:2])
    except (_metadata.PackageNotFoundError, ValueError):
        return
    if (major, minor) in ((0, 10), (0, 11)):
        _os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()


_prefer_eigen_convolutions()
