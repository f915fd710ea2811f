"""Read a folder's safetensors weights (one file, or shards with an index.json) one tensor at a time, no torch.

    with SafetensorsFolder(folder, "model.safetensors") as weights:
      weights.shapes["encoder.final_layer_norm.weight"]   # from the headers, before any tensor is read
      array = weights.get("shared.weight")                # np.ndarray, read on demand

The layout is that of diffusers and transformers: either `<weights_name>`, or the shards listed by the
`weight_map` of `<weights_name>.index.json`. Everything that can be wrong is reported as a `ValueError` that
names the file: a missing or garbled index, shard paths that leave the folder, truncated or corrupted files,
and keys the index puts in a shard that does not hold them.

The loaders of the ported models (Wan DiT, Wan VAE, UMT5) also share `shape_mismatches` (the model's
tensors against a folder's) and `complete_rules` (logical sharding rules that cover every parameter).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open


def _index_entries(index_path: Path) -> dict[str, str]:
  try:
    index = json.loads(index_path.read_text())
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{index_path}: cannot be read ({e})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{index_path}: not valid JSON ({e})") from None
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index_path}: has no 'weight_map' object naming each tensor's shard file")
  bad = sorted({f for f in weight_map.values() if not isinstance(f, str)})
  if bad:
    raise ValueError(f"{index_path}: 'weight_map' values must be file names, got {bad[:3]}")
  return weight_map


def _inside(folder: Path, name: str, index_path: Path) -> Path:
  """The shard path `name` of the index, refused if it is absolute or leads out of `folder`."""
  if os.path.isabs(name) or ".." in Path(name).parts:
    raise ValueError(f"{index_path}: shard path {name!r} must be a relative path inside {folder}")
  path = (folder / name).resolve()
  if not path.is_relative_to(folder.resolve()):
    raise ValueError(f"{index_path}: shard path {name!r} leads outside {folder}")
  return path


class SafetensorsFolder:
  """The tensors of one model folder. `shapes` and `dtypes` come from the headers; `get` reads one tensor."""

  def __init__(self, folder: str | os.PathLike, weights_name: str):
    self.folder = Path(folder)
    index_path = self.folder / f"{weights_name}.index.json"
    single = self.folder / weights_name
    if index_path.is_file():
      weight_map = _index_entries(index_path)
      files = {name: _inside(self.folder, name, index_path) for name in sorted(set(weight_map.values()))}
      missing = sorted(name for name, path in files.items() if not path.is_file())
      if missing:
        raise ValueError(f"{index_path}: names shard files that are not in {self.folder}: {missing}")
      self._file_of = {key: files[name] for key, name in weight_map.items()}
    elif single.is_file():
      self._file_of = None
      files = {weights_name: single}
    else:
      raise ValueError(f"{self.folder} has neither {weights_name} nor {weights_name}.index.json")
    self._handles = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.dtypes: dict[str, str] = {}
    try:
      for path in files.values():
        handle = self._handles[path] = _open(path)
        stored = set(handle.keys())
        keys = stored if self._file_of is None else [k for k, p in self._file_of.items() if p == path]
        for key in keys:
          if key not in stored:
            raise ValueError(f"{index_path}: puts {key!r} in {path.name}, which does not hold it")
          tensor_slice = handle.get_slice(key)
          self.shapes[key] = tuple(tensor_slice.get_shape())
          self.dtypes[key] = tensor_slice.get_dtype()
      if self._file_of is None:
        self._file_of = dict.fromkeys(self.shapes, single)
    except BaseException:
      self.close()
      raise

  def keys(self) -> list[str]:
    return list(self.shapes)

  def get(self, key: str) -> np.ndarray:
    """The tensor `key` as a numpy array (bf16 tensors as ml_dtypes bfloat16)."""
    if key not in self._file_of:
      raise KeyError(f"{self.folder} has no tensor {key!r}")
    path = self._file_of[key]
    try:
      return self._handles[path].get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for damaged data
      raise ValueError(f"{path}: tensor {key!r} cannot be read ({e})") from None

  def close(self) -> None:
    self._handles.clear()  # safe_open handles hold no OS resources past garbage collection

  def __enter__(self) -> SafetensorsFolder:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _open(path: Path):
  """safe_open with the file named in the error: a truncated or garbled header fails here."""
  try:
    return safe_open(path, "np")
  except Exception as e:  # SafetensorError and OSError alike
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _listed(keys: list[str], limit: int = 6) -> str:
  return repr(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def shape_mismatches(expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> list[str]:
  """Every difference between the tensors a model expects and those a folder holds (key -> shape each), as
  phrases for one error message: missing keys, unexpected keys, then each wrong shape. Empty if they match."""
  problems = []
  if missing := sorted(set(expected) - set(shapes)):
    problems.append(f"missing keys {_listed(missing)}")
  if unexpected := sorted(set(shapes) - set(expected)):
    problems.append(f"unexpected keys {_listed(unexpected)}")
  problems += [
    f"{key}: expected shape {expected[key]}, found {shapes[key]}"
    for key in sorted(set(expected) & set(shapes))
    if tuple(shapes[key]) != tuple(expected[key])
  ]
  return problems


def complete_rules(rules, flat_state) -> list[tuple[str, str | None]]:
  """`rules` (pairs like ("embed", "fsdp")) plus a replicate-rule for every other logical axis name that the
  parameters of `flat_state` (pairs of path and nnx Variable) carry, so each parameter gets a partition spec."""
  names = {name for _, v in flat_state for name in v.get_metadata().get("out_sharding", ()) if name is not None}
  ruled = {name for name, _ in rules}
  return list(rules) + [(name, None) for name in sorted(names - ruled)]
