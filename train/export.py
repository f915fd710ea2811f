"""The distilled student as a diffusers folder: ``<workdir>/export/``, loadable by ``sparge_jax.models.wan`` (and
``sparge_jax.pipelines``) and by diffusers.

    export/transformer/            config.json + safetensors + sparge_attention.json, the student's attention
                                   settings (``sparge_jax.models.wan.save_diffusers``; diffusers ignores the json)
    export/{vae,text_encoder,tokenizer,scheduler,model_index.json}   links to the teacher's Wan folder, when the
                                   teacher is the transformer/ of one (or to ``eval.model``'s)

With the links the folder is a whole Wan2.1 pipeline folder: ``WanPipeline.from_pretrained("export")`` in
diffusers, or ``sparge_jax.pipelines.WanPipeline.from_pretrained("export")``, whose transformer
(``load_diffusers``) runs with the attention settings of the json file.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from sparge_jax.models.wan import save_diffusers

from .configs import Config
from .models import abstract_model, model_configs

EXPORT_DIR = "export"
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


def _host(x: jax.Array) -> np.ndarray:
  """One parameter on the host, gathered from every process if it is sharded across them."""
  return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def pipeline_folder(config: Config) -> str | None:
  """A Wan diffusers folder to take the other pipeline parts from: the teacher's parent, or eval.model."""
  candidates = [os.path.dirname(os.path.abspath(config.teacher.rstrip(os.sep)))] if config.teacher != "random" else []
  candidates += [os.path.abspath(config.eval.model)] if config.eval.model else []
  for folder in candidates:
    if all(os.path.exists(os.path.join(folder, part)) for part in ("vae", "text_encoder", "tokenizer")):
      return folder
  return None


def export_student(config: Config, params: Any, workdir: str) -> str:
  """Writes ``params`` (the student's, possibly sharded over processes) to ``<workdir>/export`` on process 0,
  replacing an earlier export whole; returns the folder. Every process must call it (the gather is collective)."""
  host = jax.tree.map(_host, params)  # one tensor at a time on the device, all of them on the host
  folder = os.path.join(workdir, EXPORT_DIR)
  if jax.process_index() != 0:
    return folder
  student_config = model_configs(config)[1]
  model = nnx.merge(abstract_model(student_config)[0], host)
  staging, previous = f"{folder}.tmp", f"{folder}.old"
  for path in (staging, previous):
    shutil.rmtree(path, ignore_errors=True)
  os.makedirs(staging)
  save_diffusers(model, os.path.join(staging, "transformer"))
  source = pipeline_folder(config)
  if source is not None:
    for part in PIPELINE_PARTS:
      if os.path.exists(os.path.join(source, part)):
        os.symlink(os.path.join(source, part), os.path.join(staging, part))
  if os.path.exists(folder):
    os.rename(folder, previous)
  os.rename(staging, folder)
  shutil.rmtree(previous, ignore_errors=True)
  return folder
