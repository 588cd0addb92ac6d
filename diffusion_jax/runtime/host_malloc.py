"""How the programs' host memory is allocated: XLA:CPU's per-call buffers without page faults.

XLA:CPU allocates each compiled program's temporaries as one buffer per call
(351-500 MB for the reference training step at batch 8) with
``posix_memalign``. glibc serves a request that large with a fresh ``mmap``
and unmaps it when the call ends, so every call faults the whole buffer in
again and the kernel zeroes every page: 86,000 page faults and ~14 % of a
training step in the kernel (``perf``: ``clear_page_erms``, ``exc_page_fault``).

Two remedies, both glibc tunables, which glibc reads only when a process
starts, hence ``reexec()``: it restarts the current Python command line once
with them set, first thing in a program's ``__main__``:

- ``glibc.malloc.hugetlb=1`` (glibc >= 2.35, transparent huge pages in
  ``madvise`` mode): 2 MiB pages for ``mmap``-ed chunks, 600 faults a step
  instead of 86,000. The pages are still zeroed on every call.
- CPU-only runs (no accelerator plugin installed, or ``JAX_PLATFORMS=cpu``):
  ``glibc.malloc.mmap_max=0`` and a 4 GB ``trim_threshold`` keep large
  blocks in the main heap once allocated, and synchronous dispatch
  (``jax_cpu_enable_async_dispatch=False``) runs single-device computations
  on the calling thread, so that the temporaries come from that heap:
  reused, never faulted or zeroed again. The process keeps its peak heap for
  its lifetime, as an accelerator runtime keeps its pool. A worker thread
  allocates from its own glibc arena, and an arena other than the main one
  falls back to ``mmap`` for a block over 64 MiB whatever ``mmap_max`` says:
  without synchronous dispatch the tunables change nothing (measured: 750
  huge-page faults and ~15 % of a training step in ``clear_page_erms``).

JAX reads no environment variable for the dispatch option (it is a config
flag), so the restart passes ``JAX_CPU_ENABLE_ASYNC_DISPATCH=false`` and
``reexec`` applies it with ``jax.config.update`` in the restarted process;
set that variable yourself to ``true`` or ``false`` to choose.

Only the programs call ``reexec`` (train.py, sample.py, evaluate.py, bench/),
never the library. ``DIFFUSION_JAX_NO_HOST_MALLOC=1`` keeps a process as
started. Figures: README "Benchmarks".
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

OPT_OUT = "DIFFUSION_JAX_NO_HOST_MALLOC"  # set (to anything) to keep the process as started
_DONE = "DIFFUSION_JAX_HOST_MALLOC"  # set in the restarted process: never restart twice
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
ASYNC_DISPATCH = "JAX_CPU_ENABLE_ASYNC_DISPATCH"  # ours: JAX has the config flag only
HUGE_PAGES = ("glibc.malloc.hugetlb", "1")
KEEP_HEAP = (("glibc.malloc.mmap_max", "0"), ("glibc.malloc.trim_threshold", "4000000000"))
# JAX's accelerator plugins: with one installed the backend may not be the CPU, so the heap stays as is.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_only(environ=None) -> bool:
    """True when JAX can only pick the CPU: ``JAX_PLATFORMS=cpu``, or no accelerator plugin installed."""
    environ = os.environ if environ is None else environ
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms == ["cpu"]
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def settings(environ=None, libc=None, thp_mode: str | None = None, cpu: bool | None = None) -> dict:
    """The environment variables a restart would set here; {} when it would change nothing.

    Tunables the user already set in GLIBC_TUNABLES are left as they are, as is
    JAX_CPU_ENABLE_ASYNC_DISPATCH.
    """
    environ = os.environ if environ is None else environ
    if OPT_OUT in environ or _DONE in environ:
        return {}
    name, version = libc if libc is not None else platform.libc_ver()
    try:
        if name != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
            return {}
    except ValueError:
        return {}
    thp_mode = _read(_THP_MODE) if thp_mode is None else thp_mode
    cpu = cpu_only(environ) if cpu is None else cpu
    wanted = ([HUGE_PAGES] if "[madvise]" in thp_mode else []) + (list(KEEP_HEAP) if cpu else [])
    existing = environ.get("GLIBC_TUNABLES", "")
    taken = {item.split("=")[0] for item in existing.split(":") if item}
    added = [f"{k}={v}" for k, v in wanted if k not in taken]
    if not added:
        return {}
    out = {"GLIBC_TUNABLES": ":".join(filter(None, [existing, *added])), _DONE: "1"}
    if cpu and ASYNC_DISPATCH not in environ:
        out[ASYNC_DISPATCH] = "false"
    return out


def reexec(execve=os.execve) -> None:
    """Restart this Python command line with `settings()`, when there are any.

    Call first thing in a program's ``__main__``. Same PID, arguments and
    environment otherwise (``sys.orig_argv``); nothing is restarted for
    ``python -c`` or an interactive session.
    """
    argv = getattr(sys, "orig_argv", None)
    if not argv or len(argv) < 2 or argv[1] == "-c":
        return
    extra = settings()
    if not extra:
        apply_dispatch()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, [sys.executable, *argv[1:]], {**os.environ, **extra})


def apply_dispatch(environ=None) -> bool | None:
    """``JAX_CPU_ENABLE_ASYNC_DISPATCH`` (``true``/``false``) as JAX's CPU dispatch option; None if unset.

    Must run before the CPU backend starts (the first computation); imports
    JAX but starts nothing.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(ASYNC_DISPATCH, "").strip().lower()
    if value not in ("true", "false", "1", "0"):
        return None
    import jax

    enabled = value in ("true", "1")
    jax.config.update("jax_cpu_enable_async_dispatch", enabled)
    return enabled
