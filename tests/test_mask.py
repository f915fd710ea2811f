"""Top-k ∪ Top-p block selection: hand-built rows, a brute-force model, and the index tables."""

import functools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.block_mask import triton_index_table as index_table_kernel
from pallas_kernels.block_mask import triton_select as mask_select
from sparge_jax import attention
from sparge_jax import mask as mask_lib


def _select(rows, topk, topp, mode="hybrid"):
  probs = jnp.asarray(rows, jnp.float32)[None, None]  # [1, 1, n_rows, n_kv]
  return np.asarray(mask_lib.select_blocks_from_probs(probs, topk, topp, mode))[0, 0]


def _brute_force(row, topk, topp, mode):
  """The paper's rule, written as plainly as possible."""
  n = len(row)
  order = sorted(range(n), key=lambda j: (-row[j], j))
  k_count = math.ceil(topk * n - 1e-3)
  p_count, mass = 0, 0.0
  for j in order:
    if topp >= 1.0 or mass < topp:
      p_count += 1
      mass += row[j]
  count = {"hybrid": max(k_count, p_count), "topk": k_count, "topp": p_count}[mode]
  kept = set(order[: max(1, min(n, count))])
  return np.array([j in kept for j in range(n)])


def test_near_uniform_row_topp_keeps_mass_topk_does_not():
  row = np.full(10, 0.1) + np.linspace(-0.004, 0.005, 10)
  row = row / row.sum()
  assert _select([row], 0.2, 0.5, "topk")[0].sum() == 2
  assert _select([row], 0.2, 0.5, "topp")[0].sum() == 5  # ~0.1 each: five blocks to reach 0.5
  hybrid = _select([row], 0.2, 0.5, "hybrid")[0]
  assert hybrid.sum() == 5 and hybrid[np.argsort(-row)[:5]].all()


def test_skewed_row_with_sink_topk_keeps_more_than_topp():
  row = np.array([0.86] + [0.02] * 7)
  assert _select([row], 0.25, 0.5, "topp")[0].tolist() == [True] + [False] * 7
  assert _select([row], 0.25, 0.5, "topk")[0].sum() == 2
  assert _select([row], 0.25, 0.5, "hybrid")[0].sum() == 2


def test_topp_includes_the_block_that_crosses_p():
  row = np.array([0.5, 0.3, 0.2])
  assert _select([row], 0.0, 0.5, "topp")[0].tolist() == [True, False, False]  # 0.5 already reaches 0.5
  assert _select([row], 0.0, 0.51, "topp")[0].tolist() == [True, True, False]
  assert _select([row], 0.0, 1.0, "topp")[0].tolist() == [True, True, True]


def test_ties_go_to_lower_index():
  row = np.full(8, 1 / 8)
  assert _select([row], 0.25, 0.0, "topk")[0].tolist() == [True, True] + [False] * 6
  assert _select([row], 0.0, 0.3, "topp")[0].tolist() == [True, True, True] + [False] * 5
  row = np.array([0.1, 0.3, 0.1, 0.3, 0.2])
  assert _select([row], 0.6, 0.0, "topk")[0].tolist() == [False, True, False, True, True]
  assert _select([row], 0.8, 0.0, "topk")[0].tolist() == [True, True, False, True, True]


def test_every_row_keeps_at_least_one_block():
  rows = np.random.default_rng(0).dirichlet(np.ones(16), size=4)
  for mode in mask_lib.MODES:
    kept = _select(rows, 0.0, 0.0, mode)
    assert (kept.sum(-1) == 1).all()
    assert (np.argmax(kept, -1) == np.argmax(rows, -1)).all()


def test_counts_of_each_mode():
  rows = np.random.default_rng(1).dirichlet(np.full(40, 0.3), size=16)
  for mode in mask_lib.MODES:
    kept = _select(rows, 0.1, 0.6, mode)
    expected = np.stack([_brute_force(r, 0.1, 0.6, mode) for r in rows])
    np.testing.assert_array_equal(kept, expected)
  assert (_select(rows, 0.1, 0.0, "topk").sum(-1) == 4).all()
  assert (_select(rows, 0.1, 0.6, "hybrid").sum(-1) >= 4).all()
  assert (_select(rows, 1.0, 0.0, "topk")).all() and (_select(rows, 0.0, 1.0, "topp")).all()


def test_per_head_values():
  rows = np.random.default_rng(2).dirichlet(np.ones(20), size=(1, 3, 4))
  topk = np.array([0.05, 0.5, 1.0])
  topp = np.array([0.9, 0.0, 0.0])
  kept = np.asarray(mask_lib.select_blocks_from_probs(jnp.asarray(rows, jnp.float32), topk, topp, "hybrid"))
  for h in range(3):
    for i in range(4):
      np.testing.assert_array_equal(kept[0, h, i], _brute_force(rows[0, h, i], topk[h], topp[h], "hybrid"))
  assert (kept[0, 1].sum(-1) == 10).all() and kept[0, 2].all()


@settings(max_examples=30, deadline=None)
@given(
  rows=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 33)), elements=st.floats(0.0, 10.0)),
  topk=st.floats(0.0, 1.0),
  topp=st.floats(0.0, 1.0),
  mode=st.sampled_from(mask_lib.MODES),
  quantize=st.booleans(),
)
def test_matches_brute_force(rows, topk, topp, mode, quantize):
  rows = rows + 1e-3
  if quantize:
    rows = np.round(rows) + 1.0  # many exact ties
  rows = (rows / rows.sum(-1, keepdims=True)).astype(np.float32)
  kept = _select(rows, topk, topp, mode)
  # The brute force sums in float32 in the same order as the cumulative sum, so p boundaries agree.
  for r, row in enumerate(rows):
    np.testing.assert_array_equal(kept[r], _brute_force_f32(row, topk, topp, mode))


def _brute_force_f32(row, topk, topp, mode):
  sorted_row = np.sort(row)[::-1]
  mass_before = np.cumsum(sorted_row, dtype=np.float32) - sorted_row
  n = len(row)
  p_count = n if topp >= 1.0 else int(np.sum(mass_before < np.float32(topp)))
  k_count = math.ceil(np.float32(topk) * np.float32(n) - np.float32(1e-3))
  count = {"hybrid": max(k_count, p_count), "topk": k_count, "topp": p_count}[mode]
  order = sorted(range(n), key=lambda j: (-row[j], j))
  kept = set(order[: max(1, min(n, count))])
  return np.array([j in kept for j in range(n)])


def test_block_mask_end_to_end_matches_numpy():
  rng = np.random.default_rng(3)
  q = rng.standard_normal((2, 150, 2, 16)).astype(np.float32)
  k = rng.standard_normal((2, 90, 2, 16)).astype(np.float32)
  k[:, :16] += 3 * q[:, :1]  # a sink-like block so rows are skewed
  mask = np.asarray(
    attention.block_mask(jnp.asarray(q), jnp.asarray(k), topk=0.2, topp=0.5, block_q=32, block_kv=16, scale=0.5)
  )
  assert mask.shape == (2, 2, 5, 6)
  for b in range(2):
    for h in range(2):
      q_means = np.stack([q[b, i : i + 32, h].mean(0) for i in range(0, 150, 32)])
      k_means = np.stack([k[b, j : j + 16, h].mean(0) for j in range(0, 90, 16)])
      logits = 0.5 * q_means @ k_means.T
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      for i in range(5):
        np.testing.assert_array_equal(mask[b, h, i], _brute_force(probs[i], 0.2, 0.5, "hybrid"))


INDEX_TABLES = {
  "xla": mask_lib.index_tables,
  "pallas": functools.partial(index_table_kernel.index_tables, interpret=True),
}


@pytest.mark.parametrize("implementation", INDEX_TABLES)
@pytest.mark.parametrize("density", [0.3, 0.0, 1.0])
def test_index_tables(implementation, density):
  # 7 x 11 blocks: neither side a power of two (the kernel pads rows to 4 and columns to 16).
  mask = jax.random.bernoulli(jax.random.PRNGKey(4), density, (2, 3, 7, 11))
  (kv_index, kv_count), (q_index, q_count) = jax.tree.map(np.asarray, INDEX_TABLES[implementation](mask))
  mask = np.asarray(mask)
  for b in range(2):
    for h in range(3):
      for i in range(7):
        kept = np.flatnonzero(mask[b, h, i])
        assert kv_count[b, h, i] == len(kept)
        np.testing.assert_array_equal(kv_index[b, h, i, : len(kept)], kept)
        assert np.all(kv_index[b, h, i, len(kept) :] == 0)  # padding is a valid id
      for j in range(11):
        kept = np.flatnonzero(mask[b, h, :, j])
        assert q_count[b, h, j] == len(kept)
        np.testing.assert_array_equal(q_index[b, h, j, : len(kept)], kept)
        assert np.all(q_index[b, h, j, len(kept) :] == 0)


@pytest.mark.parametrize("mode", mask_lib.MODES)
def test_selection_kernel_matches_sorting_selection(mode):
  rng = np.random.default_rng(5)
  logits = rng.standard_normal((2, 3, 9, 40)) * np.array([0.2, 1.0, 4.0])[None, :, None, None]
  logits[1] = np.round(logits[1])  # many exact ties
  logits = jnp.asarray(logits, jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  for topk, topp in [(0.1, 0.3), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), ([0.05, 0.2, 0.4], [0.9, 0.5, 0.1])]:
    np.testing.assert_array_equal(
      mask_select.select_blocks_from_logits(logits, np.asarray(topk), np.asarray(topp), mode, interpret=True),
      mask_lib.select_blocks_from_probs(probs, np.asarray(topk), np.asarray(topp), mode),
    )


@pytest.mark.parametrize("rows_per_program, num_warps", [(1, 1), (4, 4), (16, 2)])
def test_selection_kernel_launch_shapes_agree(rows_per_program, num_warps):
  # 9 rows: neither 4 nor 16 divides them, so the last program of each has rows past the end.
  logits = jax.random.normal(jax.random.PRNGKey(6), (1, 2, 9, 40)) * 2.0
  probs = jax.nn.softmax(logits, axis=-1)
  ours = mask_select.select_blocks_from_logits(
    logits, 0.1, 0.6, "hybrid", interpret=True, rows_per_program=rows_per_program, num_warps=num_warps
  )
  np.testing.assert_array_equal(ours, mask_lib.select_blocks_from_probs(probs, 0.1, 0.6, "hybrid"))


@pytest.mark.parametrize("mode", mask_lib.MODES)
def test_selection_kernel_long_rows(mode):
  # Rows of 512 (the 32,760-token case) of three kinds: near-uniform (a ~20-bit bisection bracket),
  # skewed (~30 bits) and with many exact ties. The bisection stops once its bracket holds one row value.
  rng = np.random.default_rng(7)
  logits = rng.standard_normal((1, 3, 6, 512)) * np.array([0.01, 3.0, 1.0])[None, :, None, None]
  logits[0, 2] = np.round(logits[0, 2] * 2)
  logits = jnp.asarray(logits, jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  for topk, topp in [(0.03, 0.2), (0.3, 0.9), ([0.0, 0.01, 0.5], [0.05, 0.0, 1.0])]:
    np.testing.assert_array_equal(
      mask_select.select_blocks_from_logits(logits, np.asarray(topk), np.asarray(topp), mode, interpret=True),
      mask_lib.select_blocks_from_probs(probs, np.asarray(topk), np.asarray(topp), mode),
    )


@settings(max_examples=20, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 0.3, 5.0]), ties=st.booleans(), topk=st.floats(0.0, 1.0)
)
def test_selection_kernel_topk_matches_brute_force(seed, scale, ties, topk):
  # Top-k alone sums no masses, so the kernel must agree exactly with the rule, ties included.
  logits = np.random.default_rng(seed).standard_normal((3, 200)) * scale
  if ties:
    logits = np.round(logits * 4 / scale)
  logits = jnp.asarray(logits, jnp.float32)
  kept = np.asarray(mask_select.select_blocks_from_logits(logits[None, None], topk, 0.0, "topk", interpret=True))[0, 0]
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  for r in range(3):
    np.testing.assert_array_equal(kept[r], _brute_force_f32(probs[r], topk, 0.0, "topk"))


def _brute_force_mask(q, k, topk, topp, *, block_q, block_kv, scale, q_lengths, kv_lengths, is_causal):
  """The mask rule for grouped heads, lengths and causal masking, written out block by block in numpy."""
  batch, q_len, heads, _ = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  n_q, n_kv = -(-q_len // block_q), -(-kv_len // block_kv)
  mask = np.zeros((batch, heads, n_q, n_kv), bool)
  for b in range(batch):
    q_valid, kv_valid = min(q_lengths[b], q_len), min(kv_lengths[b], kv_len)
    k_means = [k[b, j * block_kv : min((j + 1) * block_kv, kv_valid)].mean(0) for j in range(-(-kv_valid // block_kv))]
    for i in range(n_q):
      if i * block_q >= q_valid:
        continue  # no valid query: nothing kept
      last_query = min((i + 1) * block_q, q_valid) - 1
      allowed = [j for j in range(n_kv) if j * block_kv < kv_valid and (not is_causal or j * block_kv <= last_query)]
      q_mean = q[b, i * block_q : min((i + 1) * block_q, q_valid)].mean(0)
      for n in range(heads):
        g = n // (heads // kv_heads)
        logits = np.array([scale * q_mean[n] @ k_means[j][g] for j in allowed])
        probs = np.exp(logits - logits.max())
        kept = _brute_force(probs / probs.sum(), topk, topp, "hybrid")
        mask[b, n, i, [j for j, keep in zip(allowed, kept) if keep]] = True
        if is_causal:
          mask[b, n, i, min(i * block_q, kv_valid - 1) // block_kv] = True  # the anchor block
  return mask


@pytest.mark.parametrize("is_causal", [False, True])
def test_block_mask_with_grouped_heads_lengths_and_causal(is_causal):
  rng = np.random.default_rng(8)
  q = rng.standard_normal((2, 150, 4, 16)).astype(np.float32)
  k = rng.standard_normal((2, 130, 2, 16)).astype(np.float32)
  k[:, :16] += 2 * q[:, :1, :2]  # skewed rows
  q_lengths, kv_lengths = np.array([150, 70], np.int32), np.array([130, 45], np.int32)
  kw = dict(topk=0.2, topp=0.5, block_q=32, block_kv=16, scale=0.5, is_causal=is_causal)
  lengths = dict(query_seq_lengths=jnp.asarray(q_lengths), key_value_seq_lengths=jnp.asarray(kv_lengths))
  ours = np.asarray(attention.block_mask(jnp.asarray(q), jnp.asarray(k), implementation="xla", **kw, **lengths))
  expected = _brute_force_mask(
    q, k, 0.2, 0.5, block_q=32, block_kv=16, scale=0.5, q_lengths=q_lengths, kv_lengths=kv_lengths, is_causal=is_causal
  )
  np.testing.assert_array_equal(ours, expected)
  kernels = np.asarray(attention.block_mask(jnp.asarray(q), jnp.asarray(k), interpret=True, **kw, **lengths))
  np.testing.assert_array_equal(kernels, ours)
  # What the rule promises, directly: no block past the keys or wholly above the diagonal, nothing for
  # q blocks with no valid query, and at least one block for every other.
  assert not ours[1, :, :, -(-45 // 16) :].any() and not ours[1, :, -(-70 // 32) :].any()
  assert ours[0].any(-1).all() and ours[1, :, : -(-70 // 32)].any(-1).all()
  if is_causal:
    above = np.arange(ours.shape[-1])[None, :] * 16 > np.minimum(np.arange(ours.shape[-2])[:, None] * 32 + 31, 149)
    assert not ours[0][:, above].any()


@pytest.mark.parametrize("implementation", ["xla", "triton"])
def test_selection_ranks_only_allowed_blocks(implementation):
  # Row i may attend its first limit[i] blocks: Top-k counts a fraction of those, Top-p their mass.
  logits = jax.random.normal(jax.random.PRNGKey(9), (1, 2, 5, 24)) * 2.0
  limit = jnp.array([[24, 10, 3, 1, 0]], jnp.int32)
  anchor = jnp.array([[5, 9, 0, 0, -1]], jnp.int32)
  allowed = np.arange(24)[None, :] < np.asarray(limit)[0][:, None]
  probs = mask_lib.masked_softmax(logits, jnp.asarray(allowed)[None, None])
  if implementation == "xla":
    kept = mask_lib.select_blocks_from_probs(probs, 0.25, 0.3, "hybrid", kv_block_limit=limit, anchor=anchor)
  else:
    kept = mask_select.select_blocks_from_logits(
      logits, 0.25, 0.3, "hybrid", kv_block_limit=limit, anchor=anchor, interpret=True
    )
  kept = np.asarray(kept)
  assert not kept[..., ~allowed].any()
  assert not kept[..., 4, :].any()  # a row that may attend nothing keeps nothing
  for h in range(2):
    for i, n in enumerate([24, 10, 3, 1]):
      row = np.asarray(probs)[0, h, i, :n]
      expected = _brute_force(row, 0.25, 0.3, "hybrid")
      expected[np.asarray(anchor)[0, i]] = True
      np.testing.assert_array_equal(kept[0, h, i, :n], expected)
