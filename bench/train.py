"""Train-step benchmark: ms/step, images/s, compile time, peak memory.

The reference benchmark config: image 32, 64 channels, 2 res blocks,
attention at 16 px, learned sigma, scale-shift norm, cosine T=1000, L_hybrid
(rescaled_mse), AdamW, batch 8 -- the whole compiled data-parallel step
(sampling t and noise, forward, backward, AdamW, EMA).  OpenAI's PyTorch step
took ~1.1 s on the 2-core CPU machine this project is developed on.

  python bench/train.py [--batch 8] [--steps 10] [--dtype bfloat16] [--remat]
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.runtime import host_malloc  # noqa: E402
if __name__ == "__main__":
    host_malloc.reexec()  # huge pages for XLA:CPU's per-call buffers, before JAX loads
from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from diffusion_jax.runtime import parallel  # noqa: E402
from diffusion_jax.training import loop as train_lib
from diffusion_jax.training import steps as train_steps


def reference_config(batch: int, dtype: str, remat: bool):
    c = default.get_config()
    c.model.update(image_size=32, in_channels=3, out_channels=6, model_channels=64, num_res_blocks=2,
                   attention_resolutions=(2,), channel_mult=(1, 2, 2, 2), num_heads=4, use_scale_shift_norm=True,
                   dtype=dtype, use_checkpoint=remat)
    c.diffusion.update(noise_schedule="cosine", diffusion_steps=1000, var_type="learned_range",
                       loss_type="rescaled_mse")
    c.data.update(image_size=32, channels=3)
    c.train.update(batch_size=batch, ema_rates=(0.9999,))
    return c


def peak_memory() -> str:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return f"device peak {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
    return f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--remat", action="store_true")
    args = ap.parse_args()
    config = reference_config(args.batch, args.dtype, args.remat)
    mesh = parallel.make_mesh()
    schedule = train_lib.make_schedule(config)
    spec = train_lib.make_spec(config, schedule)
    model = train_lib.make_model(config)
    tx, _ = train_steps.make_optimizer(num_steps=10**6, **config.optim.to_dict())
    state = jax.jit(lambda k: train_steps.init_state(train_lib.init_params(model, config, k), tx, spec),
                    out_shardings=parallel.replicated(mesh))(jax.random.key(0))
    step = train_steps.compile_step(mesh, model=model, schedule=schedule, spec=spec, tx=tx)
    rng = parallel.replicated_key(mesh, 1)
    host = np.random.RandomState(0)
    batch = parallel.global_batch(mesh, {"image": host.uniform(-1, 1, (args.batch, 32, 32, 3)).astype(np.float32)})
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, batch, rng)
    jax.block_until_ready(m)
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, m = compiled(state, batch, rng)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    ms = 1e3 * float(np.median(times))
    print(f"backend={jax.default_backend()} devices={jax.device_count()} batch={args.batch} dtype={args.dtype} "
          f"remat={args.remat}")
    print(f"train step: median {ms:.1f} ms (min {1e3 * min(times):.1f}, {args.steps} steps), "
          f"{args.batch / (ms / 1e3):.1f} images/s, compile {compile_s:.1f} s, {peak_memory()}")
    # On a shared machine wall time is inflated; CPU seconds per step show the work itself.
    print(f"process CPU time per step: median {1e3 * float(np.median(cpu)):.1f} ms (all threads)")


if __name__ == "__main__":
    main()
