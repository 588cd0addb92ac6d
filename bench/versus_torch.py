"""Our compiled steps against OpenAI's own improved-diffusion, interleaved call by call in one process.

The peer is OpenAI's code itself, not a re-implementation: point ``--openai_repo``
at a checkout of github.com/openai/improved-diffusion (nothing of it is vendored
here). Its modules import ``mpi4py`` and ``blobfile`` at the top; single-process
timing uses neither, so stand-ins are registered when they are missing, and a
1-process gloo group stands in for MPI (``TrainLoop`` asks for the world size).

On a shared machine absolute timings drift by 2x within minutes; timing both
sides alternately, call by call, makes their ratio trustworthy. For each mode
the two sides run the same network (reference benchmark config of
``bench/train.py``: 32 px, 64 channels, 2 res blocks, attention at 16 px,
learned sigma, scale-shift norm, cosine T = 1000, L_hybrid; batch 8) and the
same work:

- forward: one batch-8 forward pass (theirs: ``UNetModel.forward``).
- train:   one training step (theirs: ``TrainLoop.run_step``: uniform t,
           ``training_losses``, backward, grad norm, AdamW, EMA, logging).
- sample:  one ancestral step (theirs: ``SpacedDiffusion.p_sample``); ours is
           measured inside the compiled chain (``sampling.p_sample_loop`` over
           ``--chain`` steps, divided by the step count).
- nll:     one timestep of the full-chain NLL for 8 images (theirs: one
           iteration of ``calc_bpd_loop``'s body: ``q_sample``,
           ``_vb_terms_bpd``, ``_predict_eps_from_xstart``); ours evaluates
           ``--t_chunk`` timesteps per forward (``nll.terms_at``) and is divided
           by ``--t_chunk``.

    python bench/versus_torch.py --openai_repo=/path/to/improved-diffusion \
        [--modes forward,train,sample,nll] [--rounds 5] [--threads 2]

Prints the float32 matmul peak of both libraries on this machine, then per
mode: each side's median and min, torch/jax for the medians and for the
minima (>1 means we are faster), and the model's GFLOP per unit as XLA counts
the direct form with each side's GFLOP/s and share of its matmul peak.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository, installed or not

from diffusion_jax.runtime import host_malloc  # noqa: E402
if __name__ == "__main__":
    host_malloc.reexec()  # huge pages for XLA:CPU's per-call buffers, before JAX loads
from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402
set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import sampling, schedules  # noqa: E402
from diffusion_jax.runtime import parallel
from diffusion_jax.training import loop as train_lib
from diffusion_jax.training import steps as train_steps
from diffusion_jax.evaluation import nll  # noqa: E402


def _load(name):  # a sibling bench script
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# improved-diffusion's flags for the reference config (script_util.create_model_and_diffusion).
OPENAI_FLAGS = dict(
    image_size=32, num_channels=64, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions="16", dropout=0.0, learn_sigma=True, sigma_small=False, class_cond=False,
    diffusion_steps=1000, noise_schedule="cosine", timestep_respacing="", use_kl=False, predict_xstart=False,
    rescale_timesteps=False, rescale_learned_sigmas=True, use_checkpoint=False, use_scale_shift_norm=True)


def _import_openai(repo: str):
    """improved_diffusion's (script_util, train_util, logger) from a checkout, runnable in one process."""
    import types

    import torch.distributed as dist

    if not os.path.isdir(os.path.join(repo, "improved_diffusion")):
        raise SystemExit(f"--openai_repo={repo}: no improved_diffusion/ package there; "
                         "clone https://github.com/openai/improved-diffusion and pass its path")
    sys.path.insert(0, repo)
    for name in ("mpi4py", "blobfile"):  # imported at module level, unused in one process
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            stub.MPI = types.SimpleNamespace(COMM_WORLD=types.SimpleNamespace(Get_rank=lambda: 0, Get_size=lambda: 1))
            sys.modules[name] = stub
    from improved_diffusion import logger, script_util, train_util

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    logger.configure(dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "versus_torch_log"), format_strs=[])
    return script_util, train_util


def torch_side(mode: str, batch: int, repo: str):
    """A zero-argument callable doing one unit of `mode`'s work with OpenAI's own code."""
    import torch as th

    script_util, train_util = _import_openai(repo)
    th.manual_seed(0)
    model, diffusion = script_util.create_model_and_diffusion(**OPENAI_FLAGS)
    model.train(mode == "train")
    steps = diffusion.num_timesteps
    x_start = th.randint(0, 256, (batch, 3, 32, 32)).float() / 127.5 - 1
    state = {"x": th.randn(batch, 3, 32, 32), "t": steps}
    ts = th.randint(0, steps, (batch,))

    def next_t():
        state["t"] = (state["t"] - 1) % steps
        return th.tensor([state["t"]] * batch)

    if mode == "forward":
        return th.no_grad()(lambda: model(state["x"], ts))
    if mode == "train":
        loop = train_util.TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=batch, microbatch=-1,
                                    lr=1e-4, ema_rate="0.9999", log_interval=10**9, save_interval=10**9,
                                    resume_checkpoint="")
        return lambda: loop.run_step(x_start, {})
    if mode == "sample":
        def sample():
            with th.no_grad():
                state["x"] = diffusion.p_sample(model, state["x"], next_t(), clip_denoised=True)["sample"]
        return sample

    def nll_step():  # the body of GaussianDiffusion.calc_bpd_loop for one t
        with th.no_grad():
            t_batch = next_t()
            noise = th.randn_like(x_start)
            x_t = diffusion.q_sample(x_start=x_start, t=t_batch, noise=noise)
            out = diffusion._vb_terms_bpd(model, x_start=x_start, x_t=x_t, t=t_batch, clip_denoised=True)
            eps = diffusion._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            return ((eps - noise) ** 2).mean(dim=(1, 2, 3)), out["output"]
    return nll_step


def jax_side(mode: str, batch: int, chain: int, t_chunk: int, kernels: str = "auto", lower_only: bool = False):
    """(callable, units): one call does `units` units of `mode`'s work with our compiled code.

    With ``lower_only`` (forward, train, nll): (the lowered, not compiled,
    computation, units), for its cost analysis.
    """
    bench_train = _load("train")
    config = bench_train.reference_config(batch, "float32", False)
    model = train_lib.make_model(config)
    if kernels != "auto":
        model = model.clone(kernels=kernels)
    schedule = train_lib.make_schedule(config)
    x = jax.random.randint(jax.random.key(1), (batch, 32, 32, 3), 0, 256).astype(jnp.float32) / 127.5 - 1.0
    params = train_lib.init_params(model, config, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)  # init zeroes the output convs: perturb every leaf
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [v + 0.02 * rng.standard_normal(v.shape).astype(np.float32) for v in leaves])
    apply = lambda p, xx, tt: model.apply({"params": p}, xx, tt)
    kw = dict(mean_type="epsilon", var_type="learned_range", clip_denoised=True)

    if mode == "forward":
        lowered = jax.jit(apply).lower(params, x, jnp.arange(batch) * 100)
        if lower_only:
            return lowered, 1
        f = lowered.compile()
        return (lambda: f(params, x, jnp.arange(batch) * 100)), 1
    if mode == "train":
        mesh = parallel.make_mesh()
        spec = train_lib.make_spec(config, schedule)
        tx, _ = train_steps.make_optimizer(num_steps=10**6, **config.optim.to_dict())
        st = {"state": jax.device_put(train_steps.init_state(params, tx, spec), parallel.replicated(mesh))}
        step = train_steps.compile_step(mesh, model=model, schedule=schedule, spec=spec, tx=tx)
        key = parallel.replicated_key(mesh, 1)
        data = parallel.global_batch(mesh, {"image": np.asarray(x)})
        lowered = step.lower(st["state"], data, key)
        if lower_only:
            return lowered, 1
        compiled = lowered.compile()

        def train():
            st["state"], metrics = compiled(st["state"], data, key)
            return metrics
        return train, 1
    if mode == "sample":
        respaced = schedules.make_schedule("cosine", 1000, str(chain))
        lowered = jax.jit(lambda p, k: sampling.p_sample_loop(k, lambda xx, tt, yy: apply(p, xx, tt), respaced,
                                                               x.shape, **kw)).lower(params, jax.random.key(0))
        loop = lowered.compile()
        return (lambda: loop(params, jax.random.key(0))), chain
    index = jnp.arange(batch, dtype=jnp.int32)
    chunk = jax.jit(lambda p, tc: nll.terms_at(lambda xt, tt, yy: apply(p, xt, tt), schedule, x, None, index,
                                               jnp.broadcast_to(tc, (batch, t_chunk)), jax.random.key(0), **kw))
    tc = jnp.arange(t_chunk, dtype=jnp.int32) + 500
    lowered = chunk.lower(params, tc)
    if lower_only:
        return lowered, t_chunk
    compiled = lowered.compile()
    return (lambda: compiled(params, tc)), t_chunk


def model_gflop(mode: str, batch: int, chain: int, t_chunk: int) -> float | None:
    """GFLOP per unit of `mode`'s work as XLA counts the textbook form (``kernels="xla"``: direct
    convolutions, as OpenAI's code runs them); Winograd's saved multiply-adds are not subtracted.
    A sampling step is one forward pass: XLA's cost analysis counts a loop's body once."""
    mode = "forward" if mode == "sample" else mode
    lowered, units = jax_side(mode, batch, chain, t_chunk, kernels="xla", lower_only=True)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) / units / 1e9 if flops else None


def matmul_peak(torch, n: int = 2048, rounds: int = 10) -> tuple[float, float]:
    """Best float32 GFLOP/s of an n x n matmul: (jax/XLA, torch)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    ta = torch.randn(n, n)
    best = {"jax": float("inf"), "torch": float("inf")}
    jax.block_until_ready(mm(a, a))
    torch.mm(ta, ta)
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, a))
        best["jax"] = min(best["jax"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.mm(ta, ta)
        best["torch"] = min(best["torch"], time.perf_counter() - t0)
    return 2 * n**3 / best["jax"] / 1e9, 2 * n**3 / best["torch"] / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--openai_repo", required=True, help="a checkout of github.com/openai/improved-diffusion")
    ap.add_argument("--modes", default="forward,train,sample,nll")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chain", type=int, default=10, help="steps of our timed sampling chain")
    ap.add_argument("--t_chunk", type=int, default=8, help="timesteps per forward in our NLL runner")
    ap.add_argument("--pause", type=float, default=0.5,
                    help="seconds between calls, so neither side's idle worker threads spin into the other's")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} | torch {torch.__version__} "
          f"threads={torch.get_num_threads()} | batch {args.batch} | rounds {args.rounds}")
    peak_jax, peak_torch = matmul_peak(torch)
    print(f"float32 matmul peak (2048^2, best of 10): jax {peak_jax:.0f} GFLOP/s, torch {peak_torch:.0f} GFLOP/s")
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        ours, units = jax_side(mode, args.batch, args.chain, args.t_chunk)
        setup_s = time.perf_counter() - t0
        theirs = torch_side(mode, args.batch, args.openai_repo)
        jax.block_until_ready(ours())  # warm-up
        theirs()
        times = {"torch": [], "jax": []}
        for _ in range(args.rounds):
            time.sleep(args.pause)
            t0 = time.perf_counter()
            theirs()
            times["torch"].append(time.perf_counter() - t0)
            time.sleep(args.pause)
            t0 = time.perf_counter()
            jax.block_until_ready(ours())
            times["jax"].append((time.perf_counter() - t0) / units)
        med = {k: statistics.median(v) for k, v in times.items()}
        lo = {k: min(v) for k, v in times.items()}
        gflop = model_gflop(mode, args.batch, args.chain, args.t_chunk)
        rate = "" if gflop is None else (
            f" | {gflop:.1f} GFLOP (direct form): torch {gflop / med['torch']:.0f} GFLOP/s "
            f"({gflop / med['torch'] / peak_torch:.0%} of its peak), jax {gflop / med['jax']:.0f} GFLOP/s "
            f"({gflop / med['jax'] / peak_jax:.0%})")
        print(f"{mode:8s} torch {1e3 * med['torch']:7.1f} ms (min {1e3 * lo['torch']:7.1f}) | "
              f"jax {1e3 * med['jax']:7.1f} ms (min {1e3 * lo['jax']:7.1f}) | "
              f"torch/jax median {med['torch'] / med['jax']:.2f}x, min/min {lo['torch'] / lo['jax']:.2f}x | "
              f"jax setup+compile {setup_s:.0f} s{rate}")


if __name__ == "__main__":
    main()
