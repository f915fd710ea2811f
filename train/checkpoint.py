"""Student checkpoints with orbax: ``<workdir>/checkpoints/<step>/{params,opt_state,meta}``.

``params`` and ``opt_state`` are plain pytrees of (sharded) arrays; ``meta`` is JSON
(step, data position, RNG key data, the config). Orbax writes each step to a temporary directory
and renames it when complete, so a run killed mid-save leaves only whole checkpoints behind; the
half-written temporary directory is removed on the next start.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "meta")


class Checkpoints:
  """Saves every step it is given (the caller decides when) and keeps the newest ``keep``."""

  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
      self.directory,
      item_names=ITEMS,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
    """Starts an asynchronous save; training continues while it is written."""
    self.manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(meta)
      ),
    )

  def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict]:
    """Restores onto the shardings of the abstract (``jax.ShapeDtypeStruct``) trees."""
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return restored["params"], restored["opt_state"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def find_params(path: str) -> str:
  """The ``params`` directory for a workdir, its ``checkpoints`` directory or one step directory
  (the newest step wins), or ``ValueError`` if there is none."""
  path = os.path.abspath(path)
  for candidate in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(os.path.join(candidate, "params")):
      return os.path.join(candidate, "params")
    steps = [int(d) for d in os.listdir(candidate) if d.isdigit()] if os.path.isdir(candidate) else []
    steps = [s for s in steps if os.path.isdir(os.path.join(candidate, str(s), "params"))]
    if steps:
      return os.path.join(candidate, str(max(steps)), "params")
  raise ValueError(
    f"no checkpoint under {path!r}: expected a workdir, its checkpoints/ directory or a checkpoints/<step>/ directory"
  )


def load_params(path: str, abstract_params: Any) -> Any:
  """Student params of a checkpoint (see ``find_params``), placed like ``abstract_params``."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(find_params(path), abstract_params)


def abstract(tree: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves with the given shardings (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
