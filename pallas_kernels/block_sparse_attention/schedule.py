"""Static work schedules for persistent kernels: items of uneven cost dealt to a fixed set of lanes.

A persistent kernel runs `lanes` workers (CTAs, or warpgroup pairs of a CTA) that loop over work items.
Dealing items round-robin keeps the items that run at the same time adjacent in the original order (for
the dK/dV kernel: kv blocks of one head, whose Q and dO then stay in L2), but when items differ in cost
the kernel lasts as long as its most loaded lane. `balanced_schedule` keeps round-robin's rounds (lane l
still takes one item of each round, so the items that run at one time are the same) and only changes
which lane takes which item of a round: rounds are merged in pairs, a lane that took one of the first
round's larger items taking one of the second's smaller, then those pairs in pairs by their totals, and
so on. Merging pairs of rounds only evens out rounds that look alike (a random mask's columns); with
causal masking cost grows along a head's blocks, so adjacent rounds differ, and it takes merging every round
(MOSAIC_NOTES.md has the figures).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def balanced_schedule(work, lanes: int, *, levels: int | None = None):
  """Deal work items to `lanes` lanes, one item of each round to each lane, so that lanes' totals even out.

  work: int [n], the cost of each item (e.g. its pipeline steps), items in the order they should run.
  levels: how many times blocks of rounds are merged in pairs: 1 pairs rounds only, None merges up to
  all of them.
  Returns (items int32 [lanes, rounds], count int32 [lanes]), rounds = ceil(n / lanes): lane l runs
  items[l, :count[l]] in that order; entries past count[l] are -1.

  Round r holds items r·lanes ... r·lanes + lanes - 1, as round-robin dealing would, so items running at
  the same time stay adjacent. Merging two blocks of rounds gives the first block's lanes, ranked by their
  totals in it largest first, the second's ranked smallest first (ties by lane): with one round per block
  a lane takes a round's l-th largest item and the next round's l-th smallest.
  """
  if lanes < 1:
    raise ValueError(f"lanes: a positive number, got {lanes}")
  if levels is not None and (not isinstance(levels, int) or isinstance(levels, bool) or levels < 1):
    raise ValueError(f"levels: a positive int or None, got {levels!r}")
  work = jnp.asarray(work)
  if work.ndim != 1 or not jnp.issubdtype(work.dtype, jnp.integer):
    raise ValueError(f"work: a 1-d integer array, got {work.dtype} {work.shape}")
  return _balanced_schedule(work.astype(jnp.int32), lanes, levels)


def _descending_rank(x):
  """x: [..., m] -> int32 [..., m], each entry's place when sorted descending, ties by position.

  By comparing all pairs: m is a few hundred lanes, and one fused [m, m] reduction is several times
  faster on a GPU than a sort kernel of that size.
  """
  m = x.shape[-1]
  first = jnp.arange(m)[:, None] < jnp.arange(m)[None, :]  # [j, i]: j comes before i
  ahead = (x[..., :, None] > x[..., None, :]) | ((x[..., :, None] == x[..., None, :]) & first)
  return jnp.sum(ahead, axis=-2, dtype=jnp.int32)


def _by_rank(x, rank):
  """x: [blocks, ..., lanes], rank: int32 [blocks, lanes] (a permutation per block) -> x with the entry of
  lane s moved to lane rank[s]."""
  blocks, lanes = rank.shape
  lane = jnp.arange(lanes, dtype=jnp.int32)
  # source[b, k]: the lane whose rank is k (a one-hot reduction, as cheap on a GPU as the rank itself).
  source = jnp.sum(jnp.where(rank[:, :, None] == lane[None, None, :], lane[None, :, None], 0), axis=1)
  source = source.reshape(blocks, *(1,) * (x.ndim - 2), lanes)
  return jnp.take_along_axis(x, jnp.broadcast_to(source, x.shape), axis=-1)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _balanced_schedule(work, lanes, levels):
  n = work.shape[0]
  rounds = -(-n // lanes)
  # Merges until one block holds every round; a single round is still dealt largest first.
  merges = max(1, (rounds - 1).bit_length())
  merges = merges if levels is None else min(levels, merges)
  padded_rounds = -(-rounds // 2**merges) * 2**merges
  # Padding (work -1, past the last item) ranks behind every item of its round and adds nothing to totals.
  work = jnp.pad(work, (0, padded_rounds * lanes - n), constant_values=-1).reshape(padded_rounds, lanes)
  items = jnp.arange(padded_rounds * lanes, dtype=jnp.int32).reshape(padded_rounds, lanes)  # [round, lane]
  totals = work  # [block, lane]: a lane's total over the block's rounds (a block is one round at first)
  for level in range(merges):
    blocks = padded_rounds // 2 ** (level + 1)
    pair = totals.reshape(blocks, 2, lanes)
    first = _descending_rank(pair[:, 0])
    second = lanes - 1 - _descending_rank(pair[:, 1])  # smallest first
    dealt = items.reshape(blocks, 2, 2**level, lanes)
    items = jnp.stack([_by_rank(dealt[:, 0], first), _by_rank(dealt[:, 1], second)], axis=1)
    items = items.reshape(padded_rounds, lanes)
    pair = jnp.maximum(pair, 0)
    totals = _by_rank(pair[:, 0], first) + _by_rank(pair[:, 1], second)
  items = jnp.where(items[:rounds] < n, items[:rounds], -1).T
  # Only the last round has padding, so every lane's -1 entries come after its items.
  return items, jnp.sum(items >= 0, axis=1, dtype=jnp.int32)
