"""A tiny Wan2.1 diffusers-layout folder for the pipeline tests, built from the committed fixtures.

    folder = tiny_folder(tmp_path / "Wan-tiny")    # transformer/ text_encoder/ tokenizer/ vae/ scheduler/

text_encoder/ and tokenizer/ are the tiny random UMT5 of tests/fixtures/umt5_tiny (made with transformers),
vae/ the tiny random AutoencoderKLWan of tests/fixtures/wan_vae_tiny (made with diffusers), scheduler/ Wan2.1's
UniPC settings, and transformer/ a tiny random Wan DiT written with `save_diffusers`, its text width and
channels those of the text encoder and the VAE.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparge_jax.models.wan import WanModel, save_diffusers, tiny

FIXTURES = Path(__file__).parent / "fixtures"
# What diffusers' Wan2.1-T2V-1.3B-Diffusers has in scheduler/scheduler_config.json (the fields that matter).
SCHEDULER_CONFIG = {
  "_class_name": "UniPCMultistepScheduler",
  "prediction_type": "flow_prediction",
  "use_flow_sigmas": True,
  "flow_shift": 3.0,
  "solver_order": 2,
  "solver_type": "bh2",
  "lower_order_final": True,
  "num_train_timesteps": 1000,
}


def random_transformer(config, seed: int = 0) -> WanModel:
  """A WanModel with every parameter random (zero biases or unit norms would hide mistakes), drawn on the
  host: quicker than initialising and then overwriting."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  params = []
  for path, variable in nnx.to_flat_state(abstract):
    shape = variable.shape
    stacked = path[0] == "blocks"  # [layers, ...]
    if path[-1] == "scale":
      value = 1 + 0.1 * rng.normal(size=shape)
    elif len(shape) - stacked >= 2 and path[-1] not in ("modulation", "head_modulation"):
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[stacked:-1]))
    else:
      value = 0.1 * rng.normal(size=shape)
    params.append((path, variable.replace(value=jnp.asarray(value, variable.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(params))


def tiny_folder(folder, *, seed: int = 0, **transformer) -> Path:
  """Write the tiny Wan folder at `folder` (created; must not hold the subfolders yet) and return it.
  `transformer`: WanConfig fields to change from `sparge_jax.models.wan.tiny()` (e.g. attention_head_dim)."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for sub in ("text_encoder", "tokenizer"):
    shutil.copytree(FIXTURES / "umt5_tiny" / sub, folder / sub)
  shutil.copytree(FIXTURES / "wan_vae_tiny" / "vae", folder / "vae")
  text_dim = json.loads((folder / "text_encoder" / "config.json").read_text())["d_model"]
  z_dim = json.loads((folder / "vae" / "config.json").read_text())["z_dim"]
  config = dataclasses.replace(tiny(), text_dim=text_dim, in_channels=z_dim, out_channels=z_dim, **transformer)
  save_diffusers(random_transformer(config, seed), folder / "transformer")
  (folder / "scheduler").mkdir()
  (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
  return folder
