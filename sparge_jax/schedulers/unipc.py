"""UniPC multistep sampling for flow-matching models, step for step as diffusers' `UniPCMultistepScheduler`
with `prediction_type="flow_prediction"` and `use_flow_sigmas=True` (Wan2.1's scheduler).

    scheduler = UniPCMultistep(flow_shift=3.0)
    timesteps, sigmas = scheduler.set_timesteps(50)        # host arrays: what the model sees, the noise levels
    state = scheduler.init_state(timesteps, sigmas, sample)
    for t in timesteps:                                     # or under jit: t = state.timestep
      sample, state = scheduler.step(state, model(sample, t), sample)

`step` is pure and jittable: the multistep history (the last `solver_order` data predictions, the sample
before the last predictor, the warm-up count and the step index) lives in a fixed-shape `UniPCState`, so a
denoising loop compiles one step and reuses it. Each step is UniC (the corrector, from the second step on)
then UniP (the predictor), in data prediction (`predict_x0`). The order ramps up over the first steps and,
with `lower_order_final`, down over the last ones; the step computes every order's update and selects one,
so no control flow (and no host round trip on GPU) depends on the step index.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparge_jax.schedulers import common

SOLVER_TYPES = ("bh1", "bh2")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class UniPCState(NamedTuple):
  """The scheduler's state between steps (a pytree of arrays of fixed shapes).

  timesteps: float32 [num_steps]; sigmas: float32 [num_steps + 1]; step_index, lower_order_nums,
  last_order (the previous predictor's order, the next corrector's): int32 [];
  model_outputs: float32 [solver_order, *sample.shape], data predictions, the newest last;
  last_sample: float32 sample.shape, the sample the previous predictor started from.
  """

  timesteps: jax.Array
  sigmas: jax.Array
  step_index: jax.Array
  lower_order_nums: jax.Array
  last_order: jax.Array
  model_outputs: jax.Array
  last_sample: jax.Array

  @property
  def timestep(self) -> jax.Array:
    """The timestep of the next `step` (what the model is given)."""
    return self.timesteps[self.step_index]


def _lambda(sigma):
  """log(alpha / sigma) for flow sigmas (alpha = 1 - sigma)."""
  return jnp.log(1 - sigma) - jnp.log(sigma)


@dataclasses.dataclass(frozen=True)
class UniPCMultistep:
  """diffusers' UniPCMultistepScheduler options that apply to flow sigmas (their names and defaults).

  flow_shift: the time shift sigma' = s sigma / (1 + (s - 1) sigma); Wan uses 3.0 at 480p, 5.0 at 720p.
  solver_order: the predictor's order (2 is Wan's, and advised for guided sampling).
  disable_corrector: step indices whose corrector (applied at the following step) is skipped.
  """

  num_train_timesteps: int = 1000
  solver_order: int = 2
  solver_type: str = "bh2"
  lower_order_final: bool = True
  disable_corrector: tuple[int, ...] = ()
  flow_shift: float = 1.0
  final_sigmas_type: str = "zero"

  def __post_init__(self):
    common.check_num_train_timesteps(self.num_train_timesteps)
    if not isinstance(self.solver_order, int) or not 1 <= self.solver_order <= 4:
      raise ValueError(f"solver_order must be an int in [1, 4], got {self.solver_order!r}")
    if self.solver_type not in SOLVER_TYPES:
      raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {self.solver_type!r}")
    if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
      raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {self.final_sigmas_type!r}")
    object.__setattr__(self, "flow_shift", common.check_shift("flow_shift", self.flow_shift))
    object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector))

  def set_timesteps(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32 [num_steps], sigmas float32 [num_steps + 1]), as diffusers' `set_timesteps`.

    Sigmas fall linearly from 1 to 1/num_train_timesteps, are shifted, and end with 0 ("zero") or a repeat
    of the last ("sigma_min"); timesteps are sigma * num_train_timesteps truncated to integers, as
    diffusers stores them (int64) and the transformer receives them.
    """
    common.check_num_steps(num_steps)
    sigmas = np.linspace(1, 1 / self.num_train_timesteps, num_steps + 1)[:-1]
    shift = self.flow_shift
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if abs(sigmas[0] - 1) < 1e-6:  # keeps log(sigma / alpha) finite at the first step
      sigmas[0] -= 1e-6
    timesteps = (sigmas * self.num_train_timesteps).astype(np.int64).astype(np.float32)
    last = sigmas[-1] if self.final_sigmas_type == "sigma_min" else 0.0
    return timesteps, np.concatenate([sigmas, [last]]).astype(np.float32)

  def init_state(self, timesteps, sigmas, sample) -> UniPCState:
    """The state before the first step: timesteps [num_steps] and sigmas [num_steps + 1] from
    `set_timesteps`; sample: the initial noise (only its shape is used)."""
    timesteps, sigmas = common.check_schedule(timesteps, sigmas)
    shape = jnp.shape(sample)
    zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers, so a jitted step may donate the state
    return UniPCState(
      timesteps=timesteps,
      sigmas=sigmas,
      step_index=zero(),
      lower_order_nums=zero(),
      last_order=zero(),
      model_outputs=jnp.zeros((self.solver_order, *shape), jnp.float32),
      last_sample=jnp.zeros(shape, jnp.float32),
    )

  def _coefficients(self, h, rks, order: int):
    """(h_phi_1, B_h, R, b) of UniPC's order-`order` update: R [order, order], b [order]."""
    hh = -h  # data prediction
    h_phi_1 = jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if self.solver_type == "bh1" else jnp.expm1(hh)
    rks = jnp.stack([*rks, jnp.ones((), jnp.float32)])
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
      rows.append(rks ** (i - 1))
      b.append(h_phi_k * factorial / b_h)
      factorial *= i + 1
      h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, jnp.stack(rows), jnp.stack(b)

  def _differences(self, sigmas, history, base, lambda_s0, h, order: int):
    """rk and D1 = (m_i - m0) / rk of the `order - 1` older data predictions (newest first)."""
    rks, d1s = [], []
    for i in range(1, order):
      rk = (_lambda(sigmas[base - i]) - lambda_s0) / h
      rks.append(rk)
      d1s.append((history[-(i + 1)] - history[-1]) / rk)
    return rks, d1s

  def _predict(self, state, history, sample, order: int):
    """UniP from sigma[i] to sigma[i + 1]; history: the data predictions with this step's last."""
    i, sigmas = state.step_index, state.sigmas
    sigma_t, sigma_s0 = sigmas[i + 1], sigmas[i]
    alpha_t = 1 - sigma_t
    lambda_s0 = _lambda(sigma_s0)
    h = _lambda(sigma_t) - lambda_s0
    rks, d1s = self._differences(sigmas, history, i, lambda_s0, h, order)
    h_phi_1, b_h, rows, b = self._coefficients(h, rks, order)
    x_t = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * history[-1]
    if not d1s:
      return x_t
    rhos = jnp.full((1,), 0.5, jnp.float32) if order == 2 else jnp.linalg.solve(rows[:-1, :-1], b[:-1])
    return x_t - alpha_t * b_h * sum(rhos[k] * d1 for k, d1 in enumerate(d1s))

  def _correct(self, state, model_output, order: int):
    """UniC of the sample reached at sigma[i] from sigma[i - 1]; model_output: this step's data prediction."""
    i, sigmas, history = state.step_index, state.sigmas, state.model_outputs
    sigma_t, sigma_s0 = sigmas[i], sigmas[i - 1]
    alpha_t = 1 - sigma_t
    lambda_s0 = _lambda(sigma_s0)
    h = _lambda(sigma_t) - lambda_s0
    rks, d1s = self._differences(sigmas, history, i - 1, lambda_s0, h, order)
    h_phi_1, b_h, rows, b = self._coefficients(h, rks, order)
    rhos = jnp.full((1,), 0.5, jnp.float32) if order == 1 else jnp.linalg.solve(rows, b)
    x_t = sigma_t / sigma_s0 * state.last_sample - alpha_t * h_phi_1 * history[-1]
    correction = rhos[-1] * (model_output - history[-1])
    if d1s:
      correction = sum(rhos[k] * d1 for k, d1 in enumerate(d1s)) + correction
    return x_t - alpha_t * b_h * correction

  def step(self, state: UniPCState, model_output, sample) -> tuple[jax.Array, UniPCState]:
    """One step from sigmas[i] to sigmas[i + 1]: (prev_sample like `sample`, the next state).

    model_output: the velocity predicted at (sample, state.timestep); the update computes in float32;
    sample: [...] of the state's shape.
    """
    common.check_step_shapes(state.last_sample.shape, model_output, sample)
    out_dtype = jnp.result_type(sample)
    sample = jnp.asarray(sample, jnp.float32)
    i = state.step_index
    converted = sample - state.sigmas[i] * jnp.asarray(model_output, jnp.float32)

    corrector_on = i > 0
    for disabled in self.disable_corrector:
      corrector_on &= i - 1 != disabled
    corrected = sample
    for order in range(1, self.solver_order + 1):
      corrected = jnp.where(
        corrector_on & (state.last_order == order), self._correct(state, converted, order), corrected
      )

    history = jnp.concatenate([state.model_outputs[1:], converted[None]])
    num_steps = state.sigmas.shape[0] - 1
    order = jnp.asarray(self.solver_order, jnp.int32)
    if self.lower_order_final:
      order = jnp.minimum(order, num_steps - i)
    order = jnp.minimum(order, state.lower_order_nums + 1)
    prev_sample = corrected
    for k in range(1, self.solver_order + 1):
      prev_sample = jnp.where(order == k, self._predict(state, history, corrected, k), prev_sample)

    next_state = state._replace(
      step_index=i + 1,
      lower_order_nums=jnp.minimum(state.lower_order_nums + 1, self.solver_order),
      last_order=order.astype(jnp.int32),
      model_outputs=history,
      last_sample=corrected,
    )
    return prev_sample.astype(out_dtype), next_state
