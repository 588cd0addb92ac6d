"""A work directory no mistake can destroy, fallbacks that finish the job, errors without tracebacks.

One tiny run (configs/tiny.py, checkpoints at steps 2 and 4) is trained once;
each case works on a copy.  Every refused command must leave the run's files
byte-identical (hash of every path and file before and after).
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from absl.testing import absltest

from configs import tiny
from diffusion_jax.runtime import checkpoints, cli
from diffusion_jax.runtime import workdir as wd
from diffusion_jax.training import loop as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**overrides):
    c = tiny.get_config()
    for dotted, value in overrides.items():
        group, key = dotted.split(".")
        c[group][key] = value
    return c


def tree_hash(path: str) -> str:
    """sha256 over every relative path and file content under `path`."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _steps(workdir: str) -> list[int]:
    return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _run(args: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def _one_line_error(test, proc, status: int, *fragments: str) -> None:
    test.assertEqual(proc.returncode, status, proc.stderr[-3000:])
    test.assertNotIn("Traceback", proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    test.assertLen(errors, 1, proc.stderr[-3000:])
    for fragment in fragments:
        test.assertIn(fragment, proc.stderr)


class TrainedWorkdirTest(absltest.TestCase):
    """Cases on copies of one trained tiny run."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.base = tempfile.mkdtemp(prefix="robust_base_")
        train_lib.train_and_evaluate(_tiny(), cls.base)

    def _copy(self) -> str:
        dest = os.path.join(tempfile.mkdtemp(prefix="robust_"), "run")
        shutil.copytree(self.base, dest)
        return dest

    def test_base_run(self):
        self.assertEqual(_steps(self.base), [1, 2, 3, 4])
        self.assertEqual(sorted(os.listdir(os.path.join(self.base, "checkpoints"))), ["2", "4"])

    def test_refused_settings_touch_nothing(self):
        workdir = self._copy()
        before = tree_hash(workdir)
        cases = [({"train.keep_checkpoints": 0}, "keep_checkpoints=0 must be at least 1"),
                 ({"train.checkpoint_every": 0}, "checkpoint_every=0"),
                 ({"train.log_every": 0}, "log_every=0"),
                 ({"train.ema_rates": (0.9, 1.5)}, "ema_rates"),
                 ({"data.train_split": "nosuch"}, "nosuch"),
                 ({"model.model_channels": 64}, "model.model_channels: checkpoint has 32"),
                 ({"optim.grad_clip": 1.0}, "does not fit this config")]
        for overrides, fragment in cases:
            with pytest.raises(ValueError, match=fragment):
                train_lib.train_and_evaluate(_tiny(**overrides), workdir)
            self.assertEqual(tree_hash(workdir), before, overrides)

    def test_other_model_refused_without_checkpoints(self):
        workdir = self._copy()
        shutil.rmtree(os.path.join(workdir, "checkpoints"))
        before = tree_hash(workdir)
        with pytest.raises(checkpoints.WorkdirMismatchError, match="holds a different model"):
            train_lib.train_and_evaluate(_tiny(**{"model.num_res_blocks": 2}), workdir)
        self.assertEqual(tree_hash(workdir), before)

    def test_second_trainer_is_refused(self):
        workdir = self._copy()
        before = tree_hash(workdir)
        holder = wd.WorkdirLock(workdir)
        self.assertTrue(holder.acquire())
        try:
            with pytest.raises(cli.RunError, match="is in use by pid .* one trainer per workdir"):
                train_lib.train_and_evaluate(_tiny(), workdir)
        finally:
            holder.release()
        self.assertEqual(tree_hash(workdir), before)

    def test_converter_refuses_a_training_workdir(self):
        workdir = self._copy()
        before = tree_hash(workdir)
        proc = _run(["-m", "diffusion_jax.convert", "--checkpoint=missing.pt", "--preset=base", f"--out={workdir}"])
        _one_line_error(self, proc, 2, "not a converted checkpoint", "--overwrite")
        self.assertEqual(tree_hash(workdir), before)

    def test_corrupt_newest_is_moved_aside_and_saved_again(self):
        workdir = self._copy()
        for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "4", "state")):
            for name in files:
                open(os.path.join(root, name), "w").close()
        before = tree_hash(workdir)
        _, _, cfg = checkpoints.load_for_inference(workdir)  # sample.py's view: the newest readable step
        self.assertEqual(cfg["checkpoint_step"], 2)
        self.assertEqual(tree_hash(workdir), before)  # inference moves nothing
        train_lib.train_and_evaluate(_tiny(), workdir)  # same num_steps: steps 3, 4 again
        moved = glob.glob(os.path.join(workdir, "checkpoints", "corrupt", "4-*"))
        self.assertLen(moved, 1)
        self.assertEqual(sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()),
                         ["2", "4"])
        self.assertEqual(_steps(workdir), [1, 2, 3, 4])  # each step once
        _, params, cfg = checkpoints.load_for_inference(workdir)
        self.assertEqual(cfg["checkpoint_step"], 4)
        _, base_params, _ = checkpoints.load_for_inference(self.base)
        import chex
        chex.assert_trees_all_close(params, base_params, rtol=1e-5, atol=1e-6)  # exact resume from step 2

    def test_ema_rates_change_on_resume(self):
        workdir = self._copy()
        _, ema99, _ = checkpoints.load_for_inference(workdir, ema_rate=0.99)
        train_lib.train_and_evaluate(_tiny(**{"train.ema_rates": (0.9, 0.999), "train.num_steps": 5}), workdir)
        self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints", "corrupt")))
        self.assertEqual(json.load(open(os.path.join(workdir, "config.json")))["train"]["ema_rates"], [0.9, 0.999])
        _, _, cfg = checkpoints.load_for_inference(workdir, ema_rate=0.999)
        self.assertEqual(cfg["checkpoint_step"], 5)
        with pytest.raises(cli.UsageError, match="not one of the EMA rates .* at step 5"):
            checkpoints.load_for_inference(workdir, ema_rate=0.99)
        # The older checkpoints keep the dropped EMA: step 4 still serves --ema_rate=0.99.
        shutil.rmtree(os.path.join(workdir, "checkpoints", "5"))
        _, again, cfg = checkpoints.load_for_inference(workdir, ema_rate=0.99)
        self.assertEqual(cfg["checkpoint_step"], 4)
        for a, b in zip(_leaves(again), _leaves(ema99), strict=True):
            np.testing.assert_array_equal(a, b)
        self.assertEqual(_steps(workdir), [1, 2, 3, 4, 5])


def _leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


class EmaAdaptTest(absltest.TestCase):

    def test_kept_new_and_dropped_rates(self):
        import jax.numpy as jnp
        from flax import struct

        @struct.dataclass
        class S:
            params: dict
            ema_params: tuple

        state = S(params={"w": jnp.full(3, 7.0)}, ema_params=({"w": jnp.full(3, 1.0)}, {"w": jnp.full(3, 2.0)}))
        out = checkpoints._adapt_emas(state, [0.9, 0.99], (0.99, 0.5), step=4)
        np.testing.assert_array_equal(out.ema_params[0]["w"], 2.0)  # kept, by rate not by position
        np.testing.assert_array_equal(out.ema_params[1]["w"], 7.0)  # new: starts from the params
        self.assertLen(out.ema_params, 2)


class WorkdirUnitTest(absltest.TestCase):

    def test_trim_metrics(self):
        d = tempfile.mkdtemp()
        rows = [{"step": s, "loss": s} for s in (1, 2, 3, 4, 3, 4)]
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
        self.assertEqual(wd.trim_metrics(d, 2), 5)
        self.assertEqual(_steps(d), [1, 2])
        self.assertEqual(wd.trim_metrics(d, 2), 0)

    def test_crashed_holder_leaves_no_lock(self):
        d = tempfile.mkdtemp()
        code = ("import os, signal, sys; from diffusion_jax.runtime.workdir import WorkdirLock; "
                f"lock = WorkdirLock({d!r}); assert lock.acquire(); lock.write_owner(); "
                "print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
        proc = _run(["-c", code])
        self.assertEqual(proc.returncode, -signal.SIGKILL)
        self.assertIn("held", proc.stdout)
        lock = wd.WorkdirLock(d)
        self.assertTrue(lock.acquire())  # the kernel released the dead holder's lock
        other = wd.WorkdirLock(d)
        self.assertFalse(other.acquire())
        lock.release()

    def test_second_ctrl_c_ends_at_once(self):
        code = ("import os, signal, time; from diffusion_jax.runtime.workdir import StopRequests\n"
                "with StopRequests() as s:\n"
                "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
                "    print('requested', s.requested, s.signal_name, flush=True)\n"
                "    os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
                "    print('still running', flush=True)\n")
        proc = _run(["-c", code])
        self.assertIn("requested True SIGINT", proc.stdout)
        self.assertNotIn("still running", proc.stdout)
        self.assertEqual(proc.returncode, -signal.SIGINT)

    def test_bugs_keep_their_traceback(self):
        def bug():
            raise TypeError("a bug")
        with pytest.raises(TypeError):
            cli.handle(bug, prog="x", verbose=False)
        self.assertEqual(cli.handle(lambda: (_ for _ in ()).throw(cli.UsageError("u")), prog="x", verbose=False), 2)
        self.assertEqual(cli.handle(lambda: (_ for _ in ()).throw(cli.RunError("r")), prog="x", verbose=False), 1)


class CommandLineTest(absltest.TestCase):
    """Exit statuses and one-line messages of the programs (no training)."""

    def test_train_usage_errors(self):
        tmp = tempfile.mkdtemp()
        a_file = os.path.join(tmp, "file")
        open(a_file, "w").close()
        cases = [(["--config.train.foo=1"], "unknown config field 'foo' in --config.train.foo"),
                 (["--config=configs/nope.py"], "configs/nope.py: cannot load the config file (no such file)"),
                 (["--config.train.log_every=0"], "log_every=0 must be at least 1"),
                 ([f"--workdir={a_file}"], "is a file, not a directory")]
        for extra, fragment in cases:
            args = ["train.py", "--config=configs/tiny.py", f"--workdir={tmp}/run"] + extra
            _one_line_error(self, _run(args), 2, fragment)
        self.assertEqual(sorted(os.listdir(tmp)), ["file"])  # nothing was created
        verbose = _run(["train.py", "--config=configs/tiny.py", f"--workdir={tmp}/run",
                        "--config.train.log_every=0", "--verbosity=1"])
        self.assertEqual(verbose.returncode, 2)
        self.assertIn("Traceback", verbose.stderr)

    def test_sample_and_evaluate_inputs(self):
        tmp = tempfile.mkdtemp()
        _one_line_error(self, _run(["sample.py", f"--workdir={tmp}/nothing"]), 2, "has no config.json")
        floats = os.path.join(tmp, "floats.npz")
        np.savez(floats, arr_0=np.random.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32))
        ref = os.path.join(tmp, "ref.npz")
        np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
        proc = _run(["evaluate.py", "--metric=fid", f"--samples={floats}", f"--ref={ref}"])
        _one_line_error(self, proc, 2, "arr_0 is float32", "uint8")
        proc = _run(["evaluate.py", "--metric=fid", f"--samples={tmp}/missing.npz", f"--ref={ref}"])
        _one_line_error(self, proc, 2, "--samples=", "no such file")


class InterruptTest(absltest.TestCase):

    def test_ctrl_c_checkpoints_and_exits_cleanly(self):
        workdir = os.path.join(tempfile.mkdtemp(), "run")
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = subprocess.Popen([sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
                                 "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = os.path.join(workdir, "metrics.jsonl")
        deadline = time.time() + 600
        while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        self.assertEqual(proc.returncode, 0, err[-3000:])
        self.assertNotIn("Traceback", err)
        saved = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
        self.assertLen(saved, 1)
        self.assertIn(f"SIGINT: checkpointed step {saved[0]}", out)
        self.assertEqual(_steps(workdir)[-1], saved[0])


if __name__ == "__main__":
    absltest.main()
