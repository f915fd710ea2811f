"""Continuing a workdir: its newest checkpoint that restores, checked against the run's config, with the
workdir's records brought in line with the step it resumes from.

    with workdir.Lock(path), checkpoint.Checkpoints(os.path.join(path, "checkpoints"), keep=k) as checkpoints:
      restored = resume(checkpoints, abstract_params, abstract_opt_state, to_dict(config), path, allow=allow)
      start_step = restored.step if restored else 0

Raises ``identity.ConfigChanged`` (the config differs from the checkpoint's in fields not allowed to
change) or ``identity.AlreadyPast`` (the workdir is past ``config["steps"]``) before any array is read
and without changing anything. Otherwise, on the lead process: ``metrics.jsonl`` is cut back to the
step resumed from (0 for a fresh start), and ``history.jsonl`` gets a record of each damaged step moved
aside, of the allowed config changes, and of the start, the resume, or a run found already complete.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import identity, workdir
from .checkpoint import Checkpoints, Restored


def resume(
  checkpoints: Checkpoints,
  abstract_params: Any,
  abstract_opt_state: Any,
  config: dict,
  path: str,
  *,
  allow: Iterable[str] = (),
  lead: bool = True,
) -> Restored | None:
  """The newest step of `checkpoints` that restores (None: start fresh), for the run `config` (a plain
  dict, ``train.configs.to_dict``) in the workdir `path`. `allow`: config fields that may differ from the
  checkpoint's (``identity.parse_allowed``). `lead`: whether this process writes the workdir's records."""
  allow = tuple(allow)
  changes: dict[str, tuple[Any, Any]] = {}

  def check(meta: dict) -> None:
    identity.check_steps(meta["step"], config["steps"])
    changes.update(identity.check_resume(meta["config"], config, allow=allow, step=meta["step"]))

  restored = checkpoints.restore_latest(abstract_params, abstract_opt_state, check_meta=check)
  if lead:
    step = restored.step if restored is not None else 0
    workdir.truncate_metrics(path, step)
    for moved in restored.moved_aside if restored is not None else ():
      workdir.append_history(path, "damaged_checkpoint", moved_to=moved)
    if changes:
      workdir.append_history(path, "config_change", step=step, changes={f: list(c) for f, c in changes.items()})
    event = "start" if restored is None else "already_complete" if step == config["steps"] else "resume"
    workdir.append_history(path, event, step=step)
  return restored
