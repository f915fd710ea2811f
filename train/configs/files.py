"""Configs as JSON (``to_dict`` / ``from_dict``) and from a user's own file (``load_config``).

A workdir's ``config.json`` is ``to_dict(config)``; ``from_dict`` reads it back with every value checked
against the field's type, naming the field on a mismatch. Files written by earlier versions still load:
``model`` held the trainer-set run options of ``WanConfig`` (ignored now) and ``attention.backend`` is
now ``attention.implementation`` ("auto" is None).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types
import typing
from collections.abc import Callable
from typing import Any

# Keys earlier versions wrote that no longer are fields: dropped, or renamed with a value map.
_DROPPED = {"ModelConfig": {"attention", "param_dtype", "compute_dtype", "batch_axes"}}
_RENAMED = {"AttentionConfig": {"backend": ("implementation", lambda v: None if v == "auto" else v)}}


def to_dict(config: Any) -> dict:
  """A JSON-friendly dict of a (nested) dataclass config."""
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      value = to_dict(value)
    elif isinstance(value, tuple):
      value = list(value)
    elif not isinstance(value, (int, float, str, bool, type(None))):
      value = getattr(value, "__name__", None) or getattr(value, "name", None) or str(value)
    out[field.name] = value
  return out


def _convert(value: Any, hint: Any, label: str) -> Any:
  """``value`` (from JSON) as an instance of the annotation ``hint``; ValueError naming ``label`` if it is not."""
  origin = typing.get_origin(hint)
  if dataclasses.is_dataclass(hint):
    return from_dict(hint, value, label)
  if origin in (typing.Union, types.UnionType):
    for option in typing.get_args(hint):
      try:
        return _convert(value, option, label)
      except ValueError:
        continue
    raise ValueError(f"{label}: {value!r} is not a {hint}")
  if origin is typing.Literal:
    if value not in typing.get_args(hint):
      raise ValueError(f"{label}: {value!r} is not one of {list(typing.get_args(hint))}")
    return value
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"{label}: expected a list, got {value!r}")
    args = typing.get_args(hint)
    items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
    if len(items) != len(value):
      raise ValueError(f"{label}: expected {len(items)} values, got {value!r}")
    return tuple(_convert(v, t, f"{label}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
  if hint is type(None):
    if value is not None:
      raise ValueError(f"{label}: expected null, got {value!r}")
    return None
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint in (int, float, str, bool):
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
      raise ValueError(f"{label}: expected {hint.__name__}, got {value!r}")
    return value
  raise ValueError(f"{label}: fields of type {hint} cannot be read from JSON")


def from_dict(cls: type, data: Any, label: str = "config") -> Any:
  """Inverse of ``to_dict``: a ``cls`` from a JSON object, each value checked against its field's type."""
  if not isinstance(data, dict):
    raise ValueError(f"{label}: expected an object, got {data!r}")
  data = dict(data)
  for old, (new, value_map) in _RENAMED.get(cls.__name__, {}).items():
    if old in data and new not in data:
      data[new] = value_map(data.pop(old))
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(data) - set(fields) - _DROPPED.get(cls.__name__, set())
  if unknown:
    raise ValueError(f"{label}: unknown field(s) {sorted(unknown)}; {cls.__name__} has {sorted(fields)}")
  kwargs = {name: _convert(data[name], hints[name], f"{label}.{name}") for name in fields if name in data}
  missing = [
    name
    for name, f in fields.items()
    if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
  ]
  if missing:
    raise ValueError(f"{label}: missing field(s) {missing}")
  try:
    return cls(**kwargs)
  except ValueError as e:  # the dataclass's own checks (AttentionConfig, WanConfig)
    raise ValueError(f"{label}: {e}") from None


def load_config(spec: str, presets: dict[str, Callable[[], Any]], config_type: type) -> Any:
  """The config that ``--config SPEC`` names: a preset, a Python file whose ``get_config()`` returns one,
  or a JSON file such as a workdir's ``config.json``. ValueError naming the problem otherwise."""
  if spec in presets:
    return presets[spec]()
  if spec.endswith(".json"):
    try:
      with open(spec) as f:
        data = json.load(f)
    except OSError as e:
      raise ValueError(f"--config {spec}: {e.strerror}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"--config {spec}: not valid JSON ({e})") from None
    try:
      return from_dict(config_type, data)
    except ValueError as e:
      raise ValueError(f"--config {spec}: {e}") from None
  if spec.endswith(".py"):
    if not os.path.isfile(spec):
      raise ValueError(f"--config {spec}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"_user_config_{abs(hash(spec))}", spec)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      raise ValueError(f"--config {spec}: the file defines no get_config()")
    config = module.get_config()
    if not isinstance(config, config_type):
      raise ValueError(
        f"--config {spec}: get_config() returned a {type(config).__name__}, not a {config_type.__name__}"
      )
    return config
  raise ValueError(
    f"--config: unknown preset {spec!r}; choose from {sorted(presets)}, or pass a .py file defining "
    "get_config() or a saved config.json"
  )
