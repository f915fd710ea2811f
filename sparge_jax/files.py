"""Files written whole or not at all: write to a temporary name in the same folder, then rename.

A crash or a full disk mid-write leaves the previous file (or none), never half of a new one. The rename is
atomic on POSIX file systems because source and target share a folder.

    write_json_atomic("summary.json", {"loss": 0.1})
    with atomic_write("frames.gif", "wb") as f:
      f.write(data)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any


def creation_mode(mode: int = 0o666) -> int:
  """`mode` less the process's umask: the permissions `open` gives a new file (`mode=0o777` for a folder).
  The temporary files and folders of `tempfile` are private (0600, 0700); a finished one is given these."""
  umask = os.umask(0o077)  # reading the umask sets it; restored at once
  os.umask(umask)
  return mode & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO[Any]]:
  """Opens a temporary file beside `path`; on a clean exit it is flushed, synced and renamed to `path`.

  On an exception the temporary file is removed and `path` is left as it was.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
  path = os.fspath(path)
  folder = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      with contextlib.suppress(OSError):  # file systems without permissions (FAT, some mounts)
        os.fchmod(f.fileno(), creation_mode())
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
  """Writes `obj` as JSON to `path` through `atomic_write` (a trailing newline, UTF-8)."""
  with atomic_write(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=indent, sort_keys=sort_keys)
    f.write("\n")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` through `atomic_write`."""
  with atomic_write(path, "wb") as f:
    f.write(data)
