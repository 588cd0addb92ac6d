"""`evaluate.py --metric=ode_nll`: probability-flow ODE bits/dim of a checkpoint, sharded and resumable.

The math is `diffusion_jax.ode_likelihood` (score_sde's dequantized ODE
likelihood of the full discrete chain).  Each device solves its examples'
ODEs (one solve per example, vmapped), the batch split over every device of
every host like `--metric=nll`.  Example i's dequantization noise and
Hutchinson probes are keyed by (seed, i), so its result depends neither on
the batch size nor on the device count.  After every batch process 0
rewrites `<out stem>.partial.npz` atomically; a rerun with the same settings
continues after the last finished example, one with other settings is refused
with the differences (`runtime.resume.check_settings`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import ode_likelihood
from diffusion_jax.evaluation import nll, run
from diffusion_jax.runtime import resume
from diffusion_jax.runtime.parallel import batch_spec


class OdeBatch(NamedTuple):
    """Per example `[B]`: bits/dim, the prior's share of it, drift evaluations, solver success."""

    bpd: jax.Array
    prior_bpd: jax.Array
    nfe: jax.Array
    success: jax.Array


class OdePartial(NamedTuple):
    """Accumulated per-example results `[n]` (host NumPy)."""

    index: np.ndarray
    bpd: np.ndarray
    prior_bpd: np.ndarray
    nfe: np.ndarray
    success: np.ndarray


def empty_partial() -> OdePartial:
    return OdePartial(np.zeros((0,), np.int64), np.zeros((0,)), np.zeros((0,)), np.zeros((0,), np.int64),
                      np.zeros((0,), bool))


def append(partial: OdePartial, out: OdeBatch, index, valid) -> OdePartial:
    """Add one batch's valid rows."""
    valid = np.asarray(valid, bool)
    new = (np.asarray(index, np.int64), np.asarray(out.bpd, np.float64), np.asarray(out.prior_bpd, np.float64),
           np.asarray(out.nfe, np.int64), np.asarray(out.success, bool))
    return OdePartial(*(np.concatenate([old, v[valid]]) for old, v in zip(partial, new)))


def load_partial(path: str, settings: dict) -> OdePartial:
    """Saved progress for these settings, or an empty partial (run.ResumeError if the settings differ)."""
    if not os.path.exists(path):
        return empty_partial()
    with np.load(path) as f:
        resume.check_settings(path, json.loads(str(f["settings"])), settings, run.RESUME_FREE)
        return OdePartial(**{k: f[k] for k in OdePartial._fields})


def make_ode_fn(apply_fn: nll.ApplyFn, fs: ode_likelihood.FlowSchedule, *, mesh: jax.sharding.Mesh,
                mean_type: str, var_type: str, num_probes: int, options: ode_likelihood.SolverOptions,
                class_cond: bool = False):
    """The jitted ODE-likelihood step, its batch split over every axis of `mesh`.

    Returns:
      `step(params, batch, rng) -> (OdeBatch, index [B], valid [B])`, all
      replicated; `batch` as for `nll.make_chain_fn` ("image" on the uint8 grid in [-1, 1]).
    """

    def local(params, batch, rng):
        x, index = batch["image"], jnp.asarray(batch["index"], jnp.int32)
        y = batch["label"] if class_cond else None
        model_fn = lambda xt, ts, yy: apply_fn(params, xt, ts, yy)
        bpd, ll = ode_likelihood.data_bits_per_dim(model_fn, fs, x, y, index, rng, mean_type=mean_type,
                                                   var_type=var_type, num_probes=num_probes, options=options)
        prior_bpd = -ll.prior_logp / (math.prod(x.shape[1:]) * math.log(2.0))
        return OdeBatch(bpd, prior_bpd, ll.nfe, ll.success), index, batch["valid"]

    rows = batch_spec(mesh)

    def step(params, batch, rng):
        batch = {k: batch[k] for k in ("image", "index", "valid") + (("label",) if class_cond else ())}
        in_specs = (P(), {k: rows for k in batch}, P())
        out_specs = (OdeBatch(rows, rows, rows, rows), rows, rows)
        # check_vma=False: the solvers' while/scan carries start as constants (not device-varying) and come
        # back varying, which the varying-axes check rejects; every example is solved on its own device
        # and there are no collectives in `local`, so the check has nothing to protect here.
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
            params, batch, rng)

    repl = NamedSharding(mesh, P())
    return jax.jit(step, out_shardings=(OdeBatch(repl, repl, repl, repl), repl, repl))


def run_ode(step: Callable, params, make_batches: Callable[[int], Iterable[dict]], *, mesh, rng, settings: dict,
            start: int, stop: int, partial_file: str | None = None, progress: bool = True) -> OdePartial:
    """Evaluate examples [start, stop) with a `make_ode_fn` step, resumably (see `run.run_nll`)."""
    partial = load_partial(partial_file, settings) if partial_file else empty_partial()
    done = len(partial.index)
    if not np.array_equal(partial.index, np.arange(start, start + done)):
        raise run.ResumeError(f"{partial_file}: saved examples are not the contiguous range starting at {start}")
    if start + done >= stop:
        return partial
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=stop - start, initial=done, desc="ODE NLL", unit="img")
    for local in make_batches(start + done):
        out, index, valid = step(params, nll.global_batch(mesh, local), rng)
        partial = append(partial, out, index, valid)
        if partial_file and jax.process_index() == 0:
            run.save_partial(partial_file, partial, settings)
        if bar is not None:
            bar.update(int(np.sum(np.asarray(valid))))
            bar.set_postfix(bpd=f"{partial.bpd.mean():.4f}", nfe=f"{partial.nfe.mean():.0f}")
    if bar is not None:
        bar.close()
    return partial


def ode_report(partial: OdePartial, settings: dict, *, start: int, stop: int, seconds: float) -> dict:
    """The JSON report: bits/dim, its standard error (over examples), NFE, failures, settings."""
    n = len(partial.bpd)
    if n == 0:
        raise ValueError("no examples were evaluated (empty index range?)")
    return {
        "metric": "ode_nll",
        "bits_per_dim": float(partial.bpd.mean()),
        "bits_per_dim_stderr": float(np.std(partial.bpd, ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "prior_bpd": float(partial.prior_bpd.mean()),
        "nfe_mean": float(partial.nfe.mean()),
        "nfe_max": int(partial.nfe.max()),
        "num_unfinished": int(np.sum(~partial.success)),
        "num_examples": n,
        "index_range": [int(start), int(stop)],
        "seconds_this_run": float(seconds),
        "settings": settings,
    }


def format_table(report: dict) -> str:
    lo, hi = report["index_range"]
    s = report["settings"]
    solver = (f"dopri5 rtol={s['ode_rtol']:g} atol={s['ode_atol']:g}" if s["ode_solver"] == "dopri5"
              else f"rk4 {s['ode_steps']} steps")
    probes = "exact divergence" if s["ode_probes"] == 0 else f"{s['ode_probes']} Hutchinson probe(s)"
    lines = [f"ODE bits/dim  {report['bits_per_dim']:.5f} ± {report['bits_per_dim_stderr']:.5f} (s.e.)  over "
             f"{report['num_examples']} examples [{lo}, {hi})",
             f"NFE  mean {report['nfe_mean']:.1f}  max {report['nfe_max']}   {solver}, {probes}   "
             f"{report['seconds_this_run']:.1f} s this run"]
    if report["num_unfinished"]:
        lines.append(f"WARNING: {report['num_unfinished']} examples hit the solver's step limit (results inexact)")
    return "\n".join(lines)


def check_ode_options(o: dict) -> None:
    """ValueError for settings the ODE likelihood cannot use, before anything is loaded or written."""
    run.check_options(o)
    if o.get("timestep_respacing"):
        raise ValueError(f"--metric=ode_nll integrates the probability-flow ODE of the full chain; drop "
                         f"--timestep_respacing={o['timestep_respacing']}")
    if o.get("cfg_scale") is not None or o.get("classifier_workdir"):
        raise ValueError("--metric=ode_nll evaluates the conditional model with the true labels; drop --cfg_scale "
                         "/ --classifier_workdir (guided ODE likelihoods are not supported)")
    if int(o["ode_probes"]) < 0:
        raise ValueError(f"--ode_probes={o['ode_probes']} must be >= 0 (0: exact divergence, D VJPs per step)")
    if o["ode_solver"] not in ode_likelihood.SOLVERS:
        raise ValueError(f"--ode_solver={o['ode_solver']}: accepted {', '.join(ode_likelihood.SOLVERS)}")
    for name in ("ode_rtol", "ode_atol"):
        if not 0.0 < float(o[name]) < 1.0:  # also refuses NaN
            raise ValueError(f"--{name}={o[name]} must be in (0, 1), e.g. 1e-5")
    if int(o["ode_steps"]) < 1:
        raise ValueError(f"--ode_steps={o['ode_steps']} must be at least 1")


def ode_settings(cfg: dict, o: dict) -> dict:
    """Everything that determines the numbers (stored in the report, checked on resume)."""
    d = cfg["diffusion"]
    solver = ({"ode_rtol": float(o["ode_rtol"]), "ode_atol": float(o["ode_atol"])} if o["ode_solver"] == "dopri5"
              else {"ode_steps": int(o["ode_steps"])})
    return {
        "workdir": os.path.abspath(o["workdir"]), "checkpoint_step": cfg.get("checkpoint_step"),
        "ema_rate": cfg.get("ema_rate", o.get("ema_rate")), "data": o["data"], "split": o["split"],
        "seed": o["seed"], "start": o["start"], "stop": o["stop"], "noise_schedule": d["noise_schedule"],
        "diffusion_steps": d["diffusion_steps"], "rescale_timesteps": d["rescale_timesteps"],
        "mean_type": d["mean_type"], "var_type": d["var_type"], "allow_resize": o["allow_resize"],
        "ode_probes": int(o["ode_probes"]), "ode_solver": o["ode_solver"], **solver,
        "dequantization": "uniform", "batch_size": o["batch_size"],
    }


def evaluate_ode_nll(o: dict) -> dict:
    """`evaluate.py --metric=ode_nll`: ODE bits/dim of a checkpoint on a dataset split."""
    from diffusion_jax import schedules

    check_ode_options(o)
    module, params, cfg = run.load_model(o["workdir"], o.get("ema_rate"))
    d, m = cfg["diffusion"], cfg["model"]
    if d["mean_type"] == "previous_x":
        raise ValueError("this model predicts x_{t-1} (mean_type previous_x), which has no probability-flow ODE")
    fs = ode_likelihood.flow_schedule(
        schedules.make_schedule(d["noise_schedule"], d["diffusion_steps"], "", d["rescale_timesteps"]))
    o, source = run.dataset_range(o, cfg)
    stop = o["stop"]
    mesh = nll.make_mesh()
    class_cond = m.get("num_classes") is not None
    options = ode_likelihood.SolverOptions(o["ode_solver"], rtol=float(o["ode_rtol"]), atol=float(o["ode_atol"]),
                                           num_steps=int(o["ode_steps"]))
    step = make_ode_fn(nll.module_apply(module), fs, mesh=mesh, mean_type=d["mean_type"], var_type=d["var_type"],
                       num_probes=int(o["ode_probes"]), options=options, class_cond=class_cond)
    settings = ode_settings(cfg, o)

    batches = run.eval_batches(source, o, m, with_labels=class_cond)

    began = time.perf_counter()
    partial = run_ode(step, jax.tree.map(jnp.asarray, params), batches, mesh=mesh, rng=jax.random.key(o["seed"]),
                      settings=settings, start=o["start"], stop=stop, partial_file=run.partial_path(o["out"]))
    report = ode_report(partial, settings, start=o["start"], stop=stop, seconds=time.perf_counter() - began)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(o["out"])), exist_ok=True)
        np.savez(os.path.splitext(o["out"])[0] + "_examples.npz", **partial._asdict())
        with open(o["out"], "w") as f:
            json.dump(report, f, indent=2)
    return report
