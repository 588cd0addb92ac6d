"""The training work directory's safety: one writer at a time, atomic JSON, metrics trimmed on resume.

The lock is `fcntl.flock` on `<workdir>/.lock`: the kernel releases it when
the holding process exits or dies (even `kill -9`), so a crash never leaves a
stale lock behind.  Multi-host runs: only process 0 takes it and every process
learns the result (all stop together).  Shared filesystems: Linux NFS (v4, or
v3 with lockd) maps `flock` to byte-range locks that other clients see;
filesystems without locking (some FUSE/object-store mounts) answer ENOLCK /
EOPNOTSUPP, and then training goes on unlocked after a warning.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import sys

from diffusion_jax.runtime.cli import RunError, UsageError

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"


def warn(text: str) -> None:
    """A warning users must see (not hidden with the library logs)."""
    print(f"WARNING: {text}", file=sys.stderr, flush=True)


def check_workdir(workdir: str) -> None:
    """Refuse a workdir that is a file, or that exists but cannot be written (nothing is created)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UsageError(f"--workdir={workdir} is a file, not a directory; pass a directory")
    parent = workdir if os.path.isdir(workdir) else _existing_parent(workdir)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"cannot write to {parent} (permission denied); pass a --workdir you can write")


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UsageError(f"--workdir: {path} is a file, not a directory")
    return path


class WorkdirLock:
    """An exclusive `flock` on `<workdir>/.lock` for the life of a training run.

    Opening an existing lock file does not change it; the owner's pid, host
    and start time are written only once the lock is held (for the message
    another process gets).
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd = None

    def acquire(self) -> bool:
        """Take the lock; False if another process holds it; True (with a warning) if locks are unsupported."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                return False
            warn(f"{self.path}: this filesystem cannot lock files ({e.strerror}); nothing stops a second "
                 "trainer on this workdir")
        self._fd = fd
        return True

    def owner(self) -> str:
        try:
            with open(self.path) as f:
                return f.read().strip() or "another process"
        except OSError:
            return "another process"

    def write_owner(self) -> None:
        if self._fd is None:
            return
        now = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since {now}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # Closing releases the flock.
            self._fd = None


def lock_workdir(workdir: str, *, is_main: bool, broadcast=None) -> WorkdirLock | None:
    """Process 0 locks `workdir`; every process raises `RunError` if it is held elsewhere.

    Args:
      broadcast: `int -> int`, process 0's value on every process (multi-host);
        None for single-process runs.
    """
    lock = WorkdirLock(workdir) if is_main else None
    ok = int(lock.acquire()) if lock is not None else 1
    if broadcast is not None:
        ok = int(broadcast(ok))
    if not ok:
        who = lock.owner() if lock is not None else "another process"
        raise RunError(f"{workdir} is in use by {who}: one trainer per workdir (wait for it, stop it, "
                       "or pass another --workdir)")
    return lock


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to `path` through a temporary file and a rename: readers see the old or the new file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def trim_metrics(workdir: str, last_step: int) -> int:
    """Drop `metrics.jsonl` rows with `step > last_step` (those steps are trained again); atomic.

    Rows that are not JSON objects with a step (a line cut by a crash) are
    dropped too.  Returns the number of rows removed.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            keep.append(line if line.endswith("\n") else line + "\n")
    removed = len(lines) - len(keep)
    if removed:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return removed


def move_aside(checkpoint_root: str, step: int) -> str:
    """Move `<root>/<step>` to `<root>/corrupt/<step>-<time>` (never deleted); returns the new path."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(checkpoint_root, "corrupt", f"{step}-{stamp}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(os.path.join(checkpoint_root, str(step)), dest)
    return dest


class StopRequests:
    """SIGTERM and a first Ctrl-C ask the training loop to checkpoint and stop; a second Ctrl-C ends it at once.

    The loop calls `should_stop(step)` after every step, on every process.  With one process that is the local
    request.  With several, every process must checkpoint at the *same* step (saving is collective), so the
    decision goes through JAX's preemption service, which `jax.distributed.initialize` starts: its SIGTERM
    handler on each host reports the notice to the coordinator, which picks the step after the furthest host's
    and makes `multihost_utils.reached_preemption_sync_point` true on every host at that step.  So SIGTERM is
    left to that handler, and a first Ctrl-C on any host re-raises itself as SIGTERM to join the same protocol.

    Installs its handlers only in the main thread (elsewhere Python refuses).
    """

    def __init__(self):
        self.requested = False  # stop after this step (on every process at once)
        self.signal_name = None
        self._old = {}
        self._multihost = False

    def __enter__(self):
        import signal

        self._multihost = _preemption_service_running()
        for sig in (signal.SIGINT,) if self._multihost else (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass
        return self

    def _handler(self, signum, frame):
        import signal

        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # The OS default for the next one: it ends the process even inside a long XLA call.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            print("\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: stop at once, "
                  "losing the steps since the last checkpoint)", file=sys.stderr, flush=True)
        if self._multihost:  # every host learns of it through JAX's preemption service
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.requested = True

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint `step` and stop; with several processes, true on all of them at the same step."""
        if self._multihost and not self.requested:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = True
                self.signal_name = self.signal_name or "SIGTERM (on another host)"
        return self.requested

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _preemption_service_running() -> bool:
    """True in a multi-process run whose JAX preemption service is on (`jax.distributed.initialize` starts it)."""
    import jax
    from jax._src import distributed  # the service's handle has no public accessor

    return jax.process_count() > 1 and getattr(distributed.global_state, "preemption_sync_manager", None) is not None
