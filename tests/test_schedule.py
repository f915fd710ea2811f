"""balanced_schedule: every item once, rounds kept, rounds merged in pairs or all of them, lanes evened out."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.block_sparse_attention.schedule import balanced_schedule


def _lanes_items(work, lanes, levels=None):
  items, count = (np.asarray(x) for x in balanced_schedule(np.asarray(work, np.int32), lanes, levels=levels))
  return items, count


def _lane_totals(work, lanes, levels=None):
  items, count = _lanes_items(work, lanes, levels)
  return np.array([work[items[l, : count[l]]].sum() for l in range(lanes)])


def _round_robin_totals(work, lanes):
  return np.array([work[l::lanes].sum() for l in range(lanes)])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=120), st.integers(1, 17), st.sampled_from([1, 2, None]))
def test_every_item_runs_once_in_its_round(work, lanes, levels):
  items, count = _lanes_items(work, lanes, levels)
  rounds = -(-len(work) // lanes)
  assert items.shape == (lanes, rounds) and items.dtype == np.int32
  assert sorted(np.concatenate([items[l, : count[l]] for l in range(lanes)]).tolist()) == list(range(len(work)))
  for l in range(lanes):
    assert np.all(items[l, count[l] :] == -1)
    np.testing.assert_array_equal(items[l, : count[l]] // lanes, np.arange(count[l]))  # item i: round i


def test_lanes_take_large_then_small_items():
  """Rounds merged in pairs: round 0 by descending work (ties by position), round 1 by ascending, the
  partial last round too."""
  work = [5, 9, 1, 7, 2, 8, 6, 3, 4, 0]
  items, count = _lanes_items(work, 4, levels=1)
  np.testing.assert_array_equal(items, [[1, 4, 8], [3, 7, 9], [0, 6, -1], [2, 5, -1]])
  np.testing.assert_array_equal(count, [3, 3, 2, 2])
  items, _ = _lanes_items([3, 3, 3, 3, 3, 3], 3, levels=1)  # equal work: round-robin, then reversed
  np.testing.assert_array_equal(items, [[0, 5], [1, 4], [2, 3]])
  items, _ = _lanes_items([7, 1, 4], 4, levels=1)  # a single round: largest first
  np.testing.assert_array_equal(items, [[0], [2], [1], [-1]])


def test_merged_pairs_of_rounds_take_each_others_opposites():
  """All rounds merged: after pairing rounds 0 and 1 (lane totals 11, 10, 11, 9) and rounds 2 and 3 (4, 0,
  0, 0; round 3 is padding), the first pair's lanes by descending total take the second's by ascending."""
  items, count = _lanes_items([5, 9, 1, 7, 2, 8, 6, 3, 4, 0], 4)
  np.testing.assert_array_equal(items, [[1, 4, -1], [0, 6, -1], [3, 7, 9], [2, 5, 8]])
  np.testing.assert_array_equal(count, [2, 2, 3, 3])


def test_evens_out_a_random_masks_columns():
  """The dK/dV kernel's case: q blocks per kv block of a 95%-sparse random mask, 264 pairs."""
  rng = np.random.default_rng(0)
  mask = np.zeros((12, 256, 512), bool)
  np.put_along_axis(mask, np.argsort(rng.random(mask.shape), axis=-1)[..., :26], True, axis=-1)
  work = mask.sum(axis=1).reshape(-1)
  round_robin, paired, merged = _round_robin_totals(work, 264), _lane_totals(work, 264, 1), _lane_totals(work, 264)
  assert paired.sum() == merged.sum() == work.sum()
  assert round_robin.max() / round_robin.mean() > 1.2
  assert paired.max() / paired.mean() < 1.15 and merged.max() / merged.mean() < 1.05


def _causal_mask(rng, heads=12, n_q=256, n_kv=512, kept=0.05):
  """q blocks of 128 rows over kv blocks of 64: q block i may see kv blocks 0 ... 2i + 1 and keeps 5% of
  them, always block 2i (its first query's), as the benchmarks' causal masks do."""
  allowed = np.arange(n_kv)[None, :] <= 2 * np.arange(n_q)[:, None] + 1
  noise = np.where(allowed, rng.random((heads, n_q, n_kv)), 2.0)
  noise[:, np.arange(n_q), 2 * np.arange(n_q)] = -1.0
  ranks = np.argsort(np.argsort(noise, axis=-1), axis=-1)
  return ranks < np.maximum(1, np.round(kept * allowed.sum(-1)))[:, None], allowed


def test_evens_out_causal_columns_only_with_every_round_merged():
  """A causal mask's kv blocks serve fewer q blocks the later they are, so adjacent rounds differ: merged in
  pairs, the deal is worse than round-robin; with every round merged the lanes even out."""
  mask, _ = _causal_mask(np.random.default_rng(1))
  work = mask.sum(axis=1).reshape(-1) * 2  # 64-row sub-tile steps per kv block
  round_robin, paired, merged = _round_robin_totals(work, 264), _lane_totals(work, 264, 1), _lane_totals(work, 264)
  assert round_robin.max() / round_robin.mean() > 1.25 and paired.max() / paired.mean() > 1.4
  assert merged.max() / merged.mean() < 1.06


def test_a_schedule_of_the_causal_geometry_evens_out_the_rows():
  """The forward's case: a schedule dealt by each q block's allowed kv blocks alone (fixed before the mask
  is known) evens out the steps (two kept blocks each) of the mask's rows on 132 lanes."""
  mask, allowed = _causal_mask(np.random.default_rng(2))
  steps = -(-mask.sum(axis=-1).reshape(-1) // 2)
  items, count = _lanes_items(np.tile(allowed.sum(-1), 12), 132)
  dealt = np.array([steps[items[l, : count[l]]].sum() for l in range(132)])
  round_robin = _round_robin_totals(steps, 132)
  assert dealt.sum() == steps.sum()
  assert round_robin.max() / round_robin.mean() > 1.12 and dealt.max() / dealt.mean() < 1.06


@pytest.mark.parametrize(
  "work,lanes,message",
  [
    (np.zeros(4, np.int32), 0, "lanes"),
    (np.zeros(4, np.float32), 2, "work"),
    (np.zeros((2, 2), np.int32), 2, "work"),
    (np.zeros(4, np.int32), 2, "levels"),
  ],
)
def test_rejects_bad_arguments(work, lanes, message):
  with pytest.raises(ValueError, match=message):
    balanced_schedule(work, lanes, levels=0 if message == "levels" else None)
