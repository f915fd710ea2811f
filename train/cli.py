"""Command lines of the trainer's commands, parsed by tyro from their typed dataclasses.

    args, code = cli.parse(Args, argv, prog="train.distill", description=__doc__, presets=PRESETS, default="tiny")
    if code is not None:
      return code  # the help (0) or one `error:` line (1) has been printed; nothing else ran

Each command's options are the fields of its ``Args`` dataclass, with the field docstrings as help. A field
named ``config`` holds a typed config: ``--config SPEC`` picks its starting value (a preset name, a Python
file whose ``get_config()`` returns one, or a saved ``config.json``), and ``--config.FIELD=VALUE`` (or
``--config.FIELD VALUE``) replaces one field of it, parsed with the field's type. Booleans read
true/false, tuples take their values space-separated (``--config.attention.topk 0.1 0.2``), ``None`` is
written None.

A bad option or value stops the command before any work with one line that names it, as does a
``ValueError`` from the command's ``check`` (validation that needs more than one field).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

import tyro
from tyro import _errors as tyro_errors
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec

from .configs.files import load_config

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_REGISTRY = ConstructorRegistry()


def _parse_bool(args: list[str]) -> bool:
  text = args[0].lower()
  if text in _TRUE or text in _FALSE:
    return text in _TRUE
  raise ValueError(f"expected true/false, got {args[0]!r}")


@_REGISTRY.primitive_rule
def _bool_rule(type_info) -> PrimitiveConstructorSpec | None:
  """Booleans as true/false (also True/False, 1/0, yes/no): ``--config.data.shuffle=false``."""
  if type_info.type is not bool:
    return None
  return PrimitiveConstructorSpec(
    nargs=1,
    metavar="{true,false}",
    instance_from_str=_parse_bool,
    is_instance=lambda x: isinstance(x, bool),
    str_from_instance=lambda x: ["true" if x else "false"],
  )


class _Rejected(Exception):
  """Raised from tyro's parse-error hook with the one-line message."""


def _option_names(cls: type, prefix: str = "--") -> tuple[list[str], list[str]]:
  """(options, groups) of dataclass ``cls``: ``--config.steps``, ...; ``--config``, ``--config.attention``, ..."""
  options, groups = [], []
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    name = f"{prefix}{field.name}"
    if dataclasses.is_dataclass(hints[field.name]):
      groups.append(name)
      inner_options, inner_groups = _option_names(hints[field.name], f"{name}.")
      options += inner_options
      groups += inner_groups
    else:
      options.append(name)
  return options, groups


def _given(argv: Sequence[str]) -> list[tuple[str, str]]:
  """(option, value) pairs as written in ``argv`` (``--a=1`` or ``--a 1``; the first value only)."""
  pairs = []
  for i, arg in enumerate(argv):
    if arg.startswith("--"):
      name, has_value, value = arg.partition("=")
      if not has_value:
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
      pairs.append((name.replace("-", "_").replace("__", "--", 1), value))
  return pairs


def _shown(text: str) -> str:
  """A value as the messages show it: numbers bare, anything else quoted."""
  try:
    float(text)
    return text
  except ValueError:
    return repr(text)


def _message(event, args_type: type, argv: Sequence[str]) -> str | None:
  """The one-line message for a tyro parse failure, or None to leave it to tyro."""
  given = _given(argv)
  raw = {name: value for name, value in given}
  if isinstance(event, tyro_errors.UnrecognizedArgs):
    token = event.tokens[0]
    if not token.startswith("--"):
      return f"unexpected argument {token!r}; options start with --, see --help"
    name = token.partition("=")[0].replace("-", "_").replace("__", "--", 1)
    options, groups = _option_names(args_type)
    if name in groups:
      first = next(o for o in options if o.startswith(f"{name}."))
      return f"{name} is a group; set one of its fields, e.g. {first}=..."
    kind = "config field" if name.startswith("--config.") else "flag"
    close = difflib.get_close_matches(name, options, n=1)
    return f"unknown {kind} {name}" + (f"; did you mean {close[0]}?" if close else "; see --help")
  if isinstance(event, tyro_errors.InvalidChoice):
    return f"{event.argument.display_name()}: {event.value!r} is not one of {list(event.choices)}"
  if isinstance(event, tyro_errors.BadValue):
    name = event.argument.display_name()
    if event.reason == "too_few_values":
      return f"{name} needs a value"
    return f"{name}: unexpected value {event.offending_value!r}"
  if isinstance(event, tyro_errors.MissingArgs):
    names = [a.arg.display_name() for a in event.missing_arguments]
    return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} required; see --help"
  if isinstance(event, tyro_errors.InstantiationFailure):
    if event.argument is not None:
      name = event.argument.display_name()
      kind = event.argument.field.type_stripped
      if kind in (int, float) and not event.message.startswith(name):
        return f"{name}: expected {kind.__name__}, got {raw.get(name, '')!r}"
      return f"{name}: {event.message}"
    # A dataclass's own check (e.g. AttentionConfig's): attribute it to the option of the field it names.
    leaf = event.message.split(" ", 1)[0]
    for name, value in reversed(given):
      if name.rsplit(".", 1)[-1] == leaf:
        return f"{name}={_shown(value)}: {event.message}"
    return event.message
  return None


def command(module: str) -> str:
  """How to run the command ``module`` (e.g. "train.sample") the way this process was started: its console
  script (``sparge-sample``) when installed, else ``python -m train.sample``."""
  script = os.path.basename(sys.argv[0]) if sys.argv else ""
  if script.startswith("sparge-"):
    return "sparge-" + module.rsplit(".", 1)[-1].replace("_", "-")
  return f"python -m {module}"


def _split_config_spec(argv: Sequence[str]) -> tuple[str | None, list[str]]:
  """(the value of ``--config SPEC`` / ``--config=SPEC`` if given, the other arguments)."""
  spec, rest, args = None, [], list(argv)
  while args:
    arg = args.pop(0)
    if arg == "--config":
      if not args or args[0].startswith("--"):
        raise ValueError("--config needs a value: a preset name, a .py file or a config.json")
      spec = args.pop(0)
    elif arg.startswith("--config="):
      spec = arg[len("--config=") :]
    else:
      rest.append(arg)
  return spec, rest


def parse(
  args_type: type,
  argv: Sequence[str] | None,
  *,
  prog: str,
  description: str,
  presets: dict[str, Callable[[], Any]] | None = None,
  default: str | None = None,
  project: Callable[[Any], Any] | None = None,
  check: Callable[[Any], Any] | None = None,
) -> tuple[Any, int | None]:
  """Parses ``argv`` (default ``sys.argv[1:]``) into an ``args_type``; see the module docstring.

  presets, default: the configs ``--config NAME`` may name, and the one used without ``--config``.
  project: maps the loaded config (a ``train.configs.Config``) onto the type of ``args_type.config``.
  check: called with the parsed args; raises ValueError on bad input.
  Returns ``(args, None)``, or ``(None, exit_code)`` once the help or the error has been printed.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  prog = command(prog)
  try:
    instance = tyro.MISSING_NONPROP
    if presets is not None:
      from .configs import Config  # noqa: PLC0415 (the type that presets and files hold)

      spec, argv = _split_config_spec(argv)
      config = load_config(spec or default, presets, Config)
      config = project(config) if project else config
      required = {
        f.name: tyro.MISSING
        for f in dataclasses.fields(args_type)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
      }
      instance = args_type(**{**required, "config": config})
      description += (
        f"\n\n--config SPEC: the starting config, one of {sorted(presets)} (default {default}), a .py file whose "
        "get_config() returns a train.configs.Config, or a saved config.json. The defaults shown below are its values."
      )

    def reject(event):
      message = _message(event, args_type, argv)
      if message is not None:
        raise _Rejected(message)

    with tyro_errors.on_parse_error(reject):
      args = tyro.cli(
        args_type,
        prog=prog,
        description=description,
        args=argv,
        default=instance,
        use_underscores=True,
        registry=_REGISTRY,
        config=(tyro.conf.FlagConversionOff,),
      )
    if check is not None:
      args = check(args) or args
    return args, None
  except SystemExit as e:  # the help, or a failure tyro reported itself
    return None, 0 if e.code in (0, None) else 1
  except (_Rejected, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return None, 1
