"""Huge pages for the large host buffers XLA:CPU allocates on every call.

XLA:CPU allocates each compiled program's temporaries as one buffer per
call (351 MB for the reference training step at batch 8) with
``posix_memalign`` from an Eigen worker thread. glibc serves a request that
large from a thread arena with a fresh ``mmap`` and returns it with
``munmap`` when the call ends, so every call faults the buffer in again, one
zeroed 4 KiB page at a time: 86,000 page faults per training step here, about
14 % of the step in the kernel (``perf``), ~1 us a page in a VM.

glibc >= 2.35 advises transparent huge pages on its ``mmap``-ed chunks when
started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: 2 MiB pages, 600
faults instead of 86,000. The tunable is read once, when the dynamic loader
starts, so a program that wants it has to be started with it: ``reexec()``
restarts the current Python command line with the tunable set, before
anything heavy is imported. Only the programs call it (train.py, sample.py,
evaluate.py, bench/), never the library. Figures: README "Benchmarks".
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DIFFUSION_JAX_NO_HUGEPAGE_MALLOC"  # set (to anything) to keep the process as started
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted(environ=None, libc=None, thp_mode: str | None = None) -> bool:
    """Whether restarting with the tunable would change anything here.

    True on Linux with glibc >= 2.35 when transparent huge pages are in
    ``madvise`` mode (with ``always`` every large mapping already gets them;
    with ``never`` none can), the tunable is not set yet and the opt-out
    variable is absent.
    """
    environ = os.environ if environ is None else environ
    if OPT_OUT in environ or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False
    name, version = libc if libc is not None else platform.libc_ver()
    try:
        if name != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
            return False
    except ValueError:
        return False
    if thp_mode is None:
        try:
            with open(_THP_MODE) as f:
                thp_mode = f.read()
        except OSError:
            return False
    return "[madvise]" in thp_mode


def environment(environ=None) -> dict:
    """A copy of the environment with the tunable appended to GLIBC_TUNABLES (':'-separated)."""
    env = dict(os.environ if environ is None else environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), TUNABLE]))
    return env


def reexec(execve=os.execve) -> None:
    """Restart this Python command line with glibc's huge-page tunable, when `wanted()`.

    Call first thing in a program's ``__main__``. Same PID, arguments and
    environment otherwise (``sys.orig_argv``); nothing is restarted when the
    command line is not a file or module (``python -c``, an interactive session).
    """
    argv = getattr(sys, "orig_argv", None)
    if not argv or not wanted() or "-c" in argv[1:2] or len(argv) < 2:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, [sys.executable, *argv[1:]], environment())
