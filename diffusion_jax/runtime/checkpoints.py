"""Work directories and orbax checkpoints: save, restore, resume, load for inference.

A training work directory holds `config.json` (the resolved config),
`checkpoints/<step>/` (orbax: the train state, the data iterator state and the
config, written atomically and asynchronously), `metrics.jsonl`, `samples/`
and TensorBoard event files.  A converted OpenAI checkpoint directory
(`python -m diffusion_jax.convert`) holds `config.json` + `params.safetensors`;
`load_for_inference` reads either.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax import convert
from diffusion_jax.convert import kinds
from diffusion_jax.runtime import config_io
from diffusion_jax.runtime import workdir as wd
from diffusion_jax.runtime.cli import RunError, UsageError

CONFIG_FILE = "config.json"
# Groups whose differences make a checkpoint unusable with a config.
IDENTITY_GROUPS = ("kind", "model", "diffusion", "text")


class WorkdirMismatchError(UsageError):
    """A config does not fit the model stored in a work directory."""


def _plain(value):
    """ConfigDict / tuples -> JSON-compatible plain values."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(config) -> dict:
    return _plain(config)


def config_differences(stored: dict, current: dict, groups=IDENTITY_GROUPS) -> list[str]:
    """Human-readable `group.key: stored -> current` lines for the identity groups."""
    diffs = []
    for group in groups:
        a, b = stored.get(group), current.get(group)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if _plain(a.get(key, "<absent>")) != _plain(b.get(key, "<absent>")):
                    diffs.append(f"{group}.{key}: checkpoint has {a.get(key, '<absent>')!r}, "
                                 f"config has {b.get(key, '<absent>')!r}")
        elif _plain(a) != _plain(b):
            diffs.append(f"{group}: checkpoint has {a!r}, config has {b!r}")
    return diffs


def check_workdir_config(workdir: str, config: dict) -> None:
    """Refuse a workdir that is a converted checkpoint, or whose stored model/diffusion settings differ.

    The stored `config.json` is compared whether or not checkpoints survive:
    a workdir belongs to one model.  Nothing is written.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(os.path.join(workdir, "params.safetensors")):
        raise UsageError(f"{workdir} is a converted checkpoint directory (python -m diffusion_jax.convert), "
                         "not a training workdir; pass another --workdir")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            stored = json.load(f)
    except ValueError as e:
        raise RunError(f"{path} is not readable JSON ({e}); restore it (each checkpoint holds a copy of the "
                       "config) or use another --workdir") from e
    # Both sides with every default filled in: a field added since the run started (stored
    # without it) differs only if the config sets it away from its default.
    diffs = config_differences(_plain(config_io.config_from_dict(stored, path)),
                               _plain(config_io.config_from_dict(config, "the config")))
    if diffs:
        raise WorkdirMismatchError(
            f"{workdir} holds a different model; refusing to resume or overwrite it.\n  "
            + "\n  ".join(diffs)
            + "\nUse another --workdir, or the stored settings (see its config.json).")


def has_checkpoints(workdir: str) -> bool:
    root = os.path.join(workdir, "checkpoints")
    return os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root))


def write_config(workdir: str, config: dict) -> None:
    """Write config.json atomically (process 0 only), after validation and the resume decision."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    wd.write_json_atomic(os.path.join(workdir, CONFIG_FILE), config)


def make_manager(workdir: str, *, keep: int, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """An orbax manager over `<workdir>/checkpoints` (atomic step directories).

    `keep` >= 1 (a `UsageError` otherwise: orbax would delete every step);
    `read_only` creates and deletes nothing (inference).
    """
    if keep < 1:
        raise UsageError(f"config.train.keep_checkpoints={keep} would delete every checkpoint; keep at least 1")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=async_save and not read_only)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, config: dict, *,
         force: bool = False) -> bool:
    """Save the train state, the data iterator position and the config at `step`.

    The data position (`TrainStream.get_state()`, the same on every process)
    is one JSON item, so it restores on any process count.
    """
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
    if data_iterator is not None:
        items["data_stream"] = ocp.args.JsonSave(data_iterator.get_state())
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_like(state):
    """ShapeDtypeStructs with shardings: restore onto the same (or another) mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore_latest(manager: ocp.CheckpointManager, state_template, data_iterator, *,
                   ema_rates: tuple[float, ...] | None = None, config: dict | None = None):
    """Restore the newest readable checkpoint, moving corrupt newer ones aside.

    A checkpoint that cannot be read although its structure fits (truncated or
    damaged files) is moved to `checkpoints/corrupt/<step>-<time>` (never
    deleted) once an older one restores, so the step is trained and saved
    again.  A structure that does not fit the config (another optimizer) is a
    `UsageError`, never reported as corruption.  EMA rates may change on
    resume: kept rates keep their EMA, new ones start from the params,
    dropped ones are dropped with a warning.

    Args:
      ema_rates: the config's `train.ema_rates` (None: the template's EMAs
        are taken to match the checkpoint's).
      config: the run's config as a dict (named in mismatch messages).

    Returns:
      (state, step) or (None, None) when there is no checkpoint.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    bad = []
    for step in steps:
        try:
            state = _restore_step(manager, step, state_template, data_iterator, ema_rates, config or {})
        except _Unreadable as e:
            bad.append((step, str(e)))
            continue
        _move_corrupt(manager, bad, step)
        return state, step
    if steps:
        raise RunError(f"no checkpoint in {manager.directory} could be read (nothing was moved or deleted):\n  "
                       + "\n  ".join(f"step {s}: {e}" for s, e in bad))
    return None, None


class _Unreadable(Exception):
    """A checkpoint whose files cannot be read (the message says why)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _signature(tree) -> dict:
    """{"a.0.b": (shape, dtype)} of every array: orbax's metadata tree and a state give the same paths."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): (tuple(x.shape), str(x.dtype))
            for path, x in leaves if hasattr(x, "shape")}


def _structure_differences(meta: dict, template) -> list[str]:
    """Groups of the train state whose arrays (paths, shapes, dtypes) differ between a checkpoint and a template."""
    diffs = []
    for field in ("params", "opt_state", "ema_params", "sampler_state"):
        a, b = _signature(meta.get(field)), _signature(getattr(template, field))
        if a != b:
            odd = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            diffs.append(f"{field}: the checkpoint holds {len(a)} arrays, this config {len(b)}; they differ at "
                         + ", ".join(f"{field}.{k}" for k in odd[:3]) + (" ..." if len(odd) > 3 else ""))
    return diffs


def _restore_step(manager, step: int, template, data_iterator, ema_rates, config: dict):
    """One step's state (EMAs adapted to `ema_rates`); `_Unreadable` if its files are damaged."""
    import grain

    root = os.path.join(str(manager.directory), str(step))
    try:
        stored_cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        meta = ocp.StandardCheckpointer().metadata(os.path.join(root, "state"))
        meta = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    except Exception as e:  # noqa: BLE001 - unreadable metadata: the checkpoint is damaged
        raise _Unreadable(_first_line(e)) from e
    if not isinstance(meta, dict):  # orbax answers None when the state's metadata file is gone or empty
        raise _Unreadable("the train state's metadata is missing or empty")
    stored_rates = [float(r) for r in (stored_cfg or {}).get("train", {}).get("ema_rates", [])]
    abstract = abstract_like(template)
    if ema_rates is not None and len(meta.get("ema_params") or []) == len(stored_rates):
        one = abstract.params
        abstract = abstract.replace(ema_params=tuple(one for _ in stored_rates))
    diffs = _structure_differences(meta, abstract)
    if diffs:
        raise UsageError(
            f"the checkpoint at step {step} does not fit this config (the files are intact):\n  "
            + "\n  ".join(diffs) + "\n  config changes since then: "
            + ("; ".join(config_differences(stored_cfg or {}, config, groups=("optim", "train")))
               or "see config.json") + "\nTrain with the stored settings (config.json) or use another --workdir.")
    items = dict(state=ocp.args.StandardRestore(abstract))
    legacy = not os.path.isdir(os.path.join(root, "data_stream"))
    if data_iterator is not None:  # Older checkpoints: grain's per-process files.
        items["data" if legacy else "data_stream"] = (grain.checkpoint.CheckpointRestore(data_iterator)
                                                      if legacy else ocp.args.JsonRestore())
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - the structure fits, so the files are damaged
        raise _Unreadable(_first_line(e)) from e
    if data_iterator is not None and not legacy:
        data_iterator.set_state(restored["data_stream"])
    state = restored["state"]
    if ema_rates is not None and tuple(stored_rates) != tuple(ema_rates):
        state = _adapt_emas(state, stored_rates, ema_rates, step)
    return state


def _adapt_emas(state, stored_rates, rates, step: int):
    """Keep the EMAs of rates in both lists; new rates start from the params; dropped ones go (warned)."""
    import jax.numpy as jnp

    by_rate = dict(zip(stored_rates, state.ema_params))
    added = [r for r in rates if r not in by_rate]
    dropped = [r for r in stored_rates if r not in rates]
    if added:
        print(f"EMA rates {added} are new: they start from the params of step {step}", flush=True)
    if dropped:
        wd.warn(f"EMA rates {dropped} are not in config.train.ema_rates: dropped from now on "
                     f"(checkpoints up to step {step} keep them; sample.py --ema_rate reads them there)")
    ema = tuple(by_rate[r] if r in by_rate else jax.tree.map(jnp.copy, state.params) for r in rates)
    return state.replace(ema_params=ema)


def _move_corrupt(manager, bad: list, good_step: int) -> None:
    """Move the unreadable steps newer than `good_step` aside (process 0) and reload the manager."""
    if not bad:
        return
    root = str(manager.directory)
    for step, why in bad:
        if jax.process_index() == 0:
            dest = wd.move_aside(root, step)
            wd.warn(f"checkpoint step {step} is unreadable ({why}); moved it to {dest} and resumed from "
                         f"step {good_step}: step {step} is trained and saved again")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("diffusion_jax_move_corrupt")
    manager.reload()


def _restore_state_on_one_device(path) -> dict:
    """The saved train state as a dict of arrays on this process's first device.

    The target is built from the checkpoint's own metadata, so a run saved on
    any mesh (8 devices, 2 hosts, ...) loads here for inference.
    """
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(str(path))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return checkpointer.restore(str(path), target)


def _training_params(workdir: str, cfg: dict, ema_rate: float | None):
    """EMA (or raw) params of the newest readable checkpoint of a training workdir (read only).

    The EMA rates are the checkpoint's own (its stored config), so a resume
    with other `train.ema_rates` leaves older checkpoints' EMAs usable.  An
    unreadable newest step is skipped with a warning.
    """
    manager = make_manager(workdir, keep=1000, async_save=False, read_only=True)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet; train first (python train.py)")
    errors = []
    for step in steps:
        try:
            stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            state = _restore_state_on_one_device(os.path.join(manager.directory, str(step), "state"))
        except Exception as e:  # noqa: BLE001 - a damaged step: try the previous one
            errors.append(f"step {step}: {_first_line(e)}")
            wd.warn(f"checkpoint step {step} of {workdir} is unreadable ({_first_line(e)}); trying an older one")
            continue
        rates = [float(r) for r in (stored or cfg).get("train", {}).get("ema_rates", [])]
        return _pick_ema(state, rates, ema_rate, step), step, _rate_used(rates, ema_rate)
    raise RunError(f"no checkpoint of {workdir} could be read:\n  " + "\n  ".join(errors))


def _rate_used(rates: list[float], ema_rate: float | None) -> float | None:
    if ema_rate is None and rates:
        return rates[0]
    return None if ema_rate is None or ema_rate == 0 else ema_rate


def _pick_ema(state: dict, rates: list[float], ema_rate: float | None, step: int):
    rate = _rate_used(rates, ema_rate)
    if rate is None:
        return state["params"]
    if rate not in rates:
        raise UsageError(f"--ema_rate {rate} is not one of the EMA rates {rates} of the checkpoint at step {step}; "
                         "pass one of them, or 0 for the raw params")
    ema = state["ema_params"]
    return ema[rates.index(rate)] if isinstance(ema, (list, tuple)) else ema[str(rates.index(rate))]


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def load_for_inference(workdir: str, ema_rate: float | None = None) -> tuple[Any, Any, dict]:
    """(module, params, cfg) from a training workdir or a converted OpenAI directory.

    `cfg` is the stored config as a plain dict in the shape training writes
    (`runtime.config_io`: every field present, defaults filled in).  Training workdirs give the EMA params of the newest
    checkpoint (`ema_rate`: which EMA; default the first; 0: raw params).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{workdir} has no {CONFIG_FILE}: pass a training workdir (python train.py --workdir=...) "
            "or a directory written by `python -m diffusion_jax.convert`")
    if os.path.exists(os.path.join(workdir, "params.safetensors")):
        module, params, cfg = convert.load_converted(workdir)
        cfg = config_io.config_from_dict(cfg, path).to_dict()
        cfg["data"]["name"] = ""  # a converted checkpoint was trained on no dataset of ours: callers must name one
        return module, params, cfg
    cfg = config_io.load_config(workdir).to_dict()  # every field, defaults from runtime.defaults
    module = kinds.build(cfg["kind"], **cfg["model"])
    params, step, rate = _training_params(workdir, cfg, ema_rate)
    cfg = dict(cfg, checkpoint_step=int(step), ema_rate=rate)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return module, params, cfg
