"""Stand-ins for `sparge_jax.models.umt5` and `sparge_jax.models.wan_vae`, for the pipeline tests.

They have the interface the pipeline uses (names, signatures, shapes, the folder layout's file names) but
not the real models' arithmetic: a text "encoder" that embeds tokens and mixes them over the prompt, a
"VAE" that upsamples latents causally in time (first latent frame to one frame, each later one to four)
and in space, with a learned projection to RGB. `install()` puts them in `sys.modules` only where the
real module cannot be imported, so once the real modules exist the tests run on them.

Once the real modules import, `tiny_folder` copies their committed fixtures (tests/fixtures/umt5_tiny/
{text_encoder,tokenizer}, tests/fixtures/wan_vae_tiny/vae) instead of writing stand-in weights; when both
have landed, this module shrinks to `tiny_folder`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from sparge_jax.models.safetensors_io import SafetensorsFolder

# ------------------------------------------------------------------------------------------- UMT5


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  vocab_size: int = 64
  d_model: int = 24


class UMT5Encoder(nnx.Module):
  def __init__(self, config, *, rngs, param_dtype=jnp.float32, dtype=jnp.float32):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.d_model, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
    self.mix = nnx.Linear(config.d_model, config.d_model, param_dtype=param_dtype, dtype=dtype, rngs=rngs)

  def __call__(self, input_ids, attention_mask):
    mask = jnp.asarray(attention_mask, jnp.float32)[..., None]
    h = self.embed(input_ids)
    mean = (h * mask).sum(1, keepdims=True) / jnp.maximum(mask.sum(1, keepdims=True), 1)
    return jnp.tanh(self.mix(h + mean))


class WanTokenizer:
  """Whitespace words -> ids 2.. by a byte hash; eos 1 appended; padded with 0 and truncated."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def __call__(self, prompts, max_length=512):
    ids = np.zeros((len(prompts), max_length), np.int32)
    mask = np.zeros((len(prompts), max_length), np.int32)
    for row, prompt in enumerate(prompts):
      words = " ".join(prompt.split()).split(" ") if prompt.strip() else []
      tokens = [2 + sum(w.encode()) % (self.vocab_size - 2) for w in words][: max_length - 1] + [1]
      ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
    return ids, mask


def load_tokenizer(folder):
  return WanTokenizer(json.loads((Path(folder) / "tokenizer.json").read_text())["vocab_size"])


def load_umt5_encoder(folder, *, dtype=jnp.bfloat16, mesh=None, rules=()):
  del mesh, rules
  folder = Path(folder)
  config = UMT5Config(**json.loads((folder / "config.json").read_text()))
  model = UMT5Encoder(config, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)
  weights = SafetensorsFolder(folder, "model.safetensors")
  model.embed.embedding[...] = jnp.asarray(weights.get("shared.weight"), dtype)
  model.mix.kernel[...] = jnp.asarray(weights.get("mix.weight").T, dtype)
  model.mix.bias[...] = jnp.asarray(weights.get("mix.bias"), dtype)
  return model


def encode_prompts(tokenizer, encoder, prompts, max_length=512):
  ids, mask = tokenizer(prompts, max_length=max_length)
  out = encoder(jnp.asarray(ids), jnp.asarray(mask))
  return jnp.where(jnp.asarray(mask, bool)[..., None], out, 0)


def write_text_encoder(folder, config: UMT5Config, seed: int = 0):
  rng = np.random.default_rng(seed)
  (Path(folder) / "text_encoder").mkdir(parents=True)
  (Path(folder) / "tokenizer").mkdir(parents=True)
  (Path(folder) / "text_encoder" / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
  (Path(folder) / "tokenizer" / "tokenizer.json").write_text(json.dumps({"vocab_size": config.vocab_size}))
  d = config.d_model
  save_file(
    {
      "shared.weight": rng.normal(size=(config.vocab_size, d)).astype(np.float32),
      "mix.weight": (rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32),
      "mix.bias": rng.normal(size=(d,)).astype(np.float32),
    },
    Path(folder) / "text_encoder" / "model.safetensors",
  )


# -------------------------------------------------------------------------------------------- VAE


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  z_dim: int = 4
  latents_mean: tuple[float, ...] = (0.0,) * 4
  latents_std: tuple[float, ...] = (1.0,) * 4


class WanVAE(nnx.Module):
  def __init__(self, config, *, rngs, dtype=jnp.float32):
    self.config = config
    self.to_rgb = nnx.Linear(config.z_dim, 3, param_dtype=dtype, dtype=dtype, rngs=rngs)

  def decode(self, latents):
    """[b, f, h, w, z] -> [b, 4 (f - 1) + 1, 8 h, 8 w, 3] in [-1, 1]."""
    frames = jnp.concatenate([latents[:, :1], jnp.repeat(latents[:, 1:], 4, axis=1)], axis=1)
    frames = jnp.repeat(jnp.repeat(frames, 8, axis=2), 8, axis=3)
    return jnp.clip(jnp.tanh(self.to_rgb(frames)), -1, 1)


def _stats(config):
  shape = (1, 1, 1, 1, config.z_dim)
  return (jnp.asarray(config.latents_mean, jnp.float32).reshape(shape), jnp.asarray(config.latents_std).reshape(shape))


def normalize_latents(latents, config):
  mean, std = _stats(config)
  return ((latents - mean) / std).astype(latents.dtype)


def denormalize_latents(latents, config):
  mean, std = _stats(config)
  return (latents * std + mean).astype(latents.dtype)


def load_wan_vae(folder, *, dtype=jnp.float32, mesh=None, rules=()):
  del mesh, rules
  folder = Path(folder)
  fields = json.loads((folder / "config.json").read_text())
  config = WanVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
  model = WanVAE(config, rngs=nnx.Rngs(0), dtype=dtype)
  weights = SafetensorsFolder(folder, "diffusion_pytorch_model.safetensors")
  model.to_rgb.kernel[...] = jnp.asarray(weights.get("to_rgb.weight").T, dtype)
  model.to_rgb.bias[...] = jnp.asarray(weights.get("to_rgb.bias"), dtype)
  return model


def write_vae(folder, z_dim: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  config = WanVAEConfig(z_dim, tuple(rng.normal(size=z_dim).tolist()), tuple(rng.uniform(0.5, 2, z_dim).tolist()))
  (Path(folder) / "vae").mkdir(parents=True)
  (Path(folder) / "vae" / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
  save_file(
    {"to_rgb.weight": rng.normal(size=(3, z_dim)).astype(np.float32), "to_rgb.bias": np.zeros(3, np.float32)},
    Path(folder) / "vae" / "diffusion_pytorch_model.safetensors",
  )


# ----------------------------------------------------------------------------------------- install


def _module(name, **members):
  module = types.ModuleType(name)
  module.__dict__.update(members)
  return module


UMT5 = _module(
  "sparge_jax.models.umt5",
  UMT5Config=UMT5Config,
  UMT5Encoder=UMT5Encoder,
  WanTokenizer=WanTokenizer,
  load_tokenizer=load_tokenizer,
  load_umt5_encoder=load_umt5_encoder,
  encode_prompts=encode_prompts,
)
WAN_VAE = _module(
  "sparge_jax.models.wan_vae",
  WanVAEConfig=WanVAEConfig,
  WanVAE=WanVAE,
  normalize_latents=normalize_latents,
  denormalize_latents=denormalize_latents,
  load_wan_vae=load_wan_vae,
)


def install() -> dict[str, bool]:
  """Registers each stand-in whose real module is missing; returns {module: True if a stand-in is used}."""
  import sparge_jax.models  # noqa: PLC0415

  used = {}
  for module in (UMT5, WAN_VAE):
    try:
      importlib.import_module(module.__name__)
      used[module.__name__] = sys.modules[module.__name__] is module
    except ImportError:
      sys.modules[module.__name__] = module
      setattr(sparge_jax.models, module.__name__.rsplit(".", 1)[1], module)
      used[module.__name__] = True
  return used


STANDINS = install()


FIXTURES = Path(__file__).parent / "fixtures"


def tiny_folder(folder, *, seed: int = 0, **transformer) -> Path:
  """A Wan diffusers-layout folder: a tiny random transformer (`save_diffusers`), Wan's scheduler config,
  and the text encoder, tokenizer and VAE: the real modules' committed fixtures where those modules
  exist, else stand-in weights. The transformer's text_dim and channels follow them."""
  import shutil  # noqa: PLC0415

  from sparge_jax.models.wan import WanModel, save_diffusers, tiny  # noqa: PLC0415

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if STANDINS[UMT5.__name__]:
    write_text_encoder(folder, UMT5Config(vocab_size=64, d_model=24), seed)
  else:
    for sub in ("text_encoder", "tokenizer"):
      shutil.copytree(FIXTURES / "umt5_tiny" / sub, folder / sub)
  if STANDINS[WAN_VAE.__name__]:
    write_vae(folder, 4, seed)
  else:
    shutil.copytree(FIXTURES / "wan_vae_tiny" / "vae", folder / "vae")
  text_dim = json.loads((folder / "text_encoder" / "config.json").read_text())["d_model"]
  z_dim = json.loads((folder / "vae" / "config.json").read_text())["z_dim"]

  config = dataclasses.replace(tiny(), text_dim=text_dim, in_channels=z_dim, out_channels=z_dim, **transformer)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0))))
  # Every parameter random (zero biases or unit norms would hide mistakes), drawn on the host: quick.
  rng = np.random.default_rng(seed)
  params = []
  for path, variable in nnx.to_flat_state(abstract):
    shape = variable.shape
    fan_in = int(np.prod(shape[1 if path[0] == "blocks" else 0 : -1]))
    if path[-1] == "scale":
      value = 1 + 0.1 * rng.normal(size=shape)
    elif len(shape) - (path[0] == "blocks") >= 2 and path[-1] not in ("modulation", "head_modulation"):
      value = rng.normal(size=shape) / np.sqrt(fan_in)
    else:
      value = 0.1 * rng.normal(size=shape)
    params.append((path, variable.replace(value=jnp.asarray(value, variable.dtype))))
  model = nnx.merge(graphdef, nnx.from_flat_state(params))
  save_diffusers(model, folder / "transformer")
  (folder / "scheduler").mkdir()
  (folder / "scheduler" / "scheduler_config.json").write_text(
    json.dumps(
      {
        "_class_name": "UniPCMultistepScheduler",
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": 3.0,
        "solver_order": 2,
        "solver_type": "bh2",
        "lower_order_final": True,
        "num_train_timesteps": 1000,
      }
    )
  )
  return folder
