"""Ulysses over one mesh axis: an all-to-all from sequence to head sharding, attention per head group, and back.

Device d of the axis (size U) gets the full sequence of the heads at positions [d · N/U, (d + 1) · N/U) of
`head_order` (the identity by default). Heads that do not divide by U are padded with zero query heads,
which keep one block per row and are cut off afterwards. kv heads follow their query heads: without GQA, or
where each device's query heads use kv heads of their own (K a multiple of U, no padding), k and v take the
same all-to-all (padded alike without GQA); otherwise every device gathers the whole k and v (all K heads)
and keeps the kv heads its query heads read, one per query head where the groups straddle devices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax


def to_heads(x, axis: str):
  """[batch, seq / U, heads, ...] -> [batch, seq, heads / U, ...] (the all-to-all of Ulysses)."""
  return lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)


def to_sequence(x, axis: str):
  """Inverse of `to_heads`: [batch, seq, heads / U, ...] -> [batch, seq / U, heads, ...]."""
  return lax.all_to_all(x, axis, split_axis=1, concat_axis=2, tiled=True)


@dataclasses.dataclass(frozen=True)
class Heads:
  """How N query heads over K kv heads spread over U devices.

  order: query head at each position (length padded_heads; positions past N hold padding, -1).
  kv_split: k and v take the all-to-all (kv heads at positions d · K/U ... of `kv_order`).
  kv_start, kv_group: otherwise device d keeps kv heads [kv_start[d], kv_start[d] + local_kv) of the
  gathered k, v, with kv_group query heads each; kv_group 0 means one kv head per query head (`kv_index`).
  """

  heads: int
  kv_heads: int
  devices: int
  order: tuple[int, ...]
  kv_order: tuple[int, ...]
  kv_split: bool
  kv_start: tuple[int, ...]
  local_kv: int
  kv_group: int

  @property
  def padded_heads(self) -> int:
    return len(self.order)

  @property
  def local_heads(self) -> int:
    return self.padded_heads // self.devices

  @property
  def kv_index(self) -> np.ndarray:
    """int32 [padded_heads]: the kv head the query head at each position reads (padding reads kv head 0)."""
    group = self.heads // self.kv_heads
    return np.array([max(h, 0) // group for h in self.order], np.int32)


def check_head_order(head_order, heads: int, kv_heads: int, name: str = "head_order") -> tuple[int, ...]:
  """`head_order` as a tuple, or ValueError: a permutation of the heads that keeps each kv head's query
  heads together and in order (a permutation of whole groups)."""
  if head_order is None:
    return tuple(range(heads))
  order = tuple(int(h) for h in np.asarray(head_order).reshape(-1))
  if sorted(order) != list(range(heads)):
    raise ValueError(f"{name} must be a permutation of the {heads} heads, got {head_order!r}")
  group = heads // kv_heads
  rows = np.asarray(order).reshape(kv_heads, group)
  if np.any(rows - rows[:, :1] != np.arange(group)) or np.any(rows[:, 0] % group):
    raise ValueError(f"{name} must move whole groups of {group} query heads (one kv head each), got {head_order!r}")
  return order


@functools.cache
def plan(heads: int, kv_heads: int, devices: int, order: tuple[int, ...]) -> Heads:
  """The `Heads` of N = heads, K = kv_heads over `devices`, with query heads in `order`."""
  group = heads // kv_heads
  padded = -(-heads // devices) * devices
  order = order + (-1,) * (padded - heads)
  kv_order = tuple(h // group for h in order[:heads:group])
  local = padded // devices
  # Without GQA, kv heads pad with their query heads; with it, the groups must fall on whole devices.
  kv_split = group == 1 or (padded == heads and kv_heads % devices == 0)
  kv_index = np.array([max(h, 0) // group for h in order]).reshape(devices, local)
  # A contiguous run of kv heads per device, each read by kv_group consecutive query heads, or else one per query head.
  for kv_group in (g for g in range(local, 0, -1) if local % g == 0):
    starts = kv_index[:, 0]
    if np.all(kv_index == starts[:, None] + np.arange(local) // kv_group):
      break
  else:
    kv_group = 0
  starts = tuple(int(s) for s in kv_index[:, 0]) if kv_group else (0,) * devices
  return Heads(
    heads, kv_heads, devices, order, kv_order, kv_split, starts, local // kv_group if kv_group else 0, kv_group
  )


def _per_position(values, heads: Heads, fill: float):
  """A per-head [N] array at the positions of `heads.order` (padding gets `fill`); scalars stay scalars."""
  if jnp.ndim(values) == 0:
    return values
  values = jnp.asarray(values, jnp.float32)
  index = np.array([max(h, 0) for h in heads.order])
  pad = np.array([h < 0 for h in heads.order])
  placed = jnp.take(values, jnp.asarray(index))
  return jnp.where(jnp.asarray(pad), fill, placed) if pad.any() else placed


def ulysses(q, k, v, topk, topp, *, axis: str, heads: Heads, local):
  """Ulysses around `local(q, k, v, topk, topp) -> (out, lse [B, T, n], kept [B, n])`, run on each device's
  heads over the full sequence. q: [B, T/U, N, H], k, v: [B, S/U, K, H], sharded along the sequence over
  `axis`; topk, topp: scalars or [N]. Returns (out [B, T/U, N, H], lse [B, T/U, N], kept [B, N])."""
  device = lax.axis_index(axis)
  identity = heads.order[: heads.heads] == tuple(range(heads.heads))
  padding = heads.padded_heads - heads.heads
  if padding:
    # Zero queries keep one block per row (topk = topp = 0), the least work a padded head can do.
    topk, topp = (jnp.broadcast_to(jnp.asarray(p, jnp.float32), (heads.heads,)) for p in (topk, topp))
  topk, topp = _per_position(topk, heads, 0.0), _per_position(topp, heads, 0.0)
  if not identity:
    q = jnp.take(q, jnp.asarray([max(h, 0) for h in heads.order[: heads.heads]]), axis=2)
  if padding:
    q = jnp.pad(q, ((0, 0), (0, 0), (0, padding), (0, 0)))
  q = to_heads(q, axis)
  if heads.kv_split:
    if heads.kv_order != tuple(range(heads.kv_heads)):
      k, v = (jnp.take(x, jnp.asarray(heads.kv_order), axis=2) for x in (k, v))
    if padding:  # one kv head per query head (no GQA): zero kv heads for the zero query heads
      k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, padding), (0, 0))) for x in (k, v))
    k, v = to_heads(k, axis), to_heads(v, axis)
  else:
    k, v = (lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v))
    if heads.kv_group:
      start = jnp.asarray(heads.kv_start)[device]
      k, v = (lax.dynamic_slice_in_dim(x, start, heads.local_kv, axis=2) for x in (k, v))
    else:
      index = lax.dynamic_slice_in_dim(jnp.asarray(heads.kv_index), device * heads.local_heads, heads.local_heads)
      k, v = (jnp.take(x, index, axis=2) for x in (k, v))
  local_slice = lambda p: (
    p if jnp.ndim(p) == 0 else lax.dynamic_slice_in_dim(p, device * heads.local_heads, heads.local_heads)
  )
  out, lse, kept = local(q, k, v, local_slice(topk), local_slice(topp))
  out, lse = to_sequence(out, axis), to_sequence(lse, axis)
  # A psum of each device's counts in its place: the same [B, N] on every device (an all_gather would vary).
  placed = jnp.zeros((kept.shape[0], heads.padded_heads), kept.dtype)
  kept = lax.psum(lax.dynamic_update_slice_in_dim(placed, kept, device * heads.local_heads, axis=1), axis)
  if padding:
    out, lse, kept = out[:, :, : heads.heads], lse[:, :, : heads.heads], kept[:, : heads.heads]
  if not identity:
    inverse = jnp.asarray(np.argsort(heads.order[: heads.heads]))
    out, lse, kept = jnp.take(out, inverse, axis=2), jnp.take(lse, inverse, axis=2), jnp.take(kept, inverse, axis=1)
  return out, lse, kept
