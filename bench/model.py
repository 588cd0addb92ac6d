"""Forward / forward+backward timing of the reference ADM U-Net on the local backend.

Reference network: image 32, model_channels 64, 2 res blocks, attention at
16 px (ds 2), learn_sigma (6 output channels), scale-shift norm, 4 heads,
channel_mult (1, 2, 2, 2), batch 8. OpenAI's PyTorch forward took ~281 ms on
the 2-core CPU machine this was written on.

    python bench/model.py [--runs 5] [--dtype float32|bfloat16] [--remat] [--kernels auto|cpu|xla]
        [--xla_flags "--xla_cpu_..."]

``--xla_flags`` is appended to ``XLA_FLAGS`` before JAX is imported (this
script never changes JAX's global config). Compile time is reported
separately from the median of ``--runs`` timed calls.

Figures (jaxlib 0.10.2, 2 cores, 2026-11-28 17:13 UTC): float32 forward
~160 ms median, forward+backward ~633 ms, with the XLA:CPU flags
``import diffusion_jax`` sets (Eigen convolutions and matmuls, 512-bit
loops). An earlier run with YNNPACK convolutions (jaxlib's default) read
~396 ms and ~1350 ms. ``--xla_flags`` here is appended before JAX starts, so
it can override that choice.
"""

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--remat", action="store_true", help="use_checkpoint=True")
    ap.add_argument(
        "--xla_flags", default="", help="extra XLA_FLAGS, set before importing jax"
    )
    ap.add_argument("--skip_backward", action="store_true")
    ap.add_argument("--kernels", default="auto", choices=("auto", "cpu", "xla"),
                    help="the U-Net's GroupNorm/attention/upsample forms (diffusion_jax.models.kernels)")
    return ap.parse_args(argv)


def _timed(fn, *args, runs: int):
    """(compile_s, [run_s...]): AOT-compile, then time `runs` calls."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, times


def main(argv=None):
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags
        ).strip()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from diffusion_jax.runtime.xla_flags import set_cpu_flags

    set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
    import jax
    import jax.numpy as jnp

    from diffusion_jax.models import UNet

    model = UNet(
        image_size=32,
        model_channels=64,
        out_channels=6,
        num_res_blocks=2,
        attention_resolutions=(2,),
        channel_mult=(1, 2, 2, 2),
        num_heads=4,
        use_scale_shift_norm=True,
        use_checkpoint=args.remat,
        dtype=args.dtype,
        kernels=args.kernels,
    )
    kx, kp = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (args.batch, 32, 32, 3))
    t = jnp.arange(args.batch, dtype=jnp.int32) * 100
    params = jax.jit(model.init)(kp, x, t)["params"]
    n = sum(p.size for p in jax.tree.leaves(params))

    def fwd(p, x, t):
        return model.apply({"params": p}, x, t)

    def fwd_bwd(p, x, t):
        return jax.grad(lambda q: jnp.mean(fwd(q, x, t) ** 2))(p)

    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} dtype={args.dtype} "
        f"remat={args.remat} batch={args.batch} kernels={args.kernels} params={n:,}"
    )
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    cases = [("forward", fwd)] + (
        [] if args.skip_backward else [("forward+backward", fwd_bwd)]
    )
    for label, fn in cases:
        compile_s, times = _timed(fn, params, x, t, runs=args.runs)
        print(
            f"{label:>17}: median {1e3 * statistics.median(times):8.1f} ms  "
            f"(min {1e3 * min(times):.1f}, runs {args.runs})  compile {compile_s:.1f} s"
        )


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from diffusion_jax.runtime import host_malloc
    host_malloc.reexec()  # huge pages for XLA:CPU's per-call buffers, before JAX loads
    main()
