"""Load a transformers `UMT5EncoderModel` folder (Wan's `text_encoder/`) as a `UMT5Encoder`, without torch.

The folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. The config fields, the key set and every shape are checked from config.json
and the safetensors headers before any array is built. Parameters are then read one tensor at a time and
placed on the device (sharded over `mesh` if given); a stacked `[layers, ...]` parameter is filled on the
device layer by layer, so host memory peaks at one checkpoint tensor.

The token embedding is `encoder.embed_tokens.weight` where the checkpoint has it, else `shared.weight`
(transformers ties the two and saves one, but uses the encoder's own table when both are saved).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparge_jax.models.safetensors_io import SafetensorsFolder, complete_rules, shape_mismatches
from sparge_jax.models.umt5.model import UMT5Config, UMT5Encoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "umt5"

_REQUIRED_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
# Fields that transformers' UMT5Config defaults when config.json leaves them out.
_DEFAULTED_FIELDS = (
  "relative_attention_num_buckets",
  "relative_attention_max_distance",
  "layer_norm_epsilon",
  "feed_forward_proj",
)
_EMBEDDING_KEYS = ("encoder.embed_tokens.weight", "shared.weight")  # in order of preference

# Checkpoint key (per layer, after "encoder.block.{i}.") and layout of each parameter. Layouts: "linear" is a
# torch Linear weight [out, in], the transpose of the kernel [in, out]; "same" is unchanged.
_PER_BLOCK = {
  ("attention_norm", "scale"): ("layer.0.layer_norm.weight", "same"),
  ("query", "kernel"): ("layer.0.SelfAttention.q.weight", "linear"),
  ("key", "kernel"): ("layer.0.SelfAttention.k.weight", "linear"),
  ("value", "kernel"): ("layer.0.SelfAttention.v.weight", "linear"),
  ("out", "kernel"): ("layer.0.SelfAttention.o.weight", "linear"),
  ("relative_attention_bias",): ("layer.0.SelfAttention.relative_attention_bias.weight", "same"),
  ("ffn_norm", "scale"): ("layer.1.layer_norm.weight", "same"),
  ("ffn_gate", "kernel"): ("layer.1.DenseReluDense.wi_0.weight", "linear"),
  ("ffn_up", "kernel"): ("layer.1.DenseReluDense.wi_1.weight", "linear"),
  ("ffn_down", "kernel"): ("layer.1.DenseReluDense.wo.weight", "linear"),
}
_TOP_LEVEL = {("final_norm", "scale"): ("encoder.final_layer_norm.weight", "same")}


def config_from_transformers(fields: dict, *, source: str = CONFIG_NAME) -> UMT5Config:
  """A UMT5Config from config.json's fields (transformers' names); other fields of the file are ignored.

  Raises ValueError naming the field for a missing size, a wrong type or value, or a config that is not
  a UMT5 encoder (`model_type`, `is_decoder`, `feed_forward_proj`). `source` names the file in errors.
  """
  if not isinstance(fields, dict):
    raise ValueError(f"{source}: must hold a JSON object, got {type(fields).__name__}")
  if fields.get("model_type", MODEL_TYPE) != MODEL_TYPE:
    raise ValueError(f"{source}: model_type is {fields['model_type']!r}, not {MODEL_TYPE!r} (a UMT5 encoder)")
  if fields.get("is_decoder", False):
    raise ValueError(f"{source}: is_decoder is set; a UMT5 encoder has is_decoder false")
  missing = [name for name in _REQUIRED_FIELDS if name not in fields]
  if missing:
    raise ValueError(f"{source}: missing fields {missing}")
  values = {name: fields[name] for name in _REQUIRED_FIELDS + _DEFAULTED_FIELDS if name in fields}
  try:
    return UMT5Config(**values)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def _expected_tensors(config: UMT5Config, flat) -> dict[tuple[str, ...], tuple[tuple[str, ...], str]]:
  """Each parameter path -> (its checkpoint keys, one per layer for block parameters; layout)."""
  plan = {}
  for path, _ in flat:
    path = tuple(str(p) for p in path)
    if path[0] == "blocks":
      key, layout = _PER_BLOCK[path[1:]]
      plan[path] = (tuple(f"encoder.block.{i}.{key}" for i in range(config.num_layers)), layout)
    elif path[0] == "embedding":
      plan[path] = ((), "same")  # chosen from the checkpoint in `_check_tensors`
    else:
      plan[path] = ((_TOP_LEVEL[path][0],), _TOP_LEVEL[path][1])
  return plan


def _tensor_shape(shape: tuple[int, ...], layout: str, stacked: bool) -> tuple[int, ...]:
  per_tensor = shape[1:] if stacked else shape
  return per_tensor[::-1] if layout == "linear" else per_tensor


def _check_tensors(folder: Path, plan, flat, shapes: dict[str, tuple[int, ...]]) -> str:
  """Raise ValueError listing every mismatch between the model and the checkpoint; return the embedding key."""
  expected = {}
  for path, variable in flat:
    keys, layout = plan[tuple(str(p) for p in path)]
    for key in keys:
      expected[key] = _tensor_shape(tuple(variable.shape), layout, stacked=str(path[0]) == "blocks")
  embedding_shape = tuple(dict(flat)[("embedding", "embedding")].shape)
  for key in _EMBEDDING_KEYS:
    if key in shapes:
      expected[key] = embedding_shape
  problems = []
  if not any(key in shapes for key in _EMBEDDING_KEYS):
    problems.append(f"no token embedding (neither {' nor '.join(_EMBEDDING_KEYS)})")
  problems += shape_mismatches(expected, shapes)
  if problems:
    raise ValueError(f"{folder}: checkpoint does not match its config.json: " + "; ".join(problems))
  return next(key for key in _EMBEDDING_KEYS if key in shapes)


def _host_tensor(weights: SafetensorsFolder, key: str, layout: str, dtype) -> np.ndarray:
  tensor = weights.get(key)
  return (tensor.T if layout == "linear" else tensor).astype(dtype)


def _set_layer(stacked, layer, index):
  return jax.lax.dynamic_update_index_in_dim(stacked, layer, index, axis=0)


def _place(weights: SafetensorsFolder, keys, layout: str, shape, dtype, sharding, stacked: bool) -> jax.Array:
  """One parameter on the device(s); a stacked one is filled in place (its buffer donated), layer by layer."""
  host_dtype = np.dtype(dtype)
  if not stacked:
    return jax.device_put(_host_tensor(weights, keys[0], layout, host_dtype), sharding)
  layer_sharding = None if sharding is None else NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
  set_layer = jax.jit(_set_layer, donate_argnums=0, out_shardings=sharding)
  value = jnp.zeros(shape, dtype, device=sharding)
  for index, key in enumerate(keys):
    value = set_layer(value, jax.device_put(_host_tensor(weights, key, layout, host_dtype), layer_sharding), index)
  return value


def load_umt5_encoder(
  path: str | os.PathLike,
  *,
  dtype=jnp.bfloat16,
  mesh: jax.sharding.Mesh | None = None,
  rules: Sequence[tuple[str, str | None]] = (),
) -> UMT5Encoder:
  """Load a transformers UMT5 encoder folder (config.json + safetensors) with parameters and compute in `dtype`.

  mesh: place each parameter sharded over it, by the logical axis names of the model docstring mapped
    through `rules` (pairs like ("embed", "fsdp"); names without a rule are replicated).
  """
  try:
    floating = jnp.issubdtype(dtype, jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise ValueError(f"dtype must be a floating-point dtype (jnp.bfloat16, jnp.float32), got {dtype!r}")
  folder = Path(path)
  config_path = folder / CONFIG_NAME
  if not folder.is_dir() or not config_path.is_file():
    raise ValueError(f"path {folder} is not a transformers model folder (no {CONFIG_NAME})")
  try:
    fields = json.loads(config_path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_path}: cannot be read as JSON ({e})") from None
  config = config_from_transformers(fields, source=str(config_path))

  abstract = nnx.eval_shape(lambda: UMT5Encoder(config, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype))
  graphdef, state = nnx.split(abstract)
  flat = [(tuple(str(p) for p in path), v) for path, v in nnx.to_flat_state(state)]
  specs = {}
  if mesh is not None:
    with nnx.logical_axis_rules(complete_rules(rules, flat)):
      specs = {tuple(str(p) for p in k): v.get_value() for k, v in nnx.to_flat_state(nnx.get_partition_spec(state))}
  plan = _expected_tensors(config, flat)
  with SafetensorsFolder(folder, WEIGHTS_NAME) as weights:
    embedding_key = _check_tensors(folder, plan, flat, weights.shapes)
    plan[("embedding", "embedding")] = ((embedding_key,), "same")
    placed = []
    for path, variable in flat:
      keys, layout = plan[path]
      sharding = None if mesh is None else NamedSharding(mesh, specs[path])
      value = _place(weights, keys, layout, variable.shape, dtype, sharding, stacked=path[0] == "blocks")
      placed.append((path, variable.replace(value=value)))
  return nnx.merge(graphdef, nnx.from_flat_state(placed))
