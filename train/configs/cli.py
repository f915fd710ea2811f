"""Command-line overrides for dataclass configs: ``--config NAME --config.a.b=VALUE``.

The flax-examples / ml_collections convention, on plain (frozen) dataclasses: ``--config`` picks a
preset function, each ``--config.FIELD=VALUE`` (or ``--config.FIELD VALUE``) replaces one field,
parsed with the field's annotated type. Unknown fields and unparsable values raise ``ValueError``
naming the field, before anything else happens.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _parse_value(text: str, annotation: Any, label: str) -> Any:
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(annotation)
    if type(None) in options and text.lower() in ("none", "null"):
      return None
    errors = []
    for option in options:
      if option is type(None):
        continue
      try:
        return _parse_value(text, option, label)
      except ValueError as e:
        errors.append(str(e))
    raise ValueError(errors[0] if errors else f"{label}: cannot parse {text!r}")
  if origin is typing.Literal:
    choices = typing.get_args(annotation)
    if text not in choices:
      raise ValueError(f"{label}: {text!r} is not one of {list(choices)}")
    return text
  if origin is tuple:
    item_type = typing.get_args(annotation)[0]
    items = [s for s in text.strip("()[] ").split(",") if s.strip()]
    return tuple(_parse_value(s.strip(), item_type, label) for s in items)
  if annotation is bool:
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f"{label}: expected true/false, got {text!r}")
  if annotation in (int, float, str):
    try:
      return annotation(text)
    except ValueError:
      raise ValueError(f"{label}: expected {annotation.__name__}, got {text!r}") from None
  raise ValueError(f"{label}: fields of type {annotation} cannot be set from the command line")


def override(config: Any, dotted: str, text: str) -> Any:
  """Returns a copy of dataclass ``config`` with field ``dotted`` (e.g. "attention.topk") parsed from ``text``."""

  def replace(node, path: list[str], done: str):
    if not dataclasses.is_dataclass(node):
      raise ValueError(f"unknown config field --config.{dotted}: {done!r} has no sub-fields")
    name, rest = path[0], path[1:]
    fields = {f.name: f for f in dataclasses.fields(node)}
    here = f"{done}.{name}" if done else name
    if name not in fields:
      raise ValueError(f"unknown config field --config.{here}; {type(node).__name__} has {sorted(fields)}")
    if rest:
      return dataclasses.replace(node, **{name: replace(getattr(node, name), rest, here)})
    annotation = typing.get_type_hints(type(node))[name]
    if dataclasses.is_dataclass(annotation):
      raise ValueError(
        f"--config.{here} is a group; set one of its fields, e.g. --config.{here}."
        f"{dataclasses.fields(annotation)[0].name}=..."
      )
    value = _parse_value(text, annotation, f"--config.{here}")
    try:
      return dataclasses.replace(node, **{name: value})
    except ValueError as e:  # the dataclass's own __post_init__ checks
      raise ValueError(f"--config.{here}={value!r}: {e}") from None

  return replace(config, dotted.split("."), "")


def parse(
  argv: Sequence[str], presets: dict[str, Callable[[], Any]], default: str, flags: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
  """Parses ``--config NAME``, ``--config.FIELD=VALUE`` and the plain ``flags`` (name -> default).

  Returns ``(config, flag_values)``. Flag values are parsed with the type of their default
  (a default of None means a string).
  """
  preset, overrides, values = default, [], dict(flags)
  args = list(argv)
  if "-h" in args or "--help" in args:
    raise HelpRequested(help_text(presets, default, flags))
  while args:
    arg = args.pop(0)
    if not arg.startswith("--"):
      raise ValueError(
        f"unexpected argument {arg!r}; use --config NAME, --config.FIELD=VALUE or --{' / --'.join(flags)}"
      )
    name, has_value, value = arg[2:].partition("=")
    if not has_value:
      if not args or (args[0].startswith("--") and not _is_number(args[0])):
        raise ValueError(f"--{name} needs a value")
      value = args.pop(0)
    if name == "config":
      if value not in presets:
        raise ValueError(f"--config: unknown preset {value!r}; choose from {sorted(presets)}")
      preset = value
    elif name.startswith("config."):
      overrides.append((name[len("config.") :], value))
    elif name in flags:
      kind = type(flags[name]) if flags[name] is not None else str
      values[name] = _parse_value(value, kind, f"--{name}")
    else:
      raise ValueError(f"unknown flag --{name}; known: --config, --config.FIELD, {', '.join('--' + f for f in flags)}")
  config = presets[preset]()
  for dotted, value in overrides:
    config = override(config, dotted, value)
  return config, values


class HelpRequested(Exception):
  """Raised by ``parse`` for -h/--help; its message is the help text."""


def parse_or_exit_code(
  doc: str,
  argv: Sequence[str] | None,
  flags: dict[str, Any],
  check: Callable[[Any, dict[str, Any]], Any] | None = None,
  presets: dict[str, Callable[[], Any]] | None = None,
  default: str = "none",
):
  """``parse`` (flags only unless ``presets`` is given) followed by ``check(config, flags)``, which raises
  ValueError on bad input and may return a replacement config.

  Returns ``(config, flags, None)``, or ``(None, None, exit_code)`` once the help (0) or the error (1)
  has been printed: a command's ``main`` returns that code before doing any work.
  """
  try:
    config, values = parse(sys.argv[1:] if argv is None else argv, presets or {"none": lambda: None}, default, flags)
    if check is not None:
      config = check(config, values) or config
    return config, values, None
  except HelpRequested as e:
    print(f"{doc}\n{e}")
    return None, None, 0
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return None, None, 1


def help_text(presets: dict[str, Callable[[], Any]], default: str, flags: dict[str, Any]) -> str:
  lines = []

  def walk(node, prefix):
    for field in dataclasses.fields(node):
      value = getattr(node, field.name)
      if dataclasses.is_dataclass(value):
        walk(value, f"{prefix}{field.name}.")
      else:
        lines.append(f"    --config.{prefix}{field.name}={value!r}")

  config = presets[default]()
  if dataclasses.is_dataclass(config):
    lines += [
      f"--config NAME     one of {sorted(presets)} (default {default})",
      "--config.FIELD=VALUE   override a field; the fields and their values in the default preset:",
    ]
    walk(config, "")
  lines += [f"--{name}" + (f" (default {value!r})" if value is not None else "") for name, value in flags.items()]
  return "\n".join(lines)


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False
