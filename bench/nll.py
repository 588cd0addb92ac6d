"""Full-chain NLL throughput (images/s) of the reference benchmark network at T = 1000.

Network: UNet image 32, model_channels 64, num_res_blocks 2, attention at ds 2,
learned sigma (6 outputs), scale-shift norm, 4 heads, channel_mult (1, 2, 2, 2),
random weights.  Times `--chunks` timestep chunks of the runner's jitted step
(`nll.terms_at`, which `chain_terms` maps over) and extrapolates to all
ceil(T / t_chunk) chunks unless `--full`, which runs the whole chain.

  python bench/nll.py [--batch 8] [--t_chunk 8] [--chunks 2] [--full]

OpenAI's `calc_bpd_loop` runs one batch forward per timestep: at the ~281 ms
per batch-8 forward measured for this network on the CPU machine, that is
~281 s per 8 images (T = 1000), i.e. 0.028 images/s.
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

from diffusion_jax import schedules
from diffusion_jax.evaluation import nll
from diffusion_jax.models import UNet

OPENAI_MS_PER_B8_FORWARD = 281.0  # measured with OpenAI's PyTorch UNet on the CPU dev machine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--t_chunk", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=2, help="timed chunks (after one warm-up)")
    ap.add_argument("--full", action="store_true", help="time the whole chain instead of extrapolating")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    module = UNet(image_size=32, in_channels=3, model_channels=64, out_channels=6, num_res_blocks=2,
                  attention_resolutions=(2,), channel_mult=(1, 2, 2, 2), num_heads=4, use_scale_shift_norm=True,
                  dtype=args.dtype)
    b = args.batch
    x = jax.random.randint(jax.random.key(1), (b, 32, 32, 3), 0, 256).astype(jnp.float32) / 127.5 - 1.0
    params = jax.jit(module.init)(jax.random.key(0), x, jnp.zeros(b, jnp.int32))["params"]
    schedule = schedules.make_schedule("linear", 1000)
    k = schedule.num_timesteps
    apply = nll.module_apply(module)
    index = jnp.arange(b, dtype=jnp.int32)
    rng = jax.random.key(0)
    kw = dict(mean_type="epsilon", var_type="learned_range", clip_denoised=True)
    n_chunks = -(-k // args.t_chunk)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; batch {b}, t_chunk {args.t_chunk} "
          f"({b * args.t_chunk} images per forward), T = {k}, dtype {args.dtype}")

    if args.full:
        mesh = nll.make_mesh()
        step = nll.make_chain_fn(apply, schedule, mesh=mesh, t_chunk=args.t_chunk, **kw)
        batch = nll.global_batch(mesh, {"image": np.asarray(x), "index": np.asarray(index),
                                        "valid": np.ones(b, bool)})
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, batch, rng))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, batch, rng))
        per_batch = time.perf_counter() - t0
        how = f"measured (whole chain; first call incl. compile {compile_s:.1f} s)"
    else:
        chunk = jax.jit(lambda p, tc: nll.terms_at(lambda xt, ts, yy: apply(p, xt, ts, yy), schedule, x, None,
                                                   index, jnp.broadcast_to(tc, (b, args.t_chunk)), rng, **kw))
        ts = [jnp.arange(i * args.t_chunk, (i + 1) * args.t_chunk, dtype=jnp.int32) for i in range(args.chunks + 1)]
        jax.block_until_ready(chunk(params, ts[0]))  # compile + warm-up
        t0 = time.perf_counter()
        for tc in ts[1:]:
            jax.block_until_ready(chunk(params, tc))
        per_chunk = (time.perf_counter() - t0) / args.chunks
        per_batch = per_chunk * n_chunks
        how = (f"EXTRAPOLATED from {args.chunks} timed chunks ({per_chunk * 1e3:.0f} ms per chunk "
               f"x {n_chunks} chunks)")
    # The same network's plain batch-8 forward in JAX, under this machine's current load.
    fwd = jax.jit(lambda p, xx, tt: apply(p, xx, tt, None))
    x8, t8 = x[:8] if b >= 8 else jnp.tile(x, (8 // b + 1, 1, 1, 1))[:8], jnp.full((8,), 500, jnp.int32)
    jax.block_until_ready(fwd(params, x8, t8))
    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(fwd(params, x8, t8))
    print(f"JAX batch-8 forward (one timestep, as calc_bpd_loop does): {(time.perf_counter() - t0) / 3 * 1e3:.0f} ms")
    openai_s = OPENAI_MS_PER_B8_FORWARD / 1e3 * k * b / 8
    print(f"JAX chunked runner: {per_batch:.1f} s per {b} images = {b / per_batch:.4f} images/s  [{how}]")
    print(f"OpenAI calc_bpd_loop (~{OPENAI_MS_PER_B8_FORWARD:.0f} ms per batch-8 forward x {k}): "
          f"{openai_s:.0f} s per {b} images = {b / openai_s:.4f} images/s  [quoted, not re-measured]")
    print(f"speed-up: {openai_s / per_batch:.2f}x")


if __name__ == "__main__":
    main()
