"""The trainer's models: teacher and student ``WanConfig`` from a run config, and their parameters.

Teacher and student share the architecture (``config.model``); the teacher's self-attention is dense,
the student's is ``config.attention``. Parameters are plain pytrees (``nnx.State.to_pure_dict``) so that
they can be donated, sharded and checkpointed like any other arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx

from sparge_jax.config import AttentionConfig
from sparge_jax.models.wan import WanConfig, WanModel

from .configs import Config


def model_configs(
  config: Config, *, batch_axes: tuple[str, ...] = (), sequence_axes: tuple[str, ...] = ()
) -> tuple[WanConfig, WanConfig]:
  """(teacher, student) model configs: the same architecture, dense vs ``config.attention`` self-attention.

  batch_axes, sequence_axes: the mesh axes that split the batch and the tokens (``WanConfig``), the
  latter by ``config.mesh.sequence_parallel``; the models must then be traced under ``jax.set_mesh``.
  The trainer passes ``sharding.BATCH_AXES`` and ``sharding.sequence_axes(mesh)``.
  """
  options = dict(
    compute_dtype=config.compute_dtype,
    batch_axes=batch_axes,
    sequence_axes=sequence_axes,
    sequence_parallel=config.mesh.sequence_parallel,
  )
  return (
    config.model.wan(attention=AttentionConfig(kind="dense"), **options),
    config.model.wan(attention=config.attention, **options),
  )


def abstract_model(model_config: WanConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract state) of a ``WanModel``: shapes and dtypes only, nothing allocated."""
  return nnx.split(nnx.eval_shape(lambda: WanModel(model_config, rngs=nnx.Rngs(0))))


def init_params(model_config: WanConfig, seed: int, shardings: Any) -> Any:
  """Randomly initialised parameters (a pure dict), created directly with their shardings."""

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(WanModel(model_config, rngs=nnx.Rngs(seed))).to_pure_dict()

  return init()
