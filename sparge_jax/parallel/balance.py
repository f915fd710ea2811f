"""Load balance: the kept blocks each device computes, and a Ulysses head order that evens them out.

Heads differ in how many blocks their masks keep, so Ulysses devices, which own whole heads, get uneven
work; ring devices own query rows, and differ where the rows do (causal masking, lengths). The work of a
device is the number of (q block, kv block) pairs of its heads and rows that the mask keeps.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class LoadBalance(NamedTuple):
  """kept: int64 [ulysses, ring], the kept blocks of each device; max_over_mean: the busiest device's
  work over the mean (1.0 is perfect balance)."""

  kept: np.ndarray
  max_over_mean: float


def load_balance(mask, *, ulysses: int = 1, ring: int = 1, head_order=None) -> LoadBalance:
  """The kept work per device of the block mask `mask` under Ulysses × ring sequence parallelism.

  mask: bool [batch, heads, n_q_blocks, n_kv_blocks], the unsharded block mask (`sparge_jax.attention.
  block_mask`), or int kept counts [heads] per head (then ring must be 1). Ulysses device u owns the heads
  at positions [u · N/U, (u + 1) · N/U) of `head_order` (None: in order; heads padded to a multiple of U
  count as no work), ring device r the q rows of chunks u · R + r of the U · R equal chunks of the rows
  (the layout of `usp_attention`; plain ring: the r-th slice).
  """
  mask = np.asarray(mask)
  heads = mask.shape[0] if mask.ndim == 1 else mask.shape[1]
  for name, size in (("ulysses", ulysses), ("ring", ring)):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f"{name} must be an int >= 1, got {size!r}")
  if mask.ndim == 1:
    if ring != 1:
      raise ValueError("ring: per-head counts carry no rows; pass the mask [batch, heads, n_q, n_kv]")
    per_head_rows = mask.astype(np.int64)[:, None, None]  # [heads, chunks=1, ring=1]
  elif mask.ndim == 4:
    n_q = mask.shape[2]
    if n_q % (ulysses * ring):
      raise ValueError(f"mask: its {n_q} q blocks do not split into ulysses * ring = {ulysses * ring} chunks")
    rows = mask.sum(axis=(0, 3), dtype=np.int64)  # [heads, n_q]
    per_head_rows = rows.reshape(heads, ulysses, ring, -1).sum(-1)  # chunk u · R + r
  else:
    raise ValueError(f"mask must be [batch, heads, n_q_blocks, n_kv_blocks] or [heads], got shape {mask.shape}")
  order = np.arange(heads) if head_order is None else np.asarray(head_order).reshape(-1)
  if sorted(order.tolist()) != list(range(heads)):
    raise ValueError(f"head_order must be a permutation of the {heads} heads, got {head_order!r}")
  padded = -(-heads // ulysses) * ulysses
  by_position = np.zeros((padded, ring), np.int64)
  by_position[:heads] = per_head_rows[order].sum(axis=1)  # a Ulysses device holds every chunk of its heads
  kept = by_position.reshape(ulysses, padded // ulysses, ring).sum(axis=1)
  mean = kept.mean()
  return LoadBalance(kept, float(kept.max() / mean) if mean else 1.0)


def balanced_head_order(kept_per_head, devices: int, *, group: int = 1) -> tuple[int, ...]:
  """A head order for `ulysses_attention(head_order=...)` that evens out the kept blocks of `devices` devices.

  kept_per_head: [heads] work per head (e.g. `mask.sum(axis=(0, 2, 3))` of a calibration batch);
  group: query heads per kv head (GQA), moved together. Greedy, largest group first onto the device with
  the least work that still has room (each takes heads / devices heads); heads must divide by devices
  into whole groups. Returns the heads of device 0, then of device 1, and so on, each in ascending order.
  """
  kept = np.asarray(kept_per_head, np.float64).reshape(-1)
  heads = kept.size
  if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
    raise ValueError(f"devices must be an int >= 1, got {devices!r}")
  if isinstance(group, bool) or not isinstance(group, int) or group < 1 or heads % group:
    raise ValueError(f"group must be an int >= 1 dividing the {heads} heads, got {group!r}")
  groups = heads // group
  if groups % devices:
    raise ValueError(f"the {groups} head groups of {group} do not divide over {devices} devices")
  work = kept.reshape(groups, group).sum(axis=1)
  room, load = [groups // devices] * devices, [0.0] * devices
  owned = [[] for _ in range(devices)]
  for g in sorted(range(groups), key=lambda g: (-work[g], g)):
    device = min((d for d in range(devices) if room[d]), key=lambda d: (load[d], d))
    owned[device].append(g)
    room[device] -= 1
    load[device] += work[g]
  return tuple(int(g * group + m) for heads_of in owned for g in sorted(heads_of) for m in range(group))
