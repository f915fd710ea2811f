"""Where the dense teacher comes from: random, a diffusers folder, a workdir of ours, or pretrained here.

``Config.teacher`` names it. For toy runs (``teacher="random"`` with ``pretrain_teacher.steps > 0``) the
trainer first trains a dense model with the diffusion loss into ``<workdir>/teacher``
(``pretraining_config``), and that workdir becomes the teacher.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparge_jax.config import AttentionConfig
from sparge_jax.models.wan import WanConfig, load_diffusers

from . import checkpoint, sharding
from .configs import Config
from .models import init_params

PRETRAINED_DIR = "teacher"


def is_diffusers_folder(path: str) -> bool:
  """A diffusers transformer folder: ``config.json`` beside safetensors weights."""
  return os.path.isfile(os.path.join(path, "config.json")) and any(f.endswith(".safetensors") for f in os.listdir(path))


def load_teacher(
  spec: str,
  model_config: WanConfig,
  abstract_params: Any,
  shardings: Any,
  seed: int,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[Any, str]:
  """Teacher params placed on ``shardings``, and a description of where they came from (see ``Config.teacher``).

  abstract_params: the expected tree of shapes and dtypes; a checkpoint of another architecture raises
  ValueError naming the fields that differ.
  """
  if spec == "random":
    return init_params(model_config, seed, shardings), f"randomly initialised (seed {seed})"
  if not os.path.exists(spec):
    raise ValueError(
      f"--config.teacher={spec!r}: no such file or directory (use 'random', a diffusers "
      "Wan transformer folder, or a workdir of ours)"
    )
  if is_diffusers_folder(spec):
    model = load_diffusers(
      spec,
      dtype=jnp.float32,
      mesh=mesh,
      rules=list(sharding.LOGICAL_RULES.items()),
      attention=model_config.attention,
      remat=model_config.remat,
      remat_saves=model_config.remat_saves,
      compute_dtype=model_config.compute_dtype,
      batch_axes=model_config.batch_axes,
    )
    params = nnx.state(model).to_pure_dict()
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params)
    if jax.tree.map(lambda x: (x.shape, x.dtype), params) != expected:
      differ = {
        f.name: getattr(model.config, f.name)
        for f in dataclasses.fields(model_config)
        if getattr(model.config, f.name) != getattr(model_config, f.name)
      }
      raise ValueError(
        f"--config.teacher={spec!r}: the checkpoint has {differ}, unlike --config.model; "
        "pick the matching preset or set model.*"
      )
    return jax.device_put(params, shardings), f"diffusers weights from {spec}"
  params, found = checkpoint.load_newest_params(spec, checkpoint.abstract(abstract_params, shardings))
  return params, f"student of checkpoint {found}"


def pretrained_dir(workdir: str) -> str:
  """Where a run that pretrains its teacher keeps it."""
  return os.path.join(workdir, PRETRAINED_DIR)


def teacher_spec(config: Config, workdir: str) -> str:
  """The ``load_teacher`` spec of a run in ``workdir``: its pretrained teacher, or ``config.teacher``."""
  return pretrained_dir(workdir) if config.pretrains_teacher else config.teacher


def pretraining_config(config: Config) -> Config:
  """The run that pretrains ``config``'s teacher: dense attention, the diffusion loss, from random weights."""
  steps = config.pretrain_teacher.steps
  return dataclasses.replace(
    config,
    name=f"{config.name}-teacher",
    teacher="random",
    loss="diffusion",
    attention=AttentionConfig(kind="dense"),
    pretrain_teacher=dataclasses.replace(config.pretrain_teacher, steps=0),
    steps=steps,
    learning_rate=config.pretrain_teacher.learning_rate,
    warmup_steps=0,
    checkpoint_every=steps,
    keep_checkpoints=1,
  )


def describe_pretrained(config: Config, workdir: str) -> str:
  return (
    f"randomly initialised, then pretrained for {config.pretrain_teacher.steps} steps "
    f"with the diffusion loss ({pretrained_dir(workdir)})"
  )
