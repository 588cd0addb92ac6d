"""One config dialect: a stored ``config.json`` read back into the ``ConfigDict`` that training writes.

Training writes its resolved config; ``python -m diffusion_jax.convert``
writes ``kind``, ``model``, ``diffusion`` and ``source``. Sampling, evaluation
and conversion read either with ``load_config(workdir)``: the stored values
merged onto the defaults, so every field has exactly one default:

* groups and top-level fields: ``runtime.defaults.get_config()``;
* the ``model`` group: the constructor fields of the kind's module class
  (``convert.kinds``), i.e. what ``module(**config.model)`` would use.

Unknown keys are refused with an error that names the key and the file.
``source`` (a converted checkpoint's provenance) and kind-specific groups in
``EXTRA_GROUPS`` are kept as stored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import ml_collections

from diffusion_jax.convert import kinds
from diffusion_jax.runtime import defaults

CONFIG_FILE = "config.json"
# Groups with no defaults, kept as stored: a converted checkpoint's provenance,
# and groups only some kinds read (configs/digits_sr.py's `super_res`).
EXTRA_GROUPS = ("source", "super_res")
_NOT_FIELDS = ("parent", "name")


class ConfigError(ValueError):
    """A stored config that does not fit the config fields (names the key and the file)."""


def model_defaults(kind: str) -> dict:
    """``{field: default}`` of the module class of ``kind`` (fields without a default are left out)."""
    out = {}
    for f in dataclasses.fields(kinds.get(kind).module):
        if f.name in _NOT_FIELDS or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _model_fields(kind: str) -> set[str]:
    return {f.name for f in dataclasses.fields(kinds.get(kind).module) if f.init and f.name not in _NOT_FIELDS}


def _tuples(v):
    """JSON lists -> tuples (configs hold tuples), recursively."""
    if isinstance(v, Mapping):
        return {k: _tuples(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return tuple(_tuples(x) for x in v)
    return v


def _merge(group: ml_collections.ConfigDict, stored: Mapping, where: str, path: str) -> None:
    for key, value in stored.items():
        if key not in group:
            raise ConfigError(f"{where}: unknown config key {path}{key!r}; known: {sorted(group.keys())}")
        current = group[key]
        if isinstance(current, ml_collections.ConfigDict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {path}{key} must be a group, got {value!r}")
            _merge(current, value, where, f"{path}{key}.")
        else:
            try:
                group[key] = _tuples(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}: {path}{key}={value!r}: {e}") from None


def config_from_dict(stored: Mapping, where: str = "<config>") -> ml_collections.ConfigDict:
    """A stored config (plain dict) -> the full ``ConfigDict`` training would have written.

    Args:
      stored: the parsed ``config.json`` (training's, or a converted directory's).
      where: how errors name the source (a file path).

    Returns:
      ``defaults.get_config()`` with ``stored`` merged in; ``model`` holds the
      kind's module fields (defaults from the class) overlaid by the stored
      ones; ``EXTRA_GROUPS`` present in ``stored`` are kept as they are.

    Raises:
      ConfigError: an unknown key (named with its group and ``where``) or a mistyped value.
      ValueError: an unknown ``kind``.
    """
    stored = dict(stored)
    kind = stored.get("kind", defaults.get_config().kind)
    kinds.get(kind)
    config = defaults.get_config()
    model = dict(stored.pop("model", {}))
    unknown = sorted(set(model) - _model_fields(kind))
    if unknown:
        raise ConfigError(f"{where}: unknown config key(s) model.{unknown} for kind {kind!r} "
                          f"({kinds.get(kind).module.__name__} fields: {sorted(_model_fields(kind))})")
    config.model = ml_collections.ConfigDict({**model_defaults(kind), **_tuples(model)})
    for group in EXTRA_GROUPS:
        if group in stored:
            config[group] = ml_collections.ConfigDict(_tuples(stored.pop(group)))
    _merge(config, stored, where, "")
    return config


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """``<workdir>/config.json`` (a training workdir or a converted directory) as a ``ConfigDict``.

    Raises:
      FileNotFoundError: no config.json (the message says which directories have one).
      ConfigError: unknown keys or mistyped values (naming the key and the file).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{workdir} has no {CONFIG_FILE}: pass a training workdir (python train.py --workdir=...) "
            "or a directory written by `python -m diffusion_jax.convert`")
    with open(path) as f:
        return config_from_dict(json.load(f), path)
