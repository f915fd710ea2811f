"""Student checkpoints with orbax: ``<workdir>/checkpoints/<step>/{params,opt_state,meta}``.

``params`` and ``opt_state`` are plain pytrees of (sharded) arrays; ``meta`` is JSON (``META_FIELDS``:
step, data position, RNG key data, the run's config; ``save`` adds ``checksums`` of every array and
the ``sha256`` of meta itself). Orbax writes each step to a temporary directory
and renames it when complete, so a run killed mid-save leaves only whole checkpoints behind; the
half-written temporary directory is removed on the next start.

Resuming takes the newest step that restores completely (``Checkpoints.restore_latest``): every item
present and readable, the arrays' tree, shapes and dtypes those of the run, their values those saved
(checksums), ``meta`` complete. A newer
step that does not is moved to ``checkpoints/damaged/<step>-<item>-<problem>`` (kept, not deleted) with
one warning line; when no step restores, nothing is moved and one error says why each failed. The
``checkpoints`` directory is created by the first save, so a run that fails before it leaves none. A
failed save (a full disk) raises ``SaveFailed``, which says which earlier step is kept.

    with Checkpoints(directory, keep=3) as checkpoints:
      restored = checkpoints.restore_latest(abstract_params, abstract_opt_state, check_meta=check)
      ...
      checkpoints.save(step, params, opt_state, meta)
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from .errors import CommandError, debug, describe, is_disk_full, is_expected, warn

ITEMS = ("params", "opt_state", "meta")
# What every step's meta holds, and the JSON types of its values.
META_FIELDS = {"step": int, "data_position": int, "rng": list, "config": dict}
DAMAGED_DIR = "damaged"
_MAX_DETAIL_CHARS = 300


class DamagedCheckpoint(ValueError):
  """One item of one step cannot be restored. ``reason`` (``<item>-<kind>``) names its damaged/ folder."""

  def __init__(self, step_dir: str, step: int, item: str, kind: str, detail: str):
    self.step_dir, self.step, self.item, self.kind = step_dir, step, item, kind
    self.detail = detail if len(detail) <= _MAX_DETAIL_CHARS else detail[:_MAX_DETAIL_CHARS] + "..."
    super().__init__(f"checkpoint {step_dir}: {item} {self.detail}")

  @property
  def reason(self) -> str:
    return f"{self.item}-{self.kind}"


class SaveFailed(CommandError):
  """A checkpoint could not be written; the message says which earlier step is kept."""


class Restored(NamedTuple):
  step: int
  params: Any
  opt_state: Any
  meta: dict
  moved_aside: list[str]  # the damaged newer steps, where they now are


# ----------------------------------------------------------------------------- orbax's own log lines


class _OrbaxLogFilter(logging.Filter):
  """Drops orbax's log records below CRITICAL (unless SPARGE_DEBUG): the faults they log from its
  threads reach us as exceptions, which the commands report in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return debug() or record.levelno >= logging.CRITICAL or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs() -> None:
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxLogFilter) for f in logger.filters):
    logger.addFilter(_OrbaxLogFilter())


# ----------------------------------------------------------------------------- checks


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _leaves(tree: Any) -> dict[str, Any]:
  """Leaves by dotted path; dict keys, attribute names and sequence indices all read as names, so a
  namedtuple state and orbax's dict-shaped metadata of it agree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _spec(leaf) -> str:
  return f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"


def tree_problem(stored: Any, expected: Any) -> str | None:
  """What differs between a stored tree's metadata (leaves with ``shape`` and ``dtype``) and the
  ``jax.ShapeDtypeStruct`` tree the run expects, or None. Orbax would cast dtypes silently."""
  have, want = _leaves(stored), _leaves(expected)
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing:
    return f"lacks {len(missing)} of the run's arrays (first: {missing[0]})"
  if extra:
    return f"has {len(extra)} arrays the run does not (first: {extra[0]})"
  for name, target in want.items():
    leaf = have[name]
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
      return f"stores {name} as {type(leaf).__name__}, not an array"
    if tuple(leaf.shape) != tuple(target.shape) or np.dtype(leaf.dtype) != np.dtype(target.dtype):
      return f"stores {name} as {_spec(leaf)}, the run has {_spec(target)}"
  return None


def meta_problem(meta: Any, step: int) -> str | None:
  """What is wrong with a step's meta (``META_FIELDS``, and its step number), or None."""
  if not isinstance(meta, dict):
    return f"is a JSON {type(meta).__name__}, not an object"
  for field, kind in META_FIELDS.items():
    if field not in meta:
      return f"has no {field!r}"
    value = meta[field]
    if isinstance(value, bool) or not isinstance(value, kind):
      return f"{field!r} is {value!r}, not a JSON {'integer' if kind is int else kind.__name__}"
  if meta["step"] != step:
    return f"says step {meta['step']}, in the directory of step {step}"
  if meta["data_position"] < 0:
    return f"'data_position' is {meta['data_position']}, negative"
  sums = meta.get("checksums", {})
  if not isinstance(sums, dict) or not all(
    isinstance(sums.get(item, {}), dict) and all(isinstance(v, int) for v in sums.get(item, {}).values())
    for item in ("params", "opt_state")
  ):
    return "'checksums' is not {item: {array: integer}}"
  if not meta["rng"] or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in meta["rng"]):
    return "'rng' is not a list of uint32 key words"
  return None


def _stored_tree(directory: str) -> Any:
  """The metadata tree (leaves with shape and dtype) of a saved pytree item."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(epath.Path(directory)).tree
  finally:
    handler.close()


def _word_sum(x: jax.Array) -> jax.Array:
  """The wrapping uint32 sum of an array's bit patterns: any one flipped bit changes it."""
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize < 4:
    words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
  else:  # 8-byte types become [..., 2] words
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.sum(words, dtype=jnp.uint32)


@jax.jit
def _word_sums(tree: Any) -> jax.Array:
  """The `_word_sum` of each leaf, in leaf order, as one uint32 vector (one transfer to the host)."""
  return jnp.stack([_word_sum(x) for x in jax.tree.leaves(tree)] or [jnp.uint32(0)])


def checksums(tree: Any) -> dict[str, int]:
  """{dotted path: wrapping uint32 sum of the leaf's bit patterns}, computed where the arrays live.

  Orbax keeps no checksum of array values, so a flipped or overwritten byte inside a data file would
  restore silently; ``Checkpoints`` stores these with each step and compares them on restore.
  """
  names = list(_leaves(tree))
  sums = _word_sums(tree)
  if sums.is_fully_replicated:  # the usual case: every process reads its own copy
    sums = np.asarray(sums.addressable_data(0))
  else:
    from jax.experimental import multihost_utils  # noqa: PLC0415 (rare)

    sums = multihost_utils.process_allgather(sums, tiled=True)
  return {name: int(value) for name, value in zip(names, sums)}


def _meta_digest(meta: dict) -> str:
  """sha256 of a meta's canonical JSON without its own digest: a changed value in valid JSON shows."""
  rest = {k: v for k, v in meta.items() if k != "sha256"}
  return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _everywhere(ok: bool) -> bool:
  """True when `ok` on every process (each reads the same step; all must take the same one)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-process only)

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


# ----------------------------------------------------------------------------- the manager


def orbax_threads() -> list[threading.Thread]:
  """Orbax's live threads (writers, finalizers), other than the caller's."""
  return [
    t
    for t in threading.enumerate()
    if type(t).__module__.startswith("orbax.") and t is not threading.current_thread() and t.is_alive()
  ]


def _join_orbax_threads(timeout_s: float = 300.0) -> None:
  """Waits for orbax's threads: when one item of a save fails, orbax stops waiting for the others,
  whose threads go on writing into the step's temporary directory; ``close`` leaves some finishing."""
  for thread in orbax_threads():
    thread.join(timeout_s)


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  # Declared up front, so a fresh manager can read any single item (and its metadata) without warnings.
  return {
    "params": ocp.StandardCheckpointHandler(),
    "opt_state": ocp.StandardCheckpointHandler(),
    "meta": ocp.JsonCheckpointHandler(),
  }


class Checkpoints:
  """Saves every step it is given (the caller decides when) and keeps the newest ``keep``.

  Close it (or use it as a context manager) on every exit path: that waits for an asynchronous save
  in flight and stops orbax's threads.
  """

  def __init__(self, directory: str, *, keep: int):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    quiet_orbax_logs()
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._pending: int | None = None  # the step of a save that may still be running
    self._manager: ocp.CheckpointManager | None = None
    if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
      raise CommandError(f"checkpoint directory {self.directory} exists and is not a directory")
    if os.path.isdir(self.directory):
      self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
      self.directory,
      item_handlers=_handlers(),
      options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True, cleanup_tmp_directories=True),
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps()) if self._manager is not None else []

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # --------------------------------------------------------------------------- saving

  def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
    """Starts an asynchronous save; training continues while it is written. The first save creates
    the directory. Raises ``SaveFailed`` for this save, or for the previous one if that failed."""
    self.wait()
    if self._manager is None:
      self._manager = self._open()
    meta = {**meta, "checksums": {"params": checksums(params), "opt_state": checksums(opt_state)}}
    meta["sha256"] = _meta_digest(meta)
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          opt_state=ocp.args.StandardSave(opt_state),
          meta=ocp.args.JsonSave(meta),
        ),
      )
    except Exception as e:
      if not is_expected(e):
        raise
      raise self._failed(step, e) from e
    self._pending = step

  def wait(self) -> None:
    """Waits for a save in flight; ``SaveFailed`` if it failed."""
    if self._manager is None or self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      if not is_expected(e):
        raise
      raise self._failed(step, e) from e

  def _failed(self, step: int, error: Exception) -> SaveFailed:
    # Orbax's threads may still be writing the failed step's other items, and its list of steps is
    # stale: close the manager (which waits for them), remove the temporaries, open a fresh one.
    manager, self._manager = self._manager, None
    try:
      manager.close()
    except Exception:  # the first error is the one to report
      pass
    _join_orbax_threads()
    if jax.process_index() == 0:  # a full disk wants its space back
      for tmp in glob.glob(os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(tmp, ignore_errors=True)
    self._manager = self._open()
    earlier = [s for s in self.steps() if s < step]
    kept = (
      f"the previous checkpoint, step {earlier[-1]} ({self.step_dir(earlier[-1])}), is kept"
      if earlier
      else "there is no earlier checkpoint"
    )
    cause = "the disk is full" if is_disk_full(error) else describe(error)[:_MAX_DETAIL_CHARS]
    return SaveFailed(
      f"saving checkpoint step {step} in {self.directory} failed ({cause}); {kept}. "
      "Fix the cause (free space) and run again to resume from there"
    )

  # --------------------------------------------------------------------------- restoring

  def restore(
    self, step: int, abstract_params: Any, abstract_opt_state: Any, *, check_meta: Callable[[dict], None] | None = None
  ) -> tuple[Any, Any, dict]:
    """Restores onto the shardings of the abstract (``jax.ShapeDtypeStruct``) trees.

    Raises ``DamagedCheckpoint`` naming the first item that is missing, unreadable or unlike the
    abstract trees. ``check_meta(meta)`` runs after meta is read and before any array is: its
    exceptions (a changed config, say) pass through, and nothing is judged damaged for them.
    """
    step_dir = self.step_dir(step)
    for item in ITEMS:
      if not os.path.isdir(os.path.join(step_dir, item)):
        raise DamagedCheckpoint(step_dir, step, item, "missing", "is missing")
    meta = self._restore_item(step, "meta", ocp.args.JsonRestore())
    if isinstance(meta, dict) and "sha256" in meta and meta["sha256"] != _meta_digest(meta):
      raise DamagedCheckpoint(step_dir, step, "meta", "checksum", "differs from its saved sha256")
    problem = meta_problem(meta, step)
    if problem:
      raise DamagedCheckpoint(step_dir, step, "meta", "invalid", problem)
    if check_meta is not None:
      check_meta(meta)
    targets = {"params": abstract_params, "opt_state": abstract_opt_state}
    for item, target in targets.items():
      try:
        stored = _stored_tree(os.path.join(step_dir, item))
      except Exception as e:  # orbax raises json, unicode, key and value errors alike
        raise DamagedCheckpoint(step_dir, step, item, "unreadable", f"metadata cannot be read ({describe(e)})") from e
      problem = tree_problem(stored, target)
      if problem:
        raise DamagedCheckpoint(step_dir, step, item, "mismatch", problem)
    restored = {item: self._restore_item(step, item, ocp.args.StandardRestore(t)) for item, t in targets.items()}
    for item, tree in restored.items():
      saved = meta.get("checksums", {}).get(item)
      if saved is None:  # written before checksums were kept
        continue
      wrong = sorted(name for name, value in checksums(tree).items() if saved.get(name) != value)
      if wrong:
        raise DamagedCheckpoint(
          step_dir, step, item, "checksum", f"has {len(wrong)} arrays unlike their saved checksums (first: {wrong[0]})"
        )
    return restored["params"], restored["opt_state"], meta

  def _restore_item(self, step: int, item: str, args) -> Any:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:  # tensorstore, json, unicode and key errors alike
      raise DamagedCheckpoint(self.step_dir(step), step, item, "unreadable", f"cannot be read ({describe(e)})") from e

  def restore_latest(
    self, abstract_params: Any, abstract_opt_state: Any, *, check_meta: Callable[[dict], None] | None = None
  ) -> Restored | None:
    """The newest step that restores completely, or None when there is no checkpoint.

    Newer damaged steps are moved to ``damaged/`` with one warning each. If steps exist and none
    restores, raises ``CommandError`` listing why, and moves nothing.
    """
    damaged: list[DamagedCheckpoint] = []
    for step in reversed(self.steps()):
      try:
        params, opt_state, meta = self.restore(step, abstract_params, abstract_opt_state, check_meta=check_meta)
        ok = True
      except DamagedCheckpoint as e:
        damaged.append(e)
        ok = False
      if not _everywhere(ok):
        if ok:
          damaged.append(DamagedCheckpoint(self.step_dir(step), step, "step", "unreadable", "fails on another process"))
        continue
      moved = [self._move_aside(d, resume_step=step) for d in damaged]
      return Restored(step, params, opt_state, meta, moved)
    if damaged:
      raise CommandError(
        f"no checkpoint in {self.directory} restores: "
        + "; ".join(f"step {d.step}: {d.item} {d.detail}" for d in damaged)
        + ". Nothing was moved: repair or remove them, or use another --workdir"
      )
    return None

  def _move_aside(self, damage: DamagedCheckpoint, *, resume_step: int) -> str:
    folder = os.path.join(self.directory, DAMAGED_DIR)
    target = os.path.join(folder, f"{damage.step}-{damage.reason}")
    suffix = 1
    while os.path.lexists(target):
      suffix += 1
      target = os.path.join(folder, f"{damage.step}-{damage.reason}-{suffix}")
    if jax.process_index() == 0:
      os.makedirs(folder, exist_ok=True)
      os.rename(damage.step_dir, target)
      warn(
        f"checkpoint step {damage.step} is damaged ({damage.item} {damage.detail}); moved to {target}, resuming from step {resume_step}"
      )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-process only)

      multihost_utils.sync_global_devices(f"checkpoint: moved step {damage.step} aside")
    self._manager.reload()
    return target

  # --------------------------------------------------------------------------- closing

  def close(self) -> None:
    """Waits for a save in flight (``SaveFailed`` if it failed) and stops orbax's threads."""
    if self._manager is None:
      return
    failure = None
    try:
      self.wait()
    except SaveFailed as e:
      failure = e
    manager, self._manager = self._manager, None
    try:
      manager.close()
    except Exception:
      if failure is None:
        raise
    finally:
      _join_orbax_threads()
    if failure is not None:
      raise failure

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # the exception in flight is the one to report; a failed save behind it is a warning
      self.close()
    except Exception as e:
      warn(describe(e))


# ----------------------------------------------------------------------------- reading params elsewhere


def _params_dirs(path: str) -> list[str]:
  """The ``params`` directories `path` offers, newest step first: a params directory itself, a step
  directory, a ``checkpoints`` directory or a workdir."""
  path = os.path.abspath(path)
  if os.path.basename(path) == "params" and os.path.isdir(path):
    return [path]
  for candidate in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(os.path.join(candidate, "params")):
      return [os.path.join(candidate, "params")]
    steps = [int(d) for d in os.listdir(candidate) if d.isdigit()] if os.path.isdir(candidate) else []
    found = [os.path.join(candidate, str(s), "params") for s in sorted(steps, reverse=True)]
    found = [f for f in found if os.path.isdir(f)]
    if found:
      return found
  raise ValueError(
    f"no checkpoint under {path!r}: expected a workdir, its checkpoints/ directory or a checkpoints/<step>/ directory"
  )


def find_params(path: str) -> str:
  """The newest ``params`` directory for a workdir, its ``checkpoints`` directory or one step
  directory, or ``ValueError`` if there is none (whether it restores is ``load_newest_params``'s to say)."""
  return _params_dirs(path)[0]


def load_newest_params(path: str, abstract_params: Any) -> tuple[Any, str]:
  """(params, their directory): the newest checkpoint at `path` (see ``find_params``) that restores,
  placed like ``abstract_params``. Damaged newer steps are skipped with a warning and left in place;
  ``ValueError`` naming each when none restores."""
  quiet_orbax_logs()
  problems = []
  with ocp.StandardCheckpointer() as checkpointer:
    for params_dir in _params_dirs(path):
      try:
        stored = _stored_tree(params_dir)
        problem = tree_problem(stored, abstract_params)
        if problem is None:
          params = checkpointer.restore(params_dir, abstract_params)
      except Exception as e:  # orbax raises json, unicode, key and value errors alike
        problem = f"cannot be read ({describe(e)[:_MAX_DETAIL_CHARS]})"
      if problem is None:
        for skipped in problems:
          warn(f"skipped the damaged checkpoint {skipped}; using {params_dir}")
        return params, params_dir
      problems.append(f"{params_dir}: {problem}")
  raise ValueError(f"no checkpoint under {path} restores: {'; '.join(problems)}")


def load_params(path: str, abstract_params: Any) -> Any:
  """Student params of the newest checkpoint at `path` that restores (see ``load_newest_params``)."""
  return load_newest_params(path, abstract_params)[0]


def abstract(tree: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves with the given shardings (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
