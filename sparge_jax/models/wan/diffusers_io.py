"""Read and write diffusers `WanTransformer3DModel` folders (config.json + safetensors) without torch.

A folder holds `config.json` and either `diffusion_pytorch_model.safetensors` or shards listed in
`diffusion_pytorch_model.safetensors.index.json`. Everything that can be wrong with one (folder,
config fields, key set, shapes) is checked from config.json and the safetensors headers before any
array is built. The model is then built abstractly and each parameter is read, laid out and placed
on its own, so host memory peaks at one parameter (one stacked [layers, ...] array), not the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from sparge_jax.config import AttentionConfig
from sparge_jax.models.safetensors_io import SafetensorsFolder, complete_rules, shape_mismatches
from sparge_jax.models.wan.model import WanConfig, WanModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# The self-attention settings beside config.json: diffusers ignores the file, `load_diffusers` reads it, so a
# saved sparse student loads sparse.
ATTENTION_NAME = "sparge_attention.json"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DIFFUSERS_CLASS = "WanTransformer3DModel"

# config.json fields that are WanConfig fields of the same name and meaning.
_ARCHITECTURE_FIELDS = (
  "patch_size",
  "num_attention_heads",
  "attention_head_dim",
  "in_channels",
  "out_channels",
  "text_dim",
  "freq_dim",
  "ffn_dim",
  "num_layers",
  "cross_attn_norm",
  "eps",
  "rope_max_seq_len",
)
# Image-to-video fields: supported only when absent (null).
_IMAGE_FIELDS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
# diffusers builds the same RMS qk-norm whatever this says.
_IGNORED_FIELDS = ("qk_norm",)
_RUN_OPTIONS = (
  "attention",
  "remat",
  "remat_saves",
  "compute_dtype",
  "batch_axes",
  "sequence_axes",
  "sequence_parallel",
)


# Layouts: how a diffusers (torch) tensor becomes a model parameter.
#   linear: torch Linear weight [out, in] -> kernel [in, out]
#   conv:   Conv3d weight [dim, channels, pt, ph, pw] -> [pt, ph, pw, channels, dim]
#   table:  modulation table [1, rows, dim] -> [rows, dim]
#   same:   unchanged
def _to_model(array: np.ndarray, layout: str) -> np.ndarray:
  return {
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 4, 1, 0),
    "table": lambda a: a[0],
    "same": lambda a: a,
  }[layout](array)


def _to_diffusers(array: np.ndarray, layout: str) -> np.ndarray:
  return {
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(4, 3, 0, 1, 2),
    "table": lambda a: a[None],
    "same": lambda a: a,
  }[layout](array)


def _diffusers_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  return _to_diffusers(np.empty(shape, np.bool_), layout).shape


def _linear_pair(model_name: str, diffusers_name: str) -> dict:
  return {
    (model_name, "kernel"): (diffusers_name + ".weight", "linear"),
    (model_name, "bias"): (diffusers_name + ".bias", "same"),
  }


_TOP_LEVEL = {
  ("patch_embed",): ("patch_embedding.weight", "conv"),
  ("patch_embed_bias",): ("patch_embedding.bias", "same"),
  **_linear_pair("time_in", "condition_embedder.time_embedder.linear_1"),
  **_linear_pair("time_out", "condition_embedder.time_embedder.linear_2"),
  **_linear_pair("time_modulation", "condition_embedder.time_proj"),
  **_linear_pair("text_in", "condition_embedder.text_embedder.linear_1"),
  **_linear_pair("text_out", "condition_embedder.text_embedder.linear_2"),
  **_linear_pair("head", "proj_out"),
  ("head_modulation",): ("scale_shift_table", "table"),
}
_PER_BLOCK = {
  **{
    (attn, *path): (f"{torch_attn}.{key}", layout)
    for attn, torch_attn in (("self_attn", "attn1"), ("cross_attn", "attn2"))
    for proj, torch_proj in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("out", "to_out.0"))
    for path, (key, layout) in _linear_pair(proj, torch_proj).items()
  },
  **{
    (attn, norm, "scale"): (f"{torch_attn}.{torch_norm}.weight", "same")
    for attn, torch_attn in (("self_attn", "attn1"), ("cross_attn", "attn2"))
    for norm, torch_norm in (("query_norm", "norm_q"), ("key_norm", "norm_k"))
  },
  ("cross_norm", "scale"): ("norm2.weight", "same"),
  ("cross_norm", "bias"): ("norm2.bias", "same"),
  **_linear_pair("ffn_in", "ffn.net.0.proj"),
  **_linear_pair("ffn_out", "ffn.net.2"),
  ("modulation",): ("scale_shift_table", "table"),
}


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One model parameter and the diffusers tensors it is made of (one per layer for block parameters)."""

  path: tuple[str, ...]
  keys: tuple[str, ...]
  layout: str
  shape: tuple[int, ...]  # the model parameter's shape

  @property
  def tensor_shape(self) -> tuple[int, ...]:
    per_tensor = self.shape[1:] if self.path[0] == "blocks" else self.shape
    return _diffusers_shape(per_tensor, self.layout)


def _plan(flat_state, num_layers: int) -> list[_Entry]:
  entries = []
  for path, variable in flat_state:
    path = tuple(str(p) for p in path)
    if path[0] == "blocks":
      key, layout = _PER_BLOCK[path[1:]]
      keys = tuple(f"blocks.{i}.{key}" for i in range(num_layers))
    else:
      key, layout = _TOP_LEVEL[path]
      keys = (key,)
    entries.append(_Entry(path, keys, layout, tuple(variable.shape)))
  return entries


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _field_problem(name: str, value) -> str | None:
  """What is wrong with the type or range of an architecture field of config.json, or None."""
  if name == "patch_size":
    if not (isinstance(value, list) and len(value) == 3 and all(_is_int(v) and v >= 1 for v in value)):
      return "must be a list of 3 positive integers"
  elif name == "cross_attn_norm":
    if not isinstance(value, bool):
      return "must be true or false"
  elif name == "eps":
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
      return "must be a positive number"
  elif name == "out_channels" and value is None:
    return None
  elif not (_is_int(value) and value >= 1):
    return "must be a positive integer"
  return None


def read_config(path: str | os.PathLike) -> dict:
  """The fields of a config.json, or a ValueError naming the file when it cannot be read or is not
  a JSON object."""
  path = Path(path)
  try:
    fields = json.loads(path.read_text(encoding="utf-8"))
  except OSError as e:
    raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
  except ValueError as e:  # invalid JSON or UTF-8
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(fields, dict):
    raise ValueError(f"{path}: a JSON {type(fields).__name__}, not an object of config fields")
  return fields


def config_from_diffusers(fields: dict, *, dtype=jnp.float32, source: str = "config.json", **overrides) -> WanConfig:
  """A WanConfig from config.json's fields; `overrides` set run options (attention, remat, compute_dtype).

  source: how errors name the fields' file (load_diffusers passes its path).
  """
  unknown = sorted(
    k for k in fields if not k.startswith("_") and k not in _ARCHITECTURE_FIELDS + _IMAGE_FIELDS + _IGNORED_FIELDS
  )
  if unknown:
    raise ValueError(f"{source} has unknown fields {unknown}")
  if fields.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
    raise ValueError(f"{source} describes a {fields['_class_name']}, not a {DIFFUSERS_CLASS}")
  image = {k: fields[k] for k in _IMAGE_FIELDS if fields.get(k) is not None}
  if image:
    raise ValueError(f"image-to-video Wan models are not supported ({source} sets {image})")
  for name in _ARCHITECTURE_FIELDS:
    problem = _field_problem(name, fields[name]) if name in fields else None
    if problem:
      raise ValueError(f"{source}: field {name!r} {problem}, got {fields[name]!r}")
  bad = sorted(k for k in overrides if k not in _RUN_OPTIONS)
  if bad:
    raise ValueError(f"overrides {bad} are not run options {_RUN_OPTIONS}; architecture comes from config.json")
  architecture = {k: fields[k] for k in _ARCHITECTURE_FIELDS if k in fields}
  if architecture.get("out_channels") is None:  # diffusers: out_channels or in_channels
    architecture["out_channels"] = architecture.get("in_channels", WanConfig.in_channels)
  overrides.setdefault("compute_dtype", dtype)
  try:
    return WanConfig(**architecture, param_dtype=dtype, **overrides)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def config_to_diffusers(config: WanConfig) -> dict:
  """The config.json fields of diffusers' `WanTransformer3DModel` for `config`'s architecture (run options
  are not saved); `config_from_diffusers` reads them back."""
  fields = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.42.0"}
  fields.update({k: getattr(config, k) for k in _ARCHITECTURE_FIELDS})
  fields["patch_size"] = list(config.patch_size)
  fields.update({k: None for k in _IMAGE_FIELDS}, qk_norm="rms_norm_across_heads")
  return fields


def _check_tensors(entries: list[_Entry], shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
  expected = {key: entry.tensor_shape for entry in entries for key in entry.keys}
  if problems := shape_mismatches(expected, shapes):
    raise ValueError(f"{folder}: the weights do not match its {CONFIG_NAME}: " + "; ".join(problems))


def load_diffusers(
  path: str | os.PathLike,
  *,
  dtype=jnp.float32,
  mesh: jax.sharding.Mesh | None = None,
  rules: Sequence[tuple[str, str | None]] = (),
  **overrides,
) -> WanModel:
  """Load a diffusers Wan transformer folder as a WanModel with parameters in `dtype`.

  mesh: place each parameter sharded over it, by the logical axis names of the model docstring
    mapped through `rules` (pairs like ("embed", "fsdp"); names without a rule are replicated).
  overrides: run options - `attention` (AttentionConfig; default: the folder's sparge_attention.json as
    `save_diffusers` writes it, else dense), `remat`, `compute_dtype` (default `dtype`), `batch_axes`,
    `sequence_axes`, `sequence_parallel`.
  """
  folder = Path(path)
  if not folder.is_dir() or not (folder / CONFIG_NAME).is_file():
    raise ValueError(f"path {folder} is not a diffusers transformer folder (no {CONFIG_NAME})")
  if overrides.get("attention") is None:
    overrides.pop("attention", None)
    if (folder / ATTENTION_NAME).is_file():
      overrides["attention"] = read_attention(folder / ATTENTION_NAME)
  config_path = folder / CONFIG_NAME
  config = config_from_diffusers(read_config(config_path), dtype=dtype, source=str(config_path), **overrides)
  weights = SafetensorsFolder(folder, WEIGHTS_NAME)

  abstract = nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))
  entries = _plan(flat, config.num_layers)
  _check_tensors(entries, weights.shapes, folder)

  if mesh is not None:
    with nnx.logical_axis_rules(complete_rules(rules, flat)):
      specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
  host_dtype = np.dtype(dtype)
  placed = []
  for entry, (path, variable) in zip(entries, flat):
    host = np.empty(entry.shape, host_dtype)
    tensors = [_to_model(weights.get(key), entry.layout) for key in entry.keys]
    if path[0] == "blocks":
      for layer, tensor in enumerate(tensors):
        host[layer] = tensor
    else:
      host[...] = tensors[0]
    if mesh is None:
      value = jnp.asarray(host)
    else:
      sharding = jax.sharding.NamedSharding(mesh, specs[path].get_value())
      value = jax.make_array_from_callback(host.shape, sharding, lambda index, host=host: host[index])
    placed.append((path, variable.replace(value=value)))
    del host, tensors
  return nnx.merge(graphdef, nnx.from_flat_state(placed))


def read_attention(path: str | os.PathLike) -> AttentionConfig:
  """The AttentionConfig a sparge_attention.json states; ValueError naming the file and the field if it is bad."""
  try:
    fields = json.loads(Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable attention settings file ({e})") from None
  if not isinstance(fields, dict):
    raise ValueError(f"{path}: expected a JSON object of AttentionConfig fields, got {type(fields).__name__}")
  known = {f.name for f in dataclasses.fields(AttentionConfig)}
  if unknown := sorted(set(fields) - known):
    raise ValueError(f"{path}: unknown field(s) {unknown}; AttentionConfig has {sorted(known)}")
  try:
    return AttentionConfig(**fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None


def save_diffusers(model: WanModel, path: str | os.PathLike, *, max_shard_bytes: int = 10 * 2**30) -> None:
  """Write `model` as a diffusers transformer folder at `path` (which must not exist or be empty).

  Tensors keep the model's parameter dtype. Files go to a temporary folder renamed at the end, so a
  failed save leaves nothing at `path`. More than `max_shard_bytes` of tensors are split into shards
  with an index, as diffusers does.
  """
  folder = Path(path)
  if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
    raise ValueError(f"path {folder} already exists and is not an empty folder")
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  config = model.config
  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  entries = _plan(flat, config.num_layers)

  folder.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
  try:
    (staging / CONFIG_NAME).write_text(json.dumps(config_to_diffusers(config), indent=2) + "\n")
    (staging / ATTENTION_NAME).write_text(json.dumps(dataclasses.asdict(config.attention), indent=2) + "\n")
    shards, shard, shard_bytes = [], {}, 0

    def flush():
      name = f"shard-{len(shards)}.safetensors"
      save_file(shard, staging / name)
      shards.append((name, sorted(shard)))

    for entry, (_, variable) in zip(entries, flat):
      value = np.asarray(jax.device_get(variable[...]))
      layers = list(value) if entry.path[0] == "blocks" else [value]
      for key, array in zip(entry.keys, layers):
        tensor = np.ascontiguousarray(_to_diffusers(array, entry.layout))
        if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
          flush()
          shard, shard_bytes = {}, 0
        shard[key] = tensor
        shard_bytes += tensor.nbytes
    flush()

    if len(shards) == 1:
      os.replace(staging / shards[0][0], staging / WEIGHTS_NAME)
    else:
      weight_map = {}
      for i, (name, keys) in enumerate(shards):
        final = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(staging / name, staging / final)
        weight_map.update({key: final for key in keys})
      total = sum(math.prod(v.shape) * v.dtype.itemsize for _, v in flat)
      (staging / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
      )
    if folder.exists():
      folder.rmdir()
    os.replace(staging, folder)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
