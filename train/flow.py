"""Flow-matching conventions shared by training, dataset generation and sampling.

The one place that defines them (as Wan2.1 and TurboDiffusion do):

- ``t`` in [0, 1]; ``t = 0`` is data, ``t = 1`` is pure noise.
- ``x_t = (1 - t) * x0 + t * noise``; the velocity is ``d x_t / d t = noise - x0``.
- The model sees the timestep ``1000 * t``.
- ``shift`` warps t towards the noise end: ``t' = shift * t / (1 + (shift - 1) * t)``
  (Wan samples with shift 5; ``shift = 1`` is the identity).
- Training draws ``t = sigmoid(N(mean, std))`` (logit-normal), then applies the shift.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

TIMESTEP_SCALE = 1000.0


def shift_t(t: jax.Array, shift: float) -> jax.Array:
  """Wan's timestep shift; maps [0, 1] onto [0, 1] monotonically, 0→0 and 1→1."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_t(key: jax.Array, shape: tuple[int, ...], *, mean: float, std: float, shift: float = 1.0) -> jax.Array:
  """Training times: float32 ``shape``, logit-normal ``sigmoid(N(mean, std))``, then shifted."""
  t = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))
  return shift_t(t, shift)


def _broadcast_t(t: jax.Array, x: jax.Array) -> jax.Array:
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)).astype(x.dtype)


def noisy(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t for ``x0, noise: [batch, ...]`` and ``t: [batch]``."""
  t = _broadcast_t(t, x0)
  return (1.0 - t) * x0 + t * noise


def velocity(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The flow-matching target ``noise - x0`` (the ``diffusion`` loss regresses on it)."""
  return noise - x0


def model_timestep(t: jax.Array) -> jax.Array:
  """What the model is given for time ``t``: ``1000 * t``."""
  return TIMESTEP_SCALE * t


def sampling_times(num_steps: int, shift: float) -> jax.Array:
  """``num_steps + 1`` decreasing times from 1 (noise) to 0 (data), shifted like Wan's sampler."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return shift_t(jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32), shift)


def euler_sample(
  velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array, *, num_steps: int, shift: float
) -> jax.Array:
  """Integrate dx/dt = v from t = 1 (``noise``) to t = 0 with Euler steps.

  velocity_fn(x_t, timestep) -> v, with ``timestep: [batch]`` already scaled by 1000.
  noise: [batch, ...]. Returns the x0 estimate, same shape and dtype as ``noise``.
  """
  times = sampling_times(num_steps, shift)
  batch = noise.shape[0]

  def step(x, t_pair):
    t, t_next = t_pair[0], t_pair[1]
    v = velocity_fn(x, jnp.full((batch,), model_timestep(t)))
    return (x + (t_next - t) * v).astype(x.dtype), None

  pairs = jnp.stack([times[:-1], times[1:]], axis=1)
  x0, _ = jax.lax.scan(step, noise, pairs)
  return x0
