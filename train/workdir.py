"""A training run's folder: checked before any work, held by one trainer at a time, consistent on resume.

    workdir = check_directory(flags.workdir, "--workdir")    # a folder this process can write
    with Lock(workdir):                                       # a second trainer stops here
      truncate_metrics(workdir, resumed_step)                 # each step is logged once
      append_history(workdir, "resume", step=resumed_step)

The lock is an ``fcntl.flock`` on ``<workdir>/trainer.lock``, which the kernel releases when its holder
exits, however it exits (SIGKILL too); the file's text (pid, host, start time) is only for messages.
A lock file whose holder died is therefore free to take; taking it over prints one warning. On file
systems without ``flock`` (some cluster file systems), the file is created exclusively instead and a
holder on this host whose pid is no longer running is stale. In a multi-process run only process 0
takes the lock: the other processes share its workdir by design.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile

from sparge_jax.files import atomic_write

from .errors import CommandError, warn

LOCK_NAME = "trainer.lock"
METRICS_NAME = "metrics.jsonl"
HISTORY_NAME = "history.jsonl"
# flock is missing or refused on these file systems (NFSv3 without lockd, Lustre mounted noflock, ...).
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirBusy(CommandError):
  """Another live process holds the workdir's lock."""


# ----------------------------------------------------------------------------- paths checked before any work


def _probe_writable(folder: str, flag: str, path: str) -> None:
  try:
    with tempfile.TemporaryFile(dir=folder, prefix=".write-probe-"):
      pass
  except OSError as e:
    raise CommandError(f"{flag} {path}: cannot write in {folder} ({e.strerror})") from None


def check_directory(path: str, flag: str = "--workdir") -> str:
  """Creates the folder `path` (with its parents) if missing and checks this process can write in it.

  Returns its absolute path. Raises ``CommandError`` naming `flag` and `path` when it is a file, cannot
  be created, or cannot be written (read-only, no permission, ...).
  """
  if not path:
    raise CommandError(f"{flag} must name a directory, got {path!r}")
  if os.path.lexists(path) and not os.path.isdir(path):
    raise CommandError(f"{flag} {path}: exists and is not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise CommandError(f"{flag} {path}: cannot be created ({e.strerror})") from None
  _probe_writable(path, flag, path)
  return os.path.abspath(path)


def check_output_file(path: str, flag: str = "--out") -> str:
  """Checks that a file can be written at `path` (replacing any file there), creating its folder if missing.

  For outputs written at the end of a long computation: the check runs before the work. Returns the
  absolute path.
  """
  if not path:
    raise CommandError(f"{flag} must name a file, got {path!r}")
  if os.path.isdir(path):
    raise CommandError(f"{flag} {path}: is a directory, expected a file name")
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.lexists(folder) and not os.path.isdir(folder):
    raise CommandError(f"{flag} {path}: {folder} is not a directory")
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise CommandError(f"{flag} {path}: cannot create {folder} ({e.strerror})") from None
  _probe_writable(folder, flag, path)
  return os.path.abspath(path)


def check_new_directory(path: str, flag: str = "--out") -> str:
  """Checks that `path` does not exist yet and that its parent folder can be written (created if missing)."""
  if not path:
    raise CommandError(f"{flag} must name a directory, got {path!r}")
  if os.path.lexists(path):
    raise CommandError(f"{flag} {path}: already exists; choose a new directory")
  check_output_file(path, flag)
  return os.path.abspath(path)


# ----------------------------------------------------------------------------- the lock


def _holder_text() -> str:
  return json.dumps(
    {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "since": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
  )


def _holder(text: str) -> dict:
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict) -> str:
  if not holder.get("pid"):
    return "another process (its lock file names none)"
  since = f", since {holder['since']}" if holder.get("since") else ""
  return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}"


def _pid_running(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError, OverflowError):
    return True  # someone else's live process, or a pid we cannot judge: not stale
  return True


class Lock:
  """The exclusive lock of one workdir. ``acquire`` raises ``WorkdirBusy`` naming the holder.

  ``previous_holder`` is the holder a stale lock named (a run that died holding it), else None.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.previous_holder: dict | None = None
    self._file = None

  def acquire(self) -> Lock:
    if self._file is not None:
      raise RuntimeError(f"{self.path} is already held by this Lock")
    while self._file is None:
      try:
        fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
      except FileExistsError:
        try:
          fd, created = os.open(self.path, os.O_RDWR), False
        except FileNotFoundError:  # its holder released it just now
          continue
      f = os.fdopen(fd, "r+")  # held until release
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _holder(f.read())
        f.close()
        raise self._busy(holder) from None
      except OSError as e:
        if e.errno not in _NO_FLOCK:
          f.close()
          raise
        if created:  # an exclusive creation is the lock where flock is missing
          self._hold(f)
        else:
          f.close()
          self._acquire_exclusive_file()
        return self
      # A releasing holder unlinks the file; if it did so between our open and our flock, we hold a
      # lock on a file nobody else can see: open the current one again.
      try:
        same = os.path.samestat(os.fstat(f.fileno()), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if not same:
        f.close()
        continue
      self._take_over(_holder(f.read()))
      self._hold(f)
    return self

  def _hold(self, f) -> None:
    f.seek(0)
    f.truncate()
    f.write(_holder_text() + "\n")
    f.flush()
    self._file = f

  def _busy(self, holder: dict) -> WorkdirBusy:
    return WorkdirBusy(
      f"--workdir {self.workdir} is in use by {describe_holder(holder)}: wait for that run to finish "
      "(or stop it) or choose another --workdir"
    )

  def _take_over(self, holder: dict) -> None:
    if holder:
      self.previous_holder = holder
      warn(f"took over the lock of {self.workdir} from {describe_holder(holder)}, which is no longer running")

  def _acquire_exclusive_file(self) -> None:
    """The fallback without flock: an O_EXCL file; a holder on this host whose pid is gone is stale."""
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        with open(self.path) as f:
          holder = _holder(f.read())
        if holder.get("host") != socket.gethostname() or _pid_running(holder.get("pid")):
          raise self._busy(holder) from None
        self._take_over(holder)
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)
        continue
      self._hold(os.fdopen(fd, "r+"))
      return
    raise self._busy({})

  def release(self) -> None:
    """Removes the lock file (while still holding it, so no one can hold the removed file) and unlocks."""
    if self._file is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path)
    self._file.close()
    self._file = None

  def __enter__(self) -> Lock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ----------------------------------------------------------------------------- metrics and history


def truncate_metrics(workdir: str, step: int) -> int:
  """Drops the records of ``<workdir>/metrics.jsonl`` past `step` (and a line torn by a kill).

  A run resumed from the checkpoint of `step` logs the steps after it again; cutting them first keeps
  one record per step. Returns the number of lines dropped (0 leaves the file untouched).
  """
  path = os.path.join(workdir, METRICS_NAME)
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        record = None
      if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] > step:
        dropped += 1
        continue
      kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    with atomic_write(path, "w", encoding="utf-8") as f:
      f.writelines(kept)
  return dropped


def append_history(workdir: str, event: str, **fields) -> dict:
  """Appends one JSON line to ``<workdir>/history.jsonl``: the time, `event`, host, pid and `fields`.

  Events the trainer records: "start" (a fresh run), "resume" (from a step), "already_complete" (asked for
  the steps it has done), "config_change" (fields let through on resume: ``changes={field: [stored, new]}``),
  "damaged_checkpoint" (moved aside).
  """
  record = {
    "time": datetime.datetime.now().isoformat(timespec="seconds"),
    "event": event,
    "host": socket.gethostname(),
    "pid": os.getpid(),
    **fields,
  }
  with open(os.path.join(workdir, HISTORY_NAME), "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())
  return record


def read_history(workdir: str) -> list[dict]:
  """The records of ``<workdir>/history.jsonl`` in order (none if it does not exist; torn lines skipped)."""
  path = os.path.join(workdir, HISTORY_NAME)
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      with contextlib.suppress(ValueError):
        records.append(json.loads(line))
  return [r for r in records if isinstance(r, dict)]
