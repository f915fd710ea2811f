"""A run's identity: the config fields that decide what it computes, compared when a workdir is resumed.

Every checkpoint stores the config of the run that wrote it (``meta["config"]``, a plain dict from
``train.configs.to_dict``). A resumed run must compute what that run computed, so every field must be
the same except ``FREE_FIELDS``:

- ``name``: a label;
- ``steps``: train further (a run already past the new ``steps`` changes nothing: ``check_steps``);
- ``checkpoint_every``, ``keep_checkpoints``, ``log_every``: when to save and to log;
- ``eval``: what is measured, not trained; ``data.workers``, ``data.prefetch``: how the same batches are read;
- ``mesh``: how the devices split the same global batch (restores go onto the new shardings);
- ``model.remat``, ``model.remat_saves``: memory traded for recomputation, the same results;
- ``attention.implementation`` (and the older ``attention.backend``): which kernels run the same rule;
- ``model.attention``, ``model.compute_dtype``, ``model.param_dtype``, ``model.batch_axes``: the
  trainer ignores these and sets them itself (from ``attention``, ``compute_dtype`` and the mesh).

Anything else (model, teacher, data, attention rule, loss, optimizer and schedule, dtype, seed, batch
size, ...) differs only when allowed by name, ``--allow-config-change=seed,attention.topk`` (a field or
a group such as ``attention``); the trainer records each allowed change in the workdir's history.
A field only one of the two configs has (one written by another version) is not compared: new fields
are part of the identity from the first run that records them.

    changes = check_resume(stored_config, to_dict(config), allow=parse_allowed(flag, to_dict(config)))
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import CommandError

FREE_FIELDS = (
  "name",
  "steps",
  "checkpoint_every",
  "keep_checkpoints",
  "log_every",
  "eval",
  "data.workers",
  "data.prefetch",
  "mesh",
  "model.remat",
  "model.remat_saves",
  "attention.implementation",
  "attention.backend",
  "model.attention",
  "model.compute_dtype",
  "model.param_dtype",
  "model.batch_axes",
)
OVERRIDE_FLAG = "--allow-config-change"


class ConfigChanged(CommandError):
  """The config of a resumed run differs from its checkpoint's in fields not allowed to change."""


class AlreadyPast(CommandError):
  """A workdir is already at or past the steps asked for; nothing was changed."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"attention": {"topk": 0.1}}`` -> ``{"attention.topk": 0.1}``; lists and other values are leaves."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{name}."))
    else:
      flat[name] = value
  return flat


def _under(field: str, group: str) -> bool:
  return field == group or field.startswith(group + ".")


def is_free(field: str) -> bool:
  return any(_under(field, free) for free in FREE_FIELDS)


def _canonical(value: Any) -> Any:
  # Tuples and lists (and a config written to JSON and read back) compare equal.
  return json.loads(json.dumps(value, default=str))


def differences(stored: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """``{field: (stored value, new value)}`` for each identity field (not in ``FREE_FIELDS``) that both
  configs have and that differs."""
  old, now = flatten(stored), flatten(new)
  changes = {}
  for field in sorted(set(old) & set(now)):
    if is_free(field):
      continue
    a, b = _canonical(old[field]), _canonical(now[field])
    if a != b:
      changes[field] = (a, b)
  return changes


def parse_allowed(spec: str | Sequence[str] | None, config: Mapping[str, Any]) -> tuple[str, ...]:
  """The field names of an override (``"seed,attention.topk"`` or a sequence), each checked against `config`.

  A name is a field (``attention.topk``) or a group of fields (``attention``); an unknown name raises
  ``ValueError`` naming it.
  """
  if spec is None:
    return ()
  names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
  names = [n for n in names if n]
  fields = list(flatten(config))
  unknown = [n for n in names if not any(_under(f, n) for f in fields)]
  if unknown:
    raise ValueError(f"{OVERRIDE_FLAG}: {unknown} are not config fields (names look like seed or attention.topk)")
  return tuple(names)


def check_resume(
  stored: Mapping[str, Any], new: Mapping[str, Any], *, allow: Iterable[str] = (), step: int | None = None
) -> dict[str, tuple[Any, Any]]:
  """Compares a resumed run's config `new` with the `stored` one of its checkpoint (at `step`).

  Returns the changes that `allow` lets through, for the history; raises ``ConfigChanged`` listing
  every other change (field: stored -> new) and how to proceed.
  """
  allow = tuple(allow)
  changes = differences(stored, new)
  allowed = {f: c for f, c in changes.items() if any(_under(f, a) for a in allow)}
  refused = {f: c for f, c in changes.items() if f not in allowed}
  if refused:
    at = f" at step {step}" if step is not None else ""
    listed = "; ".join(f"{f}: {json.dumps(a)} -> {json.dumps(b)}" for f, (a, b) in refused.items())
    raise ConfigChanged(
      f"the config differs from the checkpoint{at} being resumed in {len(refused)} field(s): {listed}. "
      f"Resume with the stored values, start a new --workdir, or pass {OVERRIDE_FLAG}={','.join(refused)} "
      "to change them (recorded in the workdir's history.jsonl)"
    )
  return allowed


def check_steps(done: int, steps: int) -> int:
  """The steps left from `done` to `steps`; ``AlreadyPast`` when `steps` < `done` (0 left: a finished run)."""
  if done > steps:
    raise AlreadyPast(
      f"the workdir is already at step {done}, past --config.steps={steps}; nothing was changed "
      f"(pass --config.steps above {done} to train further, or use a new --workdir)"
    )
  return steps - done
