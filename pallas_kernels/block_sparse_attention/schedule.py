"""Static work schedules for persistent kernels: items of uneven cost dealt to a fixed set of lanes.

A persistent kernel runs `lanes` workers (CTAs, or warpgroup pairs of a CTA) that loop over work items.
Dealing items round-robin keeps the items that run at the same time adjacent in the original order (for
the dK/dV kernel: kv blocks of one head, whose Q and dO then stay in L2), but when items differ in cost
the kernel lasts as long as its most loaded lane, which on the transposed table of a random mask
carries well above the mean. `balanced_schedule` keeps the rounds of adjacent items and only changes
which lane takes which item of a round, which narrows that gap (benchmarks/NOTES.md has the figures and
what it does to the kernels).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def balanced_schedule(work, lanes: int):
  """Deal work items to `lanes` lanes, alternating directions, so that lanes' total work evens out.

  work: int [n], the cost of each item (e.g. its pipeline steps), items in the order they should run.
  Returns (items int32 [lanes, rounds], count int32 [lanes]), rounds = ceil(n / lanes): lane l runs
  items[l, :count[l]] in that order; entries past count[l] are -1.

  Round r holds items r·lanes ... r·lanes + lanes - 1, as round-robin dealing would, so items running at
  the same time stay adjacent; lane l takes the round's l-th largest item in even rounds and its l-th
  smallest in odd ones, so a lane given a large item is given a small one next.
  """
  if lanes < 1:
    raise ValueError(f"lanes: a positive number, got {lanes}")
  work = jnp.asarray(work)
  if work.ndim != 1 or not jnp.issubdtype(work.dtype, jnp.integer):
    raise ValueError(f"work: a 1-d integer array, got {work.dtype} {work.shape}")
  return _balanced_schedule(work.astype(jnp.int32), lanes)


def _descending_rank(x):
  """x: [..., m] -> int32 [..., m], each entry's place when sorted descending, ties by position.

  By comparing all pairs: m is a few hundred lanes, and one fused [m, m] reduction is several times
  faster on a GPU than a sort kernel of that size.
  """
  m = x.shape[-1]
  first = jnp.arange(m)[:, None] < jnp.arange(m)[None, :]  # [j, i]: j comes before i
  ahead = (x[..., :, None] > x[..., None, :]) | ((x[..., :, None] == x[..., None, :]) & first)
  return jnp.sum(ahead, axis=-2, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnums=(1,))
def _balanced_schedule(work, lanes):
  n = work.shape[0]
  rounds = -(-n // lanes)
  # Padding (work -1, past the last item) ranks behind every item of the last round.
  work = jnp.pad(work, (0, rounds * lanes - n), constant_values=-1).reshape(rounds, lanes)
  ids = jnp.arange(rounds * lanes, dtype=jnp.int32).reshape(rounds, lanes)
  rank = _descending_rank(work)
  lane = jnp.arange(lanes, dtype=jnp.int32)
  wanted = jnp.where((jnp.arange(rounds) % 2 == 1)[:, None], lanes - 1 - lane, lane)  # [rounds, lanes]
  hit = rank[:, None, :] == wanted[:, :, None]  # [round, lane, item]
  items = jnp.sum(jnp.where(hit & (work >= 0)[:, None, :], ids[:, None, :] + 1, 0), axis=-1) - 1
  items = items.T.astype(jnp.int32)
  # Only the last round has padding, so every lane's -1 entries come after its items.
  return items, jnp.sum(items >= 0, axis=1, dtype=jnp.int32)
