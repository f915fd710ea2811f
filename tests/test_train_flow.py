"""Flow-matching conventions (train/flow.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from train import flow


def test_shift_fixes_the_ends_and_moves_towards_noise():
  t = jnp.linspace(0.0, 1.0, 101)
  shifted = flow.shift_t(t, 5.0)
  assert shifted[0] == 0.0 and shifted[-1] == 1.0
  assert bool(jnp.all(jnp.diff(shifted) > 0)) and bool(jnp.all(shifted[1:-1] > t[1:-1]))
  np.testing.assert_allclose(flow.shift_t(t, 1.0), t)
  np.testing.assert_allclose(flow.shift_t(jnp.float32(0.5), 5.0), 5 / 6, rtol=1e-6)


def test_logit_normal_times():
  t = flow.sample_t(jax.random.key(0), (20000,), mean=1.5, std=1.6)
  assert float(t.min()) > 0 and float(t.max()) < 1
  np.testing.assert_allclose(float(jnp.median(t)), float(jax.nn.sigmoid(1.5)), atol=0.01)
  shifted = flow.sample_t(jax.random.key(0), (20000,), mean=1.5, std=1.6, shift=3.0)
  np.testing.assert_allclose(shifted, flow.shift_t(t, 3.0), rtol=1e-6)


def test_interpolation_velocity_and_euler_recover_x0():
  x0 = jax.random.normal(jax.random.key(1), (3, 2, 4, 4, 5))
  noise = jax.random.normal(jax.random.key(2), x0.shape)
  t = jnp.array([0.0, 0.3, 1.0])
  x_t = flow.noisy(x0, noise, t)
  np.testing.assert_allclose(x_t[0], x0[0], rtol=1e-6)
  np.testing.assert_allclose(x_t[2], noise[2], rtol=1e-6)
  np.testing.assert_allclose(x_t[1], 0.7 * x0[1] + 0.3 * noise[1], rtol=1e-5, atol=1e-6)
  # d x_t / d t is the velocity noise - x0.
  eps = 1e-3
  derivative = (flow.noisy(x0, noise, t + eps) - flow.noisy(x0, noise, t)) / eps
  np.testing.assert_allclose(derivative, flow.velocity(x0, noise), atol=2e-3)
  np.testing.assert_allclose(flow.model_timestep(t), [0.0, 300.0, 1000.0], rtol=1e-6)

  # The exact velocity field towards x0, v(x, t) = (x - x0) / t, is integrated exactly by Euler steps.
  def velocity_fn(x, timestep):
    return (x - x0) / (timestep[:, None, None, None, None] / flow.TIMESTEP_SCALE)

  sample = flow.euler_sample(velocity_fn, noise, num_steps=7, shift=5.0)
  np.testing.assert_allclose(sample, x0, rtol=1e-4, atol=1e-4)
  times = flow.sampling_times(7, 5.0)
  assert times.shape == (8,) and times[0] == 1.0 and times[-1] == 0.0
