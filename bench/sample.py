"""Sampling throughput of the reference benchmark network: ms per denoising step and images/s.

Network: UNet image 32, model_channels 64, num_res_blocks 2, attention at ds 2,
learned sigma (6 outputs), scale-shift norm, 4 heads, channel_mult (1, 2, 2, 2),
random weights.  Times the whole compiled chain (`p_sample_loop` /
`ddim_sample_loop`, one `lax.scan`) at batch 8 over 50 respaced steps of a
linear 1000-step schedule; compile time (lower + compile) is reported apart.

  python bench/sample.py [--batch 8] [--steps 50] [--repeats 2] [--dtype float32]

OpenAI's PyTorch loop (`p_sample_loop`, same network, batch 8) took ~306 ms
per step on the CPU dev machine.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, installed or not

from diffusion_jax.runtime import host_malloc  # noqa: E402
if __name__ == "__main__":
    host_malloc.reexec()  # huge pages for XLA:CPU's per-call buffers, before JAX loads
from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import sampling, schedules
from diffusion_jax.models import UNet

OPENAI_MS_PER_STEP = 306.0  # OpenAI's PyTorch p_sample_loop, batch 8, CPU dev machine


def build(dtype: str, batch: int):
    module = UNet(image_size=32, in_channels=3, model_channels=64, out_channels=6, num_res_blocks=2,
                  attention_resolutions=(2,), channel_mult=(1, 2, 2, 2), num_heads=4, use_scale_shift_norm=True,
                  dtype=dtype)
    x = jnp.zeros((batch, 32, 32, 3))
    params = jax.jit(module.init)(jax.random.key(0), x, jnp.zeros(batch, jnp.int32))["params"]
    # Init zeroes the output convs; perturb every leaf so the network is not trivially zero.
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [v + 0.02 * rng.standard_normal(v.shape).astype(np.float32) for v in leaves])
    return module, params


def make_loop(module, schedule, batch: int, ddim: bool):
    shape = (batch, 32, 32, 3)

    def run(params, rng):
        model_fn = lambda x, t, y: module.apply({"params": params}, x, t)
        kw = {"mean_type": "epsilon", "var_type": "learned_range", "clip_denoised": True}
        if ddim:
            return sampling.ddim_sample_loop(rng, model_fn, schedule, shape, eta=0.0, **kw)
        return sampling.p_sample_loop(rng, model_fn, schedule, shape, **kw)

    return jax.jit(run)


def bench(name, module, params, schedule, batch, repeats, ddim):
    fn = make_loop(module, schedule, batch, ddim)
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = fn.lower(params, rng).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, rng))  # warm-up
    times, cpu = [], []
    for i in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = compiled(params, jax.random.key(i + 1))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    best = min(times)
    # CPU seconds of this process: a contention-independent figure on a shared machine.
    cpu_ms_step = 1e3 * cpu[int(np.argmin(times))] / schedule.num_timesteps
    k = schedule.num_timesteps
    ms_step = 1e3 * best / k
    print(f"{name:9s} compile {compile_s:6.1f} s | {ms_step:8.1f} ms/step | {batch / best:7.3f} images/s "
          f"| chain {best:6.2f} s (best of {repeats}) | vs OpenAI {OPENAI_MS_PER_STEP / ms_step:5.1f}x "
          f"| process CPU {cpu_ms_step:7.1f} ms/step | finite {bool(np.isfinite(np.asarray(out)).all())}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    module, params = build(args.dtype, args.batch)
    schedule = schedules.make_schedule("linear", 1000, str(args.steps))
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
          f"batch {args.batch}, {args.steps} respaced steps, dtype {args.dtype}")
    bench("ancestral", module, params, schedule, args.batch, args.repeats, ddim=False)
    bench("ddim", module, params, schedule, args.batch, args.repeats, ddim=True)


if __name__ == "__main__":
    main()
