"""Load a diffusers `AutoencoderKLWan` folder (config.json + safetensors) as a `WanVAE`, without torch.

Everything that can be wrong with the folder (config fields, key set, shapes) is checked from config.json
and the safetensors headers before any array is built; then each parameter is read, laid out and placed
on its own.
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

from sparge_jax.models.safetensors_io import SafetensorsFolder, complete_rules, shape_mismatches
from sparge_jax.models.wan_vae.model import WanVAE, WanVAEConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CLASS = "AutoencoderKLWan"

_CONFIG_FIELDS = tuple(f for f in WanVAEConfig.__dataclass_fields__)
# Fields that must keep Wan2.1's value: other values are Wan2.2's VAE (residual blocks, patchified
# pixels), or encoder attention, which diffusers' own encoder cannot run.
_FIXED_FIELDS = {"is_residual": False, "patch_size": None, "attn_scales": []}
# Training-only (dropout) or only for diffusers' tiling (the scale factors; the model derives its own
# compression factors from the architecture).
_IGNORED_FIELDS = ("dropout", "scale_factor_temporal", "scale_factor_spatial")


def config_from_diffusers(fields: dict) -> WanVAEConfig:
  """A WanVAEConfig from config.json's fields; a ValueError names any field it cannot take."""
  if not isinstance(fields, dict):
    raise ValueError(f"config.json must hold a JSON object, got {type(fields).__name__}")
  if fields.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
    raise ValueError(f"config.json describes a {fields['_class_name']}, not a {DIFFUSERS_CLASS}")
  known = _CONFIG_FIELDS + tuple(_FIXED_FIELDS) + _IGNORED_FIELDS
  unknown = sorted(k for k in fields if not k.startswith("_") and k not in known)
  if unknown:
    raise ValueError(f"config.json has unknown fields {unknown}")
  for name, value in _FIXED_FIELDS.items():
    if name in fields and fields[name] != value and not (value == [] and fields[name] == ()):
      raise ValueError(f"config.json sets {name}={fields[name]!r}; only {value!r} (the Wan2.1 VAE) is supported")
  return WanVAEConfig(**{k: fields[k] for k in _CONFIG_FIELDS if k in fields})


def _diffusers_key(path: tuple[str, ...]) -> str:
  """Our parameter path -> diffusers' state-dict key (the module names mirror diffusers')."""
  renamed = {"resample": "resample.1", "upsampler": "upsamplers.0"}  # torch Sequential / ModuleList slots
  leaf = {"kernel": "weight", "bias": "bias", "gamma": "gamma"}[path[-1]]
  return ".".join([renamed.get(p, p) for p in path[:-1]] + [leaf])


def _layout(path: tuple[str, ...], shape: tuple[int, ...]):
  """(diffusers tensor shape, function from that tensor to our parameter) for the parameter at `path`."""
  if path[-1] == "kernel":  # ours [*window, in, out], torch's [out, in, *window]
    window = len(shape) - 2
    return (shape[-1], shape[-2], *shape[:window]), lambda a: a.transpose(*range(2, 2 + window), 1, 0)
  if path[-1] == "gamma":  # torch broadcasts over [channels, (frames,) height, width]
    return (shape[0], 1, 1) + (1,) * ("attentions" not in path), lambda a: a.reshape(-1)
  return shape, lambda a: a


def load_wan_vae(
  folder: str | os.PathLike,
  *,
  dtype=jnp.float32,
  mesh: jax.sharding.Mesh | None = None,
  rules: Sequence[tuple[str, str | None]] = (),
) -> WanVAE:
  """Load a diffusers `vae/` folder as a WanVAE with parameters and activations in `dtype`.

  mesh: place each parameter over it by its logical axis names (see the model's module docstring)
    mapped through `rules`; names without a rule are replicated.
  """
  folder = Path(folder)
  config_path = folder / CONFIG_NAME
  if not folder.is_dir() or not config_path.is_file():
    raise ValueError(f"folder {folder} is not a diffusers VAE folder (no {CONFIG_NAME})")
  try:
    fields = json.loads(config_path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_path}: cannot be read as JSON ({e})") from None
  try:
    config = config_from_diffusers(fields)
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from None
  weights = SafetensorsFolder(folder, WEIGHTS_NAME)

  abstract = nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype))
  graphdef, state = nnx.split(abstract)
  flat = [(tuple(str(p) for p in path), variable) for path, variable in nnx.to_flat_state(state)]
  plan = {path: (_diffusers_key(path), *_layout(path, tuple(variable.shape))) for path, variable in flat}
  if problems := shape_mismatches({key: shape for key, shape, _ in plan.values()}, weights.shapes):
    raise ValueError(f"{folder}: the weights do not match its {CONFIG_NAME}: " + "; ".join(problems))

  if mesh is not None:
    with nnx.logical_axis_rules(complete_rules(rules, flat)):
      specs = {tuple(str(p) for p in k): v for k, v in nnx.to_flat_state(nnx.get_partition_spec(state))}
  placed = []
  for path, variable in flat:
    key, _, to_model = plan[path]
    host = np.ascontiguousarray(to_model(weights.get(key))).astype(np.dtype(dtype))
    if mesh is None:
      value = jnp.asarray(host)
    else:
      sharding = jax.sharding.NamedSharding(mesh, specs[path].get_value())
      value = jax.make_array_from_callback(host.shape, sharding, lambda index, host=host: host[index])
    placed.append((path, variable.replace(value=value)))
  weights.close()
  return nnx.merge(graphdef, nnx.from_flat_state(placed))
