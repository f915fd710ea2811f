"""balanced_schedule: every item once, rounds kept, directions alternating, lanes evened out."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.block_sparse_attention.schedule import balanced_schedule


def _lanes_items(work, lanes):
  items, count = (np.asarray(x) for x in balanced_schedule(np.asarray(work, np.int32), lanes))
  return items, count


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=120), st.integers(1, 17))
def test_every_item_runs_once_in_its_round(work, lanes):
  items, count = _lanes_items(work, lanes)
  rounds = -(-len(work) // lanes)
  assert items.shape == (lanes, rounds) and items.dtype == np.int32
  assert sorted(np.concatenate([items[l, : count[l]] for l in range(lanes)]).tolist()) == list(range(len(work)))
  for l in range(lanes):
    assert np.all(items[l, count[l] :] == -1)
    np.testing.assert_array_equal(items[l, : count[l]] // lanes, np.arange(count[l]))  # item i: round i


def test_lanes_take_large_then_small_items():
  """Round 0 by descending work (ties by position), round 1 by ascending, the partial last round too."""
  work = [5, 9, 1, 7, 2, 8, 6, 3, 4, 0]
  items, count = _lanes_items(work, 4)
  np.testing.assert_array_equal(items, [[1, 4, 8], [3, 7, 9], [0, 6, -1], [2, 5, -1]])
  np.testing.assert_array_equal(count, [3, 3, 2, 2])
  items, _ = _lanes_items([3, 3, 3, 3, 3, 3], 3)  # equal work: round-robin, then reversed
  np.testing.assert_array_equal(items, [[0, 5], [1, 4], [2, 3]])


def test_evens_out_a_random_masks_columns():
  """The dK/dV kernel's case: q blocks per kv block of a 95%-sparse random mask, 264 pairs."""
  rng = np.random.default_rng(0)
  mask = np.zeros((12, 256, 512), bool)
  np.put_along_axis(mask, np.argsort(rng.random(mask.shape), axis=-1)[..., :26], True, axis=-1)
  work = mask.sum(axis=1).reshape(-1)
  items, count = _lanes_items(work, 264)
  dealt = np.array([work[items[l, : count[l]]].sum() for l in range(264)])
  round_robin = np.array([work[l::264].sum() for l in range(264)])
  assert dealt.sum() == work.sum()
  assert round_robin.max() / round_robin.mean() > 1.2 and dealt.max() / dealt.mean() < 1.15


@pytest.mark.parametrize(
  "work,lanes,message",
  [
    (np.zeros(4, np.int32), 0, "lanes"),
    (np.zeros(4, np.float32), 2, "work"),
    (np.zeros((2, 2), np.int32), 2, "work"),
  ],
)
def test_rejects_bad_arguments(work, lanes, message):
  with pytest.raises(ValueError, match=message):
    balanced_schedule(work, lanes)
