"""The benchmarks' results files: where they go, what they record about the run, and how they are written.

Every command writes one JSON file, `benchmarks/results/<what>-<device-slug>.json` (`results_path`), whole
or not at all (`sparge_jax.files.write_json_atomic`), with the device, the jax version, the date and the git
commit of the code that ran (`provenance`) beside its own payload.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess

import jax

from sparge_jax.files import write_json_atomic

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
  """The first jax device's kind, e.g. "NVIDIA H200" ("cpu" on a CPU)."""
  device = jax.devices()[0]
  return getattr(device, "device_kind", device.platform)


def device_slug(name: str | None = None) -> str:
  """A file-name form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
  name = device_name() if name is None else name
  return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def git_commit() -> str | None:
  """The commit of the checkout that holds this file, with "-dirty" if it has uncommitted changes; None
  where there is no git or no repository (a copied tree)."""
  folder = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
    status = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      cwd=folder,
      capture_output=True,
      text=True,
      check=True,
      timeout=10,
    ).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("-dirty" if status.strip() else "")


def provenance(device: str | None = None) -> dict:
  """What a results file records about its run. `device` defaults to `device_name()`; a command that
  leaves jax off the GPU (a PyTorch peer) names the device itself."""
  return {
    "device": device_name() if device is None else device,
    "jax_version": jax.__version__,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "git_commit": git_commit(),
  }


def results_path(what: str, device: str | None = None) -> str:
  """benchmarks/results/<what>-<device-slug>.json."""
  return os.path.join(RESULTS_DIR, f"{what}-{device_slug(device)}.json")


def write_results(path: str | os.PathLike, payload: dict, *, device: str | None = None) -> None:
  """Writes `provenance(device)` and then `payload` as one JSON file, atomically; creates the folder."""
  os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
  write_json_atomic(path, {**provenance(device), **payload})


def read_results(path: str | os.PathLike) -> dict:
  """A results file's payload."""
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def add_sections(path: str | os.PathLike, sections: dict) -> None:
  """Sets top-level `sections` ({name: value}) in the results file at `path`, keeping what else it holds
  (a file that does not exist yet starts empty); atomically, like `write_results`. How a peer's rows join
  ours in one file."""
  payload = read_results(path) if os.path.exists(path) else {}
  os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
  write_json_atomic(path, {**payload, **sections})
