"""Two processes with jax.distributed on localhost (gloo collectives) vs one process."""
import json
import os
import socket
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl.testing import absltest

from tests import train_test

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(mode: str, nproc: int, workdir: str = "", overrides: dict | None = None,
           devices: int = 2) -> tuple[list[subprocess.Popen], list[str]]:
    """The worker processes (stdout+stderr piped) and the files they write their results to."""
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="mp_")
    outs = [os.path.join(tmp, f"out{i}.json") for i in range(nproc)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), MP_DEVICES=str(devices))
    extra = [json.dumps(overrides)] if overrides else []
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "mp_worker.py"), mode, str(i), str(nproc),
                               str(port), outs[i], workdir, *extra], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(nproc)]
    return procs, outs


def _launch(mode: str, nproc: int, workdir: str = "", overrides: dict | None = None,
            devices: int = 2) -> list[dict]:
    procs, outs = _start(mode, nproc, workdir, overrides, devices)
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.load(open(o)) for o in outs]


class MultiProcessTest(absltest.TestCase):

    def test_two_processes_match_one_process(self):
        results = _launch("steps", 2)
        self.assertEqual(results[0]["devices"], 4)
        config = train_test._tiny(**{"optim.lr": 1e-4, "diffusion.schedule_sampler": "loss-second-moment"})
        losses, state = train_test._run(config, 4, train_test._batches(3, 8))
        flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
        want = {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}
        for r in results:
            np.testing.assert_allclose(r["losses"], losses, rtol=1e-5, atol=1e-6)
            self.assertEqual(sorted(r["params"]), sorted(want))
            for key, value in want.items():
                np.testing.assert_allclose(np.asarray(r["params"][key]), value, rtol=1e-5, atol=1e-6, err_msg=key)

    def test_checkpoint_on_two_processes_resumes_on_one(self):
        # 2 processes x 2 devices train steps 1-2 and checkpoint; 1 process x 1 device resumes
        # for steps 3-4 (the data stream continues from its global position); the losses equal
        # an uninterrupted 8-device run's.  Flips on: they too are a function of (seed, position).
        from diffusion_jax.training import loop as train_lib

        base = {"optim.lr": 1e-4, "data.random_flip": True, "train.checkpoint_every": 2}
        reference = tempfile.mkdtemp(prefix="mp_ref_")
        train_lib.train_and_evaluate(train_test._tiny(**base, **{"train.num_steps": 4}), reference)
        workdir = tempfile.mkdtemp(prefix="mp_elastic_")
        _launch("train", 2, workdir, dict(base, **{"train.num_steps": 2}))
        _launch("train", 1, workdir, dict(base, **{"train.num_steps": 4}), devices=1)

        def losses(path):
            rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
            return [r["step"] for r in rows], np.array([r["loss"] for r in rows])

        steps, got = losses(workdir)
        want_steps, want = losses(reference)
        self.assertEqual(steps, [1, 2, 3, 4])
        self.assertEqual(want_steps, steps)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def test_sigterm_on_one_host_stops_every_host_at_the_same_step(self):
        # A preemption notice reaching one process only: both must checkpoint the same step (saving is a
        # collective; a lone saver would hang its peer) and exit cleanly, via JAX's preemption service.
        # Also the 2-process training run's bookkeeping: one checkpoint, metrics written once.
        workdir = tempfile.mkdtemp(prefix="mp_sigterm_")
        procs, outs = _start("train", 2, workdir, {"train.num_steps": 100000, "train.checkpoint_every": 100000,
                                                 "train.log_every": 1})
        for p in procs:
            self.addCleanup(p.kill)  # a hung peer (the bug this guards against) must not outlive the test
        metrics = os.path.join(workdir, "metrics.jsonl")
        deadline = time.time() + 300
        while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
            self.assertIsNone(procs[0].poll(), "training ended before the signal")
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=300)[0] for p in procs]
        for p, log in zip(procs, logs):
            self.assertEqual(p.returncode, 0, log[-3000:])
        stopped = [int(line.split("checkpointed step ")[1].split()[0]) for log in logs
                   for line in log.splitlines() if "checkpointed step" in line]
        self.assertLen(stopped, 2, logs)
        self.assertEqual(stopped[0], stopped[1])
        self.assertLess(stopped[0], 100000)
        saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
        self.assertEqual(saved, [stopped[0]])
        rows = [json.loads(line)["step"] for line in open(metrics)]
        self.assertEqual(rows, list(range(1, stopped[0] + 1)))  # each step once: process 0 alone writes metrics
        self.assertEqual(sorted(json.load(open(o))["process"] for o in outs), [0, 1])  # both ran to the end
