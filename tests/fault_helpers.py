"""Helpers of the fault-injection tests: faults that need a mount (a full disk, a read-only folder) run in a
user mount namespace (``unshare -Urm``), where the machine allows one."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def can_unshare() -> bool:
  if shutil.which("unshare") is None:
    return False
  return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


needs_mount_namespace = pytest.mark.skipif(not can_unshare(), reason="no user mount namespaces (unshare -Urm)")


def in_mount_namespace(setup: str, folder, code: str, timeout=300) -> subprocess.CompletedProcess:
  """Runs `setup` (a shell command on "$0", the folder) then `code` in Python, in a new mount namespace."""
  script = f'{setup} && exec "$1" -c "$2" "$0"'
  return subprocess.run(
    ["unshare", "-Urm", "sh", "-c", script, str(folder), sys.executable, textwrap.dedent(code)],
    capture_output=True,
    text=True,
    env=ENV,
    timeout=timeout,
    cwd=ROOT,
  )


def in_read_only_folder(folder, code: str, timeout=300) -> tuple[subprocess.CompletedProcess, str]:
  """Runs `code` in Python (``sys.argv[1]`` is `folder`) while `folder` is read-only: a read-only bind mount
  in a user mount namespace as root (root writes through permission bits), its permission bits otherwise.
  Returns the result and the reason a write fails there ("Read-only file system" or "Permission denied")."""
  if os.geteuid() != 0:
    mode = os.stat(folder).st_mode
    os.chmod(folder, 0o555)
    try:
      command = [sys.executable, "-c", textwrap.dedent(code), str(folder)]
      result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)
    finally:
      os.chmod(folder, mode)
    return result, "Permission denied"
  if not can_unshare():
    pytest.skip("root without mount namespaces: no way to make a folder read-only")
  setup = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0"'
  return in_mount_namespace(setup, folder, code, timeout=timeout), "Read-only file system"
