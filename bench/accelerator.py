"""Accelerator benchmark: train, sample and NLL throughput of ADM ImageNet-64 on this machine's devices.

One command, one JSON object (printed, and written to `--out`):

  python bench/accelerator.py [--out=FILE] [--kernels=xla,cpu] [--budget_s=420]
  python bench/accelerator.py --smoke --out=/tmp/bench.json   # configs/tiny.py on CPU, < 2 min

For each model kernel set (`kernels="xla"`: textbook forms and
`jax.nn.dot_product_attention`; `"cpu"`: the hand-written XLA:CPU forms) it
reports

- `train[remat]` for remat off / on (`model.use_checkpoint`): the library's
  compiled train step (`steps.compile_step`: AdamW, EMA, bf16 compute with fp32
  master params) on random images at `--batch` per device: `images_per_s`,
  `step_s`, `compile_s`, `tflops` = XLA's cost-analysis flops of the compiled
  step / step time (per device), `mfu` = tflops / the device's dense bf16 peak
  (`PEAK_BF16_TFLOPS`; null where unknown), `peak_bytes` (the device's
  `memory_stats()["peak_bytes_in_use"]`, a high-water mark since the process
  started, so runs go from smallest to largest; where the runtime keeps no
  allocator statistics, as on CPU, the compiled executable's own peak from
  `memory_analysis()`; `peak_bytes_source` says which: "device" or
  "memory_analysis"), `compiled_bytes` (XLA's memory analysis of this
  executable: arguments + outputs + temporaries - aliased) and
  `max_batch_per_device` (a bounded doubling search from `--batch`, for the
  first kernel set; `batch_search_complete` false when the budget cut it);
- `sample`: `images_per_s` of the 250-step ancestral chain and the 25-step
  DDIM chain (`sampling.p_sample_loop` / `ddim_sample_loop`, one `lax.scan`);
- `nll`: `images_per_s` of the full-T bits/dim chain (`evaluation.nll`);
  both with `peak_bytes` / `peak_bytes_source` as for training.

Every figure is timed after a warm-up call, with `jax.block_until_ready`;
compile time (`lower().compile()`) is reported apart.  `tflops` counts what
XLA's cost analysis sees: flops inside library calls it cannot see (e.g.
cuDNN fused attention) are missing, so it is a lower bound there.  The
`--budget_s` clock skips the batch searches (reported null) once spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffusion_jax.runtime import host_malloc  # noqa: E402
if __name__ == "__main__":
    host_malloc.reexec()  # huge pages for XLA:CPU's per-call buffers, before JAX loads
from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402

set_cpu_flags()  # XLA:CPU options, before JAX starts its backend
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import sampling  # noqa: E402
from diffusion_jax.evaluation import nll  # noqa: E402
from diffusion_jax.runtime import parallel  # noqa: E402
from diffusion_jax.training import loop as train_lib  # noqa: E402
from diffusion_jax.training import steps as train_steps  # noqa: E402

# Dense bf16 peak TFLOP/s per device (vendor figures), matched against `device_kind` in order.
PEAK_BF16_TFLOPS = (("h100 pcie", None), ("h100", 989.0), ("h200", 989.0), ("a100", 312.0),
                    ("tpu v4", 275.0), ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v5p", 459.0),
                    ("tpu v5", 459.0), ("tpu v6 lite", 918.0), ("tpu v6e", 918.0))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to measure: sizes for the real run and for `--smoke`."""

    config: str
    batch: int  # Per-device train batch timed.
    steps: int  # Timed train steps (after one warm-up step).
    max_batch: int  # Upper bound of the batch search (per device).
    sample_batch: int
    nll_batch: int
    nll_t_chunk: int
    respacing: tuple = ("250", "ddim25")
    search_remat: tuple = (True, False)  # Remat settings whose batch search runs (first kernel set).


REAL = Plan("configs/imagenet64_cond.py", batch=64, steps=10, max_batch=1024, sample_batch=32, nll_batch=16,
            nll_t_chunk=8)
SMOKE = Plan("configs/tiny.py", batch=2, steps=2, max_batch=4, sample_batch=2, nll_batch=2, nll_t_chunk=5,
             respacing=("10", "ddim5"), search_remat=(False,))


def peak_tflops(device_kind: str) -> float | None:
    """The device kind's dense bf16 peak (TFLOP/s), or None when not in the table."""
    kind = device_kind.lower()
    for name, peak in PEAK_BF16_TFLOPS:
        if name in kind:
            return peak
    return None


def load_config(path: str, *, kernels: str, remat: bool):
    """The config file's `get_config()` with the model's kernels and remat set."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.use_checkpoint = remat
    if has_kernels(config):
        config.model.kernels = kernels
    return config


def has_kernels(config) -> bool:
    """Whether the model class has the `kernels` field (issue 13's per-backend kernels)."""
    cls = type(train_lib.make_model(config))
    return "kernels" in {f.name for f in dataclasses.fields(cls)}


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # Older JAX: one dict per program.
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _compiled_bytes(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def peak_bytes(compiled) -> dict:
    """`peak_bytes` and its `peak_bytes_source`: the device allocator's high-water mark where the runtime keeps
    statistics (GPU, TPU), else the compiled executable's peak from XLA's memory analysis (CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return dict(peak_bytes=int(stats["peak_bytes_in_use"]), peak_bytes_source="device")
    m = compiled.memory_analysis()
    peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0) if m is not None else 0
    return dict(peak_bytes=peak or _compiled_bytes(compiled), peak_bytes_source="memory_analysis")


def _host_batch(config, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    s, c = config.data.image_size, config.data.channels
    batch = {"image": rng.uniform(-1, 1, (n, s, s, c)).astype(np.float32)}
    if train_lib._uses_labels(config):
        batch["label"] = rng.integers(0, config.model.num_classes or 1, n).astype(np.int32)
    return batch


def train_step_figures(config, per_device: int, steps: int) -> dict:
    """Compile, warm up and time the library's train step at `per_device` images per device."""
    mesh = parallel.make_mesh()
    n = per_device * mesh.devices.size
    schedule = train_lib.make_schedule(config)
    spec = train_lib.make_spec(config, schedule)
    model = train_lib.make_model(config)
    tx, _ = train_steps.make_optimizer(num_steps=10**6, **config.optim.to_dict())
    make = lambda key: train_steps.init_state(train_lib.init_params(model, config, key), tx, spec)  # noqa: E731
    state = train_steps.create_state(mesh, make, jax.random.key(0))
    step = train_steps.compile_step(mesh, model=model, schedule=schedule, spec=spec, tx=tx,
                                    state_sharding=train_steps.state_shardings(mesh, state))
    batch = parallel.global_batch(mesh, _host_batch(config, n))
    rng = parallel.replicated_key(mesh, 1)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, batch, rng)  # Warm-up (excluded).
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(steps):  # Each step waits on the last through the donated state.
        state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
    flops = _flops(compiled)
    kind = jax.devices()[0].device_kind
    tflops = flops / step_s / 1e12 if flops else None
    peak = peak_tflops(kind)
    out = dict(batch_per_device=per_device, images_per_s=n / step_s, step_s=step_s, compile_s=compile_s,
               tflops=tflops, mfu=tflops / peak if tflops and peak else None, **peak_bytes(compiled),
               compiled_bytes=_compiled_bytes(compiled), loss=float(metrics["loss"]))
    del state, compiled
    gc.collect()
    return out


def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "Out of memory" in text


def max_batch(config, start: int, cap: int, deadline: float) -> dict:
    """Largest per-device batch whose train step compiles and runs: doubling from `start` (known to fit).

    Stops at the first out-of-memory error, at `cap`, or at `deadline`
    (`batch_search_complete` says whether it ended on an OOM or the cap).
    """
    fits, tried, complete = start, [start], False
    b = 2 * start
    while b <= cap and time.perf_counter() < deadline:
        try:
            train_step_figures(config, b, steps=1)
        except Exception as e:  # noqa: BLE001 - only out-of-memory ends the search quietly
            if not _out_of_memory(e):
                raise
            tried.append(b)
            complete = True
            break
        fits = b
        tried.append(b)
        b *= 2
    complete = complete or b > cap
    return dict(max_batch_per_device=fits, batch_search=tried, batch_search_complete=complete)


def _timed_call(fn, *args, repeats: int = 2) -> tuple[float, float, dict]:
    """(compile_s, run_s, peak) of `fn(*args)`: AOT compile, one warm-up call, the best of `repeats` timed calls;
    `peak` is `peak_bytes(compiled)` after the calls."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, min(times), peak_bytes(compiled)


def _params(config):
    model = train_lib.make_model(config)
    return model, jax.jit(lambda key: train_lib.init_params(model, config, key))(jax.random.key(0))


def sample_figures(config, batch: int, respacing: str) -> dict:
    """images/s of one whole sampling chain (ancestral, or DDIM eta=0 for 'ddimN' respacings)."""
    model, params = _params(config)
    d = config.diffusion
    schedule = train_lib.make_schedule(config, respacing)
    s, c = config.model.image_size, config.data.channels
    y = jnp.arange(batch, dtype=jnp.int32) % config.model.num_classes if config.model.num_classes else None
    loop = sampling.ddim_sample_loop if respacing.startswith("ddim") else sampling.p_sample_loop

    @jax.jit
    def run(params, rng, y):
        model_fn = lambda x, t, yy: model.apply({"params": params}, x, t, yy)  # noqa: E731
        return loop(rng, model_fn, schedule, (batch, s, s, c), mean_type=d.mean_type, var_type=d.var_type, y=y)

    compile_s, run_s, peak = _timed_call(run, params, jax.random.key(1), y)
    return dict(steps=schedule.num_timesteps, batch=batch, images_per_s=batch / run_s, chain_s=run_s,
                compile_s=compile_s, **peak)


def nll_figures(config, batch: int, t_chunk: int) -> dict:
    """images/s of the full-T bits/dim chain (`nll.make_chain_fn`) on every device."""
    model, params = _params(config)
    d = config.diffusion
    schedule = train_lib.make_schedule(config, "")
    mesh = nll.make_mesh()
    n = batch * mesh.devices.size
    class_cond = config.model.num_classes is not None
    step = nll.make_chain_fn(nll.module_apply(model), schedule, mesh=mesh, t_chunk=t_chunk, mean_type=d.mean_type,
                             var_type=d.var_type, class_cond=class_cond)
    host = _host_batch(config, n)
    host.update(index=np.arange(n, dtype=np.int32), valid=np.ones(n, bool))
    compile_s, run_s, peak = _timed_call(step, params, nll.global_batch(mesh, host), jax.random.key(2))
    return dict(timesteps=schedule.num_timesteps, batch=n, images_per_s=n / run_s, chain_s=run_s,
                compile_s=compile_s, **peak)


def run(plan: Plan, kernels_list: list[str], budget_s: float) -> dict:
    """Every figure of the JSON report (see the module docstring)."""
    start = time.perf_counter()
    device = jax.devices()[0]
    report = dict(device_kind=device.device_kind, platform=device.platform, device_count=jax.device_count(),
                  jax_version=jax.__version__, config=plan.config, dtype=None,
                  peak_bf16_tflops=peak_tflops(device.device_kind), kernels={})
    for kernels in kernels_list:
        base = load_config(plan.config, kernels=kernels, remat=False)
        report["dtype"] = base.model.dtype
        entry = dict(has_kernels_field=has_kernels(base), train={})
        for remat in (True, False):  # Smaller peak first: peak_bytes is a high-water mark.
            config = load_config(plan.config, kernels=kernels, remat=remat)
            entry["train"]["remat_on" if remat else "remat_off"] = train_step_figures(config, plan.batch, plan.steps)
        config = load_config(plan.config, kernels=kernels, remat=False)
        entry["sample"] = {r: sample_figures(config, plan.sample_batch, r) for r in plan.respacing}
        entry["nll"] = nll_figures(config, plan.nll_batch, plan.nll_t_chunk)
        report["kernels"][kernels] = entry
        _log(f"kernels={kernels} done at {time.perf_counter() - start:.0f} s")
    deadline = start + budget_s
    for kernels in kernels_list[:1]:  # Batch searches last, for the first kernel set, while the budget lasts.
        for remat in plan.search_remat:
            config = load_config(plan.config, kernels=kernels, remat=remat)
            train = report["kernels"][kernels]["train"]["remat_on" if remat else "remat_off"]
            train.update(max_batch(config, plan.batch, plan.max_batch, deadline))
    first = report["kernels"][kernels_list[0]]
    # The headline (DESIGN §6): the first kernel set, remat off, 250-step ancestral sampling.
    report["train"] = first["train"]["remat_off"]
    report["sample"] = first["sample"][plan.respacing[0]]
    report["nll"] = first["nll"]
    report["wall_s"] = time.perf_counter() - start
    return report


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="configs/tiny.py on CPU-sized shapes (< 2 min)")
    ap.add_argument("--out", default=None, help="also write the JSON object here")
    ap.add_argument("--kernels", default="xla,cpu", help="comma-separated kernel sets to measure")
    ap.add_argument("--budget_s", type=float, default=None, help="time after which batch searches are skipped")
    args = ap.parse_args(argv)
    plan = SMOKE if args.smoke else REAL
    if args.smoke:  # Compile fast: the smoke run checks the code path, not the figures.
        jax.config.update("jax_disable_most_optimizations", True)
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.smoke else 400.0)
    report = run(plan, [k for k in args.kernels.split(",") if k], budget)
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
