"""Euler sampling for flow-matching models, step for step as diffusers' `FlowMatchEulerDiscreteScheduler`
(static shift, no dynamic shifting, no stochastic sampling).

    scheduler = FlowMatchEuler(shift=3.0)
    timesteps, sigmas = scheduler.set_timesteps(50)
    state = scheduler.init_state(timesteps, sigmas, sample)
    sample, state = scheduler.step(state, model_output, sample)   # x + (sigma[i + 1] - sigma[i]) * v

Unlike diffusers, which casts the new sample to the model output's dtype, the result keeps the sample's
dtype (so a bf16 model does not turn float32 latents into bf16).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparge_jax.schedulers import common


class EulerState(NamedTuple):
  """timesteps: float32 [num_steps]; sigmas: float32 [num_steps + 1]; step_index: int32 []."""

  timesteps: jax.Array
  sigmas: jax.Array
  step_index: jax.Array

  @property
  def timestep(self) -> jax.Array:
    """The timestep of the next `step` (what the model is given)."""
    return self.timesteps[self.step_index]


@dataclasses.dataclass(frozen=True)
class FlowMatchEuler:
  """diffusers' FlowMatchEulerDiscreteScheduler options (their names and defaults)."""

  num_train_timesteps: int = 1000
  shift: float = 1.0

  def __post_init__(self):
    common.check_num_train_timesteps(self.num_train_timesteps)
    object.__setattr__(self, "shift", common.check_shift("shift", self.shift))

  def _shifted(self, sigmas):
    return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

  def set_timesteps(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32 [num_steps], sigmas float32 [num_steps + 1]), as diffusers' `set_timesteps`.

    The range is that of the shifted training sigmas, spaced linearly and shifted once more (as diffusers
    does), with a final sigma of 0; timesteps are sigma * num_train_timesteps.
    """
    common.check_num_steps(num_steps)
    n = self.num_train_timesteps
    train_sigmas = self._shifted(np.linspace(1, n, n, dtype=np.float32)[::-1] / n)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    sigmas = self._shifted(np.linspace(sigma_max * n, sigma_min * n, num_steps) / n).astype(np.float32)
    return sigmas * np.float32(n), np.concatenate([sigmas, np.zeros(1, np.float32)])

  def init_state(self, timesteps, sigmas, sample) -> EulerState:
    """The state before the first step: timesteps, sigmas from `set_timesteps`; sample: only for the API's
    symmetry with the multistep schedulers."""
    del sample
    timesteps, sigmas = common.check_schedule(timesteps, sigmas)
    return EulerState(timesteps=timesteps, sigmas=sigmas, step_index=jnp.zeros((), jnp.int32))

  def step(self, state: EulerState, model_output, sample) -> tuple[jax.Array, EulerState]:
    """(sample + (sigma[i + 1] - sigma[i]) * model_output in float32, cast to sample's dtype; next state)."""
    if jnp.shape(model_output) != jnp.shape(sample):
      raise ValueError(f"model_output {jnp.shape(model_output)} must have the shape of sample {jnp.shape(sample)}")
    i = state.step_index
    dt = state.sigmas[i + 1] - state.sigmas[i]
    prev_sample = jnp.asarray(sample, jnp.float32) + dt * jnp.asarray(model_output, jnp.float32)
    return prev_sample.astype(jnp.result_type(sample)), state._replace(step_index=i + 1)
