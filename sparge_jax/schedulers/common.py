"""Argument checks shared by the schedulers (ValueErrors naming the argument, raised before any work)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def check_num_steps(num_steps) -> None:
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")


def check_num_train_timesteps(value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"num_train_timesteps must be a positive int, got {value!r}")


def check_shift(name: str, value) -> float:
  """`value` as a float, or a ValueError naming `name` unless it is a positive finite number."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a positive number, got {value!r}")
  return float(value)


def check_schedule(timesteps, sigmas) -> tuple[jax.Array, jax.Array]:
  """(timesteps float32 [num_steps], sigmas float32 [num_steps + 1]) as arrays, shapes checked."""
  timesteps, sigmas = jnp.asarray(timesteps, jnp.float32), jnp.asarray(sigmas, jnp.float32)
  if sigmas.ndim != 1 or sigmas.shape[0] < 2:
    raise ValueError(f"sigmas must be [num_steps + 1] with num_steps >= 1, got shape {sigmas.shape}")
  if timesteps.shape != (sigmas.shape[0] - 1,):
    raise ValueError(f"timesteps must be [num_steps] = [{sigmas.shape[0] - 1}], got shape {timesteps.shape}")
  return timesteps, sigmas


def check_step_shapes(state_shape, model_output, sample) -> None:
  if jnp.shape(sample) != state_shape or jnp.shape(model_output) != state_shape:
    raise ValueError(
      f"sample {jnp.shape(sample)} and model_output {jnp.shape(model_output)} must have the state's shape {state_shape}"
    )
