"""Sparse-attention schedules over denoising steps and layers, as the arrays the model reads per step.

    schedule = AttentionSchedule(topk=0.05, topp=0.0, dense_steps=12, dense_layers=1)   # Radial Attention's
    schedule = AttentionSchedule(topk=(1.0, 1.0, 0.55, 0.3, 0.1, 0.05), topp=0.0)       # one topk per step
    tables = schedule.tables(num_steps=6, num_layers=30, heads=12)  # LayerSparsity of [steps, layers, heads]

At step i the pipeline passes `LayerSparsity(tables.topk[i], tables.topp[i])` to the transformer inside
its one jitted step, so a schedule is data: changing it, or moving from step to step, compiles nothing.
A dense (step, layer) gets topk = topp = 1, the sparse rule keeping every block, rather than a traced
branch to the dense kernel: XLA's GPU conditional reads its predicate back to the host (a wait for the
device per layer and step), while the block-sparse kernel with every block kept runs at about dense
attention's speed and the mask costs little beside it. A run dense throughout (`is_dense`) uses the dense
kernel.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparge_jax.config import MODES, check_fraction
from sparge_jax.models.wan import LayerSparsity

__all__ = ["AttentionSchedule", "LayerSparsity"]


def _per_step(name: str, value) -> float | tuple[float, ...]:
  if isinstance(value, (list, tuple, np.ndarray)):
    values = tuple(np.asarray(value).tolist())
    if not values:
      raise ValueError(f"{name} must be a float or a non-empty sequence with one value per step, got {value!r}")
    for i, v in enumerate(values):
      check_fraction(f"{name}[{i}]", v)
    return tuple(float(v) for v in values)
  check_fraction(name, value)
  return float(value)


def _count(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{name} must be an int >= 0, got {value!r}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class AttentionSchedule:
  """Which self-attention each denoising step and layer runs.

  topk, topp: the sparse rule's fractions in [0, 1], one for every step or a tuple with one per step
    (sglang's `topk_ratio_list`); the rule's mode and block sizes are the transformer's `config.attention`.
  dense_steps: the first N steps are dense (Radial Attention's `dense_timesteps`, Sparse VideoGen's
    `first_times_fp` times the steps, xDiT's hybrid schedule).
  dense_last_steps: the last N steps are dense (xDiT).
  dense_layers: the first N layers are dense at every step (Radial Attention's `dense_layers`, Sparse
    VideoGen's `first_layers_fp` times the layers).
  """

  topk: float | tuple[float, ...] = 0.03
  topp: float | tuple[float, ...] = 0.2
  dense_steps: int = 0
  dense_last_steps: int = 0
  dense_layers: int = 0

  def __post_init__(self):
    for name in ("topk", "topp"):
      object.__setattr__(self, name, _per_step(name, getattr(self, name)))
    for name in ("dense_steps", "dense_last_steps", "dense_layers"):
      object.__setattr__(self, name, _count(name, getattr(self, name)))

  def tables(self, num_steps: int, num_layers: int, heads: int) -> LayerSparsity:
    """topk, topp as float32 numpy arrays [num_steps, num_layers, heads]; dense entries are 1."""
    for name, value in (("num_steps", num_steps), ("num_layers", num_layers), ("heads", heads)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    columns = []
    for name in ("topk", "topp"):
      value = getattr(self, name)
      if isinstance(value, tuple) and len(value) != num_steps:
        raise ValueError(f"{name} has {len(value)} per-step values, but the run has num_steps={num_steps}")
      columns.append(np.broadcast_to(np.asarray(value, np.float32).reshape(-1, 1, 1), (num_steps, num_layers, heads)))
    dense = np.zeros((num_steps, num_layers, 1), bool)
    dense[: self.dense_steps] = True
    dense[num_steps - min(self.dense_last_steps, num_steps) :] = True
    dense[:, : self.dense_layers] = True
    return LayerSparsity(*(np.where(dense, np.float32(1), c).astype(np.float32) for c in columns))

  def is_dense(self, num_steps: int, num_layers: int, mode: str = "hybrid") -> bool:
    """True when, under the rule `mode`, every step and layer keeps every block (a run can then use the
    dense kernel instead)."""
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    topk, topp = (a >= 1 for a in self.tables(num_steps, num_layers, 1))
    return bool(np.all({"hybrid": topk | topp, "topk": topk, "topp": topp}[mode]))
