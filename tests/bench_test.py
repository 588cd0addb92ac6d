"""bench/accelerator.py --smoke: one JSON object with every key, positive figures."""
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AcceleratorBenchTest(absltest.TestCase):

    def test_smoke_writes_the_report(self):
        out = os.path.join(tempfile.mkdtemp(prefix="bench_"), "bench.json")
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "accelerator.py"), "--smoke",
                               f"--out={out}"], env=env, capture_output=True, text=True, timeout=900)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        report = json.load(open(out))
        self.assertEqual(json.loads(proc.stdout), report)  # Printed and written: the same object.
        self.assertEqual(report["device_kind"], "cpu")
        self.assertIsNone(report["train"]["mfu"])  # No bf16 peak for a CPU.
        for kernels in ("xla", "cpu"):
            entry = report["kernels"][kernels]
            self.assertTrue(entry["has_kernels_field"])
            for remat in ("remat_on", "remat_off"):
                train = entry["train"][remat]
                for key in ("images_per_s", "tflops", "step_s", "compile_s"):
                    self.assertGreater(train[key], 0, f"{kernels} {remat} {key}")
                self.assertGreater(train["peak_bytes"], 0, f"{kernels} {remat} peak_bytes")
                self.assertIn(train["peak_bytes_source"], ("device", "memory_analysis"))
            for sample in entry["sample"].values():
                self.assertGreater(sample["images_per_s"], 0)
                self.assertGreater(sample["peak_bytes"], 0)
            self.assertEqual(sorted(s["steps"] for s in entry["sample"].values()), [5, 10])
            self.assertGreater(entry["nll"]["images_per_s"], 0)
            self.assertGreater(entry["nll"]["peak_bytes"], 0)
            self.assertEqual(entry["nll"]["timesteps"], 10)
        searched = report["kernels"]["xla"]["train"]["remat_off"]
        self.assertGreaterEqual(searched["max_batch_per_device"], 2)
        for key in ("images_per_s", "tflops", "mfu", "peak_bytes"):
            self.assertIn(key, report["train"])
        self.assertIsNotNone(report["train"]["peak_bytes"])  # on every backend, not only where the device counts
        self.assertGreater(report["sample"]["images_per_s"], 0)
        self.assertGreater(report["nll"]["images_per_s"], 0)


if __name__ == "__main__":
    absltest.main()
