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
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax import convert
from diffusion_jax.convert import kinds
from diffusion_jax.runtime import config_io

CONFIG_FILE = "config.json"
# Groups whose differences make a checkpoint unusable with a config.
IDENTITY_GROUPS = ("kind", "model", "diffusion", "text")


class WorkdirMismatchError(ValueError):
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
    """Refuse a workdir whose stored model/diffusion settings differ from `config`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path) or not has_checkpoints(workdir):
        return  # Nothing to protect: a run that never checkpointed.
    with open(path) as f:
        stored = json.load(f)
    diffs = config_differences(stored, config)
    if diffs:
        raise WorkdirMismatchError(
            f"{workdir} holds a different model; refusing to resume or overwrite it.\n  "
            + "\n  ".join(diffs)
            + "\nUse another --workdir, or the stored settings (see its config.json).")


def has_checkpoints(workdir: str) -> bool:
    root = os.path.join(workdir, "checkpoints")
    return os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root))


def write_config(workdir: str, config: dict) -> None:
    """Write config.json atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def make_manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """An orbax manager over `<workdir>/checkpoints` (atomic step directories)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, config: dict, *,
         force: bool = False) -> bool:
    """Save the train state, the data iterator position and the config at `step`."""
    import grain

    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_like(state):
    """ShapeDtypeStructs with shardings: restore onto the same (or another) mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore_latest(manager: ocp.CheckpointManager, state_template, data_iterator):
    """Restore the newest readable checkpoint; fall back to older ones if it is corrupt.

    Returns:
      (state, step) or (None, None) when there is no checkpoint.
    """
    import grain

    steps = sorted(manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
        items = dict(state=ocp.args.StandardRestore(abstract_like(state_template)))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
            errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            logging.warning("checkpoint at step %d is unreadable (%s); trying the previous one", step, e)
            print(f"WARNING: checkpoint at step {step} is unreadable or truncated "
                  f"({type(e).__name__}); falling back to the previous good step.", flush=True)
            continue
        return restored["state"], step
    if steps:
        raise RuntimeError("no checkpoint in this workdir could be read:\n  " + "\n  ".join(errors))
    return None, None


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
    """EMA (or raw) params of the newest checkpoint of a training workdir."""
    manager = make_manager(workdir, keep=1000, async_save=False)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet; train first (python train.py)")
    state = _restore_state_on_one_device(os.path.join(manager.directory, str(step), "state"))
    rates = [float(r) for r in cfg.get("train", {}).get("ema_rates", [])]
    if ema_rate is None and rates:
        ema_rate = rates[0]
    if ema_rate is None or ema_rate == 0:
        return state["params"], step, None
    if ema_rate not in rates:
        raise ValueError(f"--ema_rate {ema_rate} is not one of this run's EMA rates {rates}; "
                         "pass one of them, or 0 for the raw params")
    ema = state["ema_params"]
    ema = ema[rates.index(ema_rate)] if isinstance(ema, (list, tuple)) else ema[str(rates.index(ema_rate))]
    return ema, step, ema_rate


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
        return module, params, config_io.config_from_dict(cfg, path).to_dict()
    cfg = config_io.load_config(workdir).to_dict()  # every field, defaults from runtime.defaults
    module = kinds.build(cfg["kind"], **cfg["model"])
    params, step, rate = _training_params(workdir, cfg, ema_rate)
    cfg = dict(cfg, checkpoint_step=int(step), ema_rate=rate)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return module, params, cfg
