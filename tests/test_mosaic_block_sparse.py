"""The Mosaic GPU block-sparse kernels on CPU, in the Mosaic GPU interpreter, against the float32 reference.

The interpreter simulates the warpgroups, shared memory, barriers and TMA (zero-filled out-of-range
loads, dropped out-of-range stores) of the compiled kernels, and can detect races between them.
"""

from __future__ import annotations

import attention_cases as cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import PartitionSpec as P

from pallas_kernels.block_sparse_attention import mosaic as mosaic_block_sparse
from pallas_kernels.block_sparse_attention.reference import masked_attention_reference, token_mask
from pallas_kernels.block_sparse_attention.schedule import balanced_schedule
from sparge_jax import attention, backends
from sparge_jax import mask as mask_lib

# (batch, q_len, kv_len, heads, head_dim, block_q, dtype, tuning): lengths that are not block multiples,
# one or two compute warpgroups, an odd number of kv blocks (dK/dV CTAs hold two), head dims 64 and 128,
# odd and even kv counts (two kv blocks per forward step); the defaults (one work item per CTA), and
# persistent CTAs running 2 or 3 work items each, so Q slots, row slots, K/V slots and rings carry over.
CASES = [
  (1, 300, 250, 2, 64, 128, jnp.bfloat16, {}),
  # head_dim 128: delta formed from two O column parts per row tile; dK/dV with one K/V slot per pair
  # (10 items on 6 lanes); fp16 at head_dim 128 on 2 CTAs is in CONTRACT_CASES
  (2, 264, 200, 2, 128, 128, jnp.bfloat16, dict(num_ctas=3)),
  # one compute warpgroup per CTA
  (1, 200, 128, 2, 64, 64, jnp.bfloat16, dict(num_ctas=3)),
  # head_dim 64: the deeper pipelines that fit in its shared memory (benchmarks.mosaic_smoke sweeps them)
  (1, 264, 320, 1, 64, 128, jnp.bfloat16, dict(num_ctas=2, forward_stages=4, dq_stages=4, dkv_stages=3)),
  # dQ with one Q/dO row slot (two do not fit beside 3 K/V stages at head_dim 128); dK/dV lanes dealt by
  # balanced_schedule at head_dim 64 (the default only at 128): test_persistent_backward_...
  (1, 264, 300, 2, 128, 128, jnp.bfloat16, dict(dq_stages=3, num_ctas=2)),
]
# The contract's semantics: (batch, q_len, kv_len, heads, kv_heads, head_dim, block_q, dtype, kv_seq_lengths,
# is_causal, with d_lse, tuning). GQA (4 query heads over 2 kv heads) with a length per batch (one ending
# on a block edge, so a block past it is not listed, one inside a block) and the lse cotangent, lengths
# that are not multiples of 8 (zero padded to them); MQA, causal with q_len > kv_len (the q blocks past
# kv_len keep the last kv block), head_dim 128 in fp16 on 2 CTAs; causal with q_len < kv_len, lengths and
# GQA with one compute warpgroup on 3 CTAs.
CONTRACT_CASES = [
  (2, 139, 250, 4, 2, 64, 128, jnp.bfloat16, (192, 131), False, True, {}),
  (2, 264, 200, 2, 1, 128, 128, jnp.float16, None, True, True, dict(num_ctas=2)),
  (1, 136, 264, 4, 2, 64, 64, jnp.bfloat16, (120,), True, False, dict(num_ctas=3)),
]
# The same semantics compiled at real sizes (GPU only).
COMPILED_CONTRACT_CASES = CONTRACT_CASES + [
  (2, 4100, 3000, 8, 2, 128, 128, jnp.bfloat16, (3000, 1777), True, True, {}),
  (1, 2056, 4104, 4, 1, 64, 64, jnp.bfloat16, None, True, False, {}),
  (1, 4104, 4104, 8, 2, 128, 128, jnp.float16, (2900,), False, True, {}),
  (1, 4100, 3001, 4, 4, 64, 128, jnp.bfloat16, (2999,), True, True, {}),
]
TOL = {jnp.bfloat16: 1e-2, jnp.float16: 3e-3}
BLOCK_KV = 64


def _problem(seed, batch, q_len, kv_len, heads, head_dim, block_q, dtype, density=0.4):
  q, k, v, d_out = cases.random_qkv(seed, batch, q_len, kv_len, heads, head_dim, dtype)
  n_q, n_kv = -(-q_len // block_q), -(-kv_len // BLOCK_KV)
  mask = cases.random_mask(seed, batch, heads, n_q, n_kv, density)
  mask = mask.at[0, 0, 1].set(False)  # a q block with no kept kv block
  return q, k, v, d_out, mask


def _reference_lse(q, k, mask, block_q, scale):
  q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q32, k32, precision=jax.lax.Precision.HIGHEST) * scale
  allowed = token_mask(mask, q.shape[1], k.shape[1], block_q=block_q, block_kv=BLOCK_KV)
  return jax.nn.logsumexp(jnp.where(allowed, scores, -jnp.inf), axis=-1)


def _forward(q, k, v, mask, block_q, interpret=True, **tuning):
  (kv_index, kv_count), _ = mask_lib.index_tables(mask)
  return mosaic_block_sparse.forward(
    q,
    k,
    v,
    kv_index,
    kv_count,
    block_q=block_q,
    block_kv=BLOCK_KV,
    scale=q.shape[-1] ** -0.5,
    interpret=interpret,
    **tuning,
  )


def _backward(q, k, v, out, lse, d_out, mask, block_q, interpret=True, **tuning):
  (kv_index, kv_count), (q_index, q_count) = mask_lib.index_tables(mask)
  return mosaic_block_sparse.backward(
    q,
    k,
    v,
    out,
    lse,
    d_out,
    None,
    kv_index,
    kv_count,
    q_index,
    q_count,
    block_q=block_q,
    block_kv=BLOCK_KV,
    scale=q.shape[-1] ** -0.5,
    interpret=interpret,
    **tuning,
  )


def _check_forward(out, lse, q, k, v, mask, block_q):
  """out and lse against the float32 reference; q block 1 of (batch 0, head 0) is empty."""
  f32 = lambda x: x.astype(jnp.float32)
  ref_out = masked_attention_reference(f32(q), f32(k), f32(v), mask, block_q=block_q, block_kv=BLOCK_KV)
  ref_lse = _reference_lse(q, k, mask, block_q, q.shape[-1] ** -0.5)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == q.shape[:1] + q.shape[2:3] + q.shape[1:2] and lse.dtype == jnp.float32
  assert cases.rel_err(out, ref_out) <= TOL[q.dtype.type]
  # The empty q block: zeros and lse = -inf; every other row finite and close.
  empty_rows = slice(block_q, 2 * block_q)
  np.testing.assert_array_equal(np.asarray(out[0, empty_rows, 0], np.float32), 0.0)
  assert np.all(np.isneginf(lse[0, 0, empty_rows]))
  finite = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=2e-2)


def _check_backward(grads, q, k, v, d_out, mask, block_q):
  """dq, dk, dv against the float32 reference's vjp: shapes, dtypes, finite, close."""
  f32 = lambda x: x.astype(jnp.float32)
  reference = lambda q, k, v: masked_attention_reference(q, k, v, mask, block_q=block_q, block_kv=BLOCK_KV)
  _, pullback = jax.vjp(reference, f32(q), f32(k), f32(v))
  for name, grad, ref_grad, x in zip(("dq", "dk", "dv"), grads, pullback(f32(d_out)), (q, k, v)):
    assert grad.shape == x.shape and grad.dtype == x.dtype, name
    assert np.all(np.isfinite(np.asarray(grad, np.float32))), name
    assert cases.rel_err(grad, ref_grad) <= TOL[q.dtype.type], (name, cases.rel_err(grad, ref_grad))


def _check_case(case, interpret):
  *shape, block_q, dtype, tuning = case
  q, k, v, d_out, mask = _problem(len(shape) + shape[1], *shape, block_q, dtype)
  out, lse = _forward(q, k, v, mask, block_q, interpret=interpret, **tuning)
  _check_forward(out, lse, q, k, v, mask, block_q)
  grads = _backward(q, k, v, out, lse, d_out, mask, block_q, interpret=interpret, **tuning)
  _check_backward(grads, q, k, v, d_out, mask, block_q)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_backward_match_reference(case):
  _check_case(case, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_compiled_kernels_match_reference(case):
  """The same cases compiled: register operands, which the interpreter stages through shared memory,
  run only here."""
  _check_case(case, interpret=False)


def _contract_mask(seed, batch, heads, q_len, kv_len, block_q, kv_seq_lengths, is_causal, density=0.4):
  """A random block mask as the API builds them: no block wholly past a batch's length or wholly above
  the diagonal; every q block keeps the kv block of its first query's position (clipped to the valid keys),
  but q block 1 of (batch 0, head 0), which keeps none."""
  n_q, n_kv = -(-q_len // block_q), -(-kv_len // BLOCK_KV)
  mask = cases.random_mask(seed, batch, heads, n_q, n_kv, density)
  q_first = jnp.arange(n_q) * block_q
  kv_first = jnp.arange(n_kv) * BLOCK_KV
  lengths = jnp.full((batch,), kv_len) if kv_seq_lengths is None else jnp.minimum(jnp.asarray(kv_seq_lengths), kv_len)
  allowed = kv_first[None, None, None, :] < lengths[:, None, None, None]
  if is_causal:
    q_last = jnp.minimum(q_first + block_q, q_len) - 1
    allowed = allowed & (kv_first[None, :] <= q_last[:, None])[None, None]
  own = jnp.minimum(q_first[None, :], lengths[:, None] - 1) // BLOCK_KV  # [batch, n_q]
  keep = jax.nn.one_hot(own, n_kv, dtype=bool)[:, None]
  return ((mask & allowed) | keep).at[0, 0, 1].set(False)


def _contract_tables(mask, kv_heads):
  """The forward/dQ table per query head and the dK/dV table per kv head (entries member · n_q + q block)."""
  batch, heads, n_q, n_kv = mask.shape
  group = heads // kv_heads
  by_kv_head = mask.reshape(batch, kv_heads, group, n_q, n_kv).transpose(0, 1, 4, 2, 3)
  return mask_lib.index_table(mask), mask_lib.index_table(by_kv_head.reshape(batch, kv_heads, n_kv, group * n_q))


def _contract_reference(q, k, v, mask, *, block_q, kv_seq_lengths, is_causal):
  """float32 (out, lse) of attention over the kept blocks: query head n reads kv head n // (heads //
  kv_heads); keys past the batch's length, and with is_causal keys after their query, take no part."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  (_, q_len, heads, _), (kv_len, kv_heads) = q.shape, k.shape[1:3]
  k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
  allowed = token_mask(mask, q_len, kv_len, block_q=block_q, block_kv=BLOCK_KV)
  if kv_seq_lengths is not None:
    allowed = allowed & (jnp.arange(kv_len) < jnp.asarray(kv_seq_lengths)[:, None, None, None])
  if is_causal:
    allowed = allowed & (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST) * q.shape[-1] ** -0.5
  row_max = jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.where(allowed, jnp.exp(scores - row_max), 0.0)
  total = weights.sum(-1)
  attends = total > 0
  safe_total = jnp.where(attends, total, 1.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights / safe_total[..., None], v, precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(attends, jnp.log(safe_total) + row_max[..., 0], -jnp.inf)
  return out, lse


def _check_contract(q, k, v, d_out, d_lse, mask, *, kv_seq_lengths, is_causal, block_q, interpret, **tuning):
  """forward and backward against `_contract_reference`'s (out, lse) and vjp; returns (out, lse, ref_lse)."""
  lengths = None if kv_seq_lengths is None else jnp.asarray(kv_seq_lengths, jnp.int32)
  forward_table, backward_table = _contract_tables(mask, k.shape[2])
  semantics = dict(kv_seq_lengths=lengths, is_causal=is_causal, block_q=block_q, block_kv=BLOCK_KV)
  settings = dict(semantics, **tuning, scale=q.shape[-1] ** -0.5, interpret=interpret)
  out, lse = mosaic_block_sparse.forward(q, k, v, *forward_table, **settings)

  reference = lambda q, k, v: _contract_reference(
    q, k, v, mask, block_q=block_q, kv_seq_lengths=kv_seq_lengths, is_causal=is_causal
  )
  f32 = lambda x: x.astype(jnp.float32)
  (ref_out, ref_lse), pullback = jax.vjp(reference, f32(q), f32(k), f32(v))
  tol = TOL[q.dtype.type]
  assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == ref_lse.shape and lse.dtype == jnp.float32
  assert cases.rel_err(out, ref_out) <= tol, cases.rel_err(out, ref_out)
  finite = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=2e-2)
  np.testing.assert_array_equal(np.asarray(out, np.float32).transpose(0, 2, 1, 3)[~finite], 0.0)

  grads = mosaic_block_sparse.backward(q, k, v, out, lse, d_out, d_lse, *forward_table, *backward_table, **settings)
  ref_grads = pullback((f32(d_out), jnp.zeros_like(ref_lse) if d_lse is None else d_lse))
  for name, grad, ref_grad, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
    assert grad.shape == x.shape and grad.dtype == x.dtype, name
    assert np.all(np.isfinite(np.asarray(grad, np.float32))), name
    assert cases.rel_err(grad, ref_grad) <= tol, (name, cases.rel_err(grad, ref_grad))
  if kv_seq_lengths is not None:  # keys past a batch's length: zero gradients
    for b, length in enumerate(kv_seq_lengths):
      for grad in grads[1:]:
        np.testing.assert_array_equal(np.asarray(grad[b, length:], np.float32), 0.0)
  if d_lse is not None:  # the lse cotangent matters: without it the gradients are off
    without = pullback((f32(d_out), jnp.zeros_like(ref_lse)))
    assert cases.rel_err(grads[0], without[0]) > 10 * tol
  return out, lse, ref_lse


def _check_contract_case(case, interpret):
  batch, q_len, kv_len, heads, kv_heads, head_dim, block_q, dtype, kv_seq_lengths, is_causal, with_d_lse, tuning = case
  seed = q_len + kv_len + heads
  q, _, _, d_out = cases.random_qkv(seed, batch, q_len, kv_len, heads, head_dim, dtype)
  _, k, v, _ = cases.random_qkv(seed + 1, batch, q_len, kv_len, kv_heads, head_dim, dtype)
  d_lse = jax.random.normal(jax.random.PRNGKey(seed + 2), (batch, heads, q_len)) if with_d_lse else None
  mask = _contract_mask(seed, batch, heads, q_len, kv_len, block_q, kv_seq_lengths, is_causal)
  out, lse, ref_lse = _check_contract(
    q, k, v, d_out, d_lse, mask, kv_seq_lengths=kv_seq_lengths, is_causal=is_causal, block_q=block_q,
    interpret=interpret, **tuning,
  )  # fmt: skip
  # Only q block 1 of (batch 0, head 0), which keeps no block, attends nothing.
  finite = np.isfinite(np.asarray(ref_lse))
  assert not finite[0, 0, block_q : 2 * block_q].any() and finite.sum() == finite.size - min(block_q, q_len - block_q)


@pytest.mark.parametrize("case", CONTRACT_CASES, ids=str)
def test_contract_semantics_match_reference(case):
  """GQA/MQA, kv lengths per batch, causal masking with q_len ≠ kv_len and the lse cotangent: forward
  (out and lse) and gradients against the float32 reference."""
  _check_contract_case(case, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", COMPILED_CONTRACT_CASES, ids=str)
def test_compiled_contract_semantics_match_reference(case):
  _check_contract_case(case, interpret=False)


# Those rows' probabilities are not zero (exp2 of MASKED·scale's rounding error) and may overflow; the
# interpreter's matmul warns about them, the kernel selects their output away.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_rows_whose_listed_keys_are_all_masked_attend_nothing():
  """Causal, q block 1 listing only kv block 3: its rows 128-191 (the first compute warpgroup's) have no
  key at or before them, so they output zeros with lse = -inf and get zero gradients; rows 192-255 attend
  keys 192 to their own."""
  q, k, v, d_out = cases.random_qkv(31, 1, 256, 256, 1, 64, jnp.bfloat16)
  mask = jnp.array([[[[True, True, False, False], [False, False, False, True]]]])
  _, lse, _ = _check_contract(
    q, k, v, d_out, None, mask, kv_seq_lengths=None, is_causal=True, block_q=128, interpret=True
  )
  assert np.all(np.isneginf(lse[0, 0, 128:192])) and np.all(np.isfinite(lse[0, 0, 192:]))


def test_causal_schedules_change_only_which_cta_computes_a_tile():
  """With causal masking the kernels take their items as `balanced_schedule` deals them (forward and dQ by
  the causal geometry, dK/dV by its table's counts). Each output tile is still computed once, by the same
  arithmetic, so out, lse and the gradients equal round-robin's bit for bit; on 2 CTAs (12 q-block items,
  5 kv-block items on 4 lanes) the schedules differ from round-robin."""
  batch, q_len, kv_len, heads, kv_heads, head_dim, block_q = 1, 330, 264, 2, 1, 64, 64
  q, _, _, d_out = cases.random_qkv(51, batch, q_len, kv_len, heads, head_dim, jnp.bfloat16)
  _, k, v, _ = cases.random_qkv(52, batch, q_len, kv_len, kv_heads, head_dim, jnp.bfloat16)
  mask = _contract_mask(53, batch, heads, q_len, kv_len, block_q, None, True, density=0.6)
  forward_table, backward_table = _contract_tables(mask, kv_heads)
  settings = dict(block_q=block_q, block_kv=BLOCK_KV, scale=head_dim**-0.5, is_causal=True, interpret=True, num_ctas=2)

  def run(**tuning):
    out, lse = mosaic_block_sparse.forward(q, k, v, *forward_table, **settings, **tuning)
    grads = mosaic_block_sparse.backward(
      q, k, v, out, lse, d_out, None, *forward_table, *backward_table, **settings, **tuning
    )
    return out, lse, *grads

  for name, scheduled, round_robin in zip(("out", "lse", "dq", "dk", "dv"), run(), run(balanced=False)):
    np.testing.assert_array_equal(np.asarray(scheduled, np.float32), np.asarray(round_robin, np.float32), name)

  def dealt(schedule):
    items, count = (np.asarray(x) for x in schedule)
    return [items[lane, : count[lane]].tolist() for lane in range(len(count))]

  rows = mosaic_block_sparse._causal_schedule(q_len, kv_len, block_q=block_q, block_kv=BLOCK_KV, rows=2, lanes=2)
  assert dealt(rows) != [list(range(0, 12, 2)), list(range(1, 12, 2))]
  columns = balanced_schedule(backward_table[1].reshape(-1), 4)
  assert dealt(columns) != [[0, 4], [1], [2], [3]]


def test_contract_semantics_without_races(capsys):
  """GQA, causal, a kv length and the lse cotangent (a fourth row copy into the delta slot) on persistent
  CTAs with 2 or 3 work items each, under race detection."""
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races  # no public API

  races = plgpu.InterpretGPUParams(detect_races=True)
  _check_contract_case((1, 256, 136, 4, 2, 64, 128, jnp.float16, (100,), True, True, dict(num_ctas=2)), races)
  assert not get_races().races_found
  assert "RACE DETECTED" not in capsys.readouterr().out


def test_long_rows_reuse_the_pipeline_slots_without_races(capsys):
  """Rows with more kept blocks than pipeline stages: every slot is refilled, under race detection."""
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races  # no public API

  block_q = 128
  q, k, v, d_out, _ = _problem(7, 1, 400, 520, 1, 64, block_q, jnp.float16)
  mask = cases.random_mask(7, 1, 1, 4, 9, 0.8)
  (kv_index, kv_count), (q_index, q_count) = mask_lib.index_tables(mask)
  assert int(kv_count.max()) > 2 and int(q_count.max()) * (block_q // 64) > 2
  races = plgpu.InterpretGPUParams(detect_races=True)

  out, lse = _forward(q, k, v, mask, block_q, interpret=races)
  assert not get_races().races_found
  grads = _backward(q, k, v, out, lse, d_out, mask, block_q, interpret=races)
  assert not get_races().races_found  # the dK/dV kernel, the last one run
  # two dQ CTAs: row slots and the K/V ring carry over from item to item
  grads_two_ctas = _backward(q, k, v, out, lse, d_out, mask, block_q, interpret=races, num_ctas=2)
  assert not get_races().races_found
  assert "RACE DETECTED" not in capsys.readouterr().out  # every kernel

  f32 = lambda x: x.astype(jnp.float32)
  ref_out = masked_attention_reference(f32(q), f32(k), f32(v), mask, block_q=block_q, block_kv=BLOCK_KV)
  assert cases.rel_err(out, ref_out) <= TOL[jnp.float16]
  _check_backward(grads, q, k, v, d_out, mask, block_q)
  _check_backward(grads_two_ctas, q, k, v, d_out, mask, block_q)


def test_forward_variants_match_reference_without_races(capsys):
  """Two kv blocks per step (odd counts mask a repeated block, a full row of 7 blocks reads no index
  past the table) on persistent CTAs that run 3 of the 6 work items each, so Q slots and the K/V ring
  carry over from item to item."""
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races  # no public API

  block_q = 128
  q, k, v, _ = cases.random_qkv(11, 1, 300, 440, 2, 64, jnp.bfloat16)  # 3 q blocks, 7 kv blocks
  mask = cases.random_mask(11, 1, 2, 3, 7, 0.6)
  mask = mask.at[0, 0, 1].set(False).at[0, 1, 0].set(True)  # an empty row; a full row, 7 blocks
  (kv_index, kv_count), _ = mask_lib.index_tables(mask)
  counts = set(np.asarray(kv_count).ravel().tolist())
  assert {0, 7} <= counts and any(c % 2 == 0 and c > 2 for c in counts), counts

  out, lse = _forward(
    q,
    k,
    v,
    mask,
    block_q,
    interpret=plgpu.InterpretGPUParams(detect_races=True),
    num_ctas=2,
  )
  assert not get_races().races_found
  assert "RACE DETECTED" not in capsys.readouterr().out
  _check_forward(out, lse, q, k, v, mask, block_q)


def test_persistent_backward_matches_reference_without_races(capsys):
  """Persistent dQ (3 CTAs: 2 of the 6 q-block items each, two compute warpgroups) and dK/dV (3 CTAs,
  6 lanes: 2 or 3 of the 16 kv-block items each, dealt by `balanced_schedule`, two K/V slots), so row
  slots, K/V slots and both rings carry over from item to item; lengths multiples of 8 but not of the blocks, an empty q row (dQ = 0)
  and an empty kv column (dK = dV = 0), odd and even counts, under race detection."""
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races  # no public API

  block_q = 128
  q, k, v, d_out, mask = _problem(5, 1, 328, 456, 2, 64, block_q, jnp.float16)  # 3 q, 8 kv blocks
  mask = mask.at[0, 1, :, 2].set(False)
  (kv_index, kv_count), (q_index, q_count) = mask_lib.index_tables(mask)
  assert int(kv_count.min()) == 0 and int(q_count.min()) == 0
  assert np.any(np.asarray(kv_count) % 2 == 1) and np.any(np.asarray(q_count) % 2 == 1)
  assert int(kv_count.max()) > 2 and int(q_count.max()) * (block_q // 64) > 2  # rings wrap around
  out, lse = _forward(q, k, v, mask, block_q)

  grads = _backward(
    q,
    k,
    v,
    out,
    lse,
    d_out,
    mask,
    block_q,
    interpret=plgpu.InterpretGPUParams(detect_races=True),
    num_ctas=3,
    balanced=True,
  )
  assert not get_races().races_found  # the dK/dV kernel, the last one run
  assert "RACE DETECTED" not in capsys.readouterr().out  # both kernels

  _check_backward(grads, q, k, v, d_out, mask, block_q)
  dq, dk, dv = (np.asarray(g, np.float32) for g in grads)
  np.testing.assert_array_equal(dq[0, block_q : 2 * block_q, 0], 0.0)
  np.testing.assert_array_equal(dk[0, 2 * BLOCK_KV : 3 * BLOCK_KV, 1], 0.0)
  np.testing.assert_array_equal(dv[0, 2 * BLOCK_KV : 3 * BLOCK_KV, 1], 0.0)


@pytest.mark.parametrize("block_q,head_dim", [(128, 128), (64, 64)])
def test_kernels_lower_for_hopper(block_q, head_dim):
  """The Mosaic GPU lowering (layouts, wgmma and TMA shapes) runs without a GPU: export for CUDA."""
  batch, seq_len, heads = 1, 1000, 2
  n_q, n_kv = -(-seq_len // block_q), -(-seq_len // BLOCK_KV)
  x = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), jnp.bfloat16)
  table = lambda rows, cols: jax.ShapeDtypeStruct((batch, heads, rows, cols), jnp.int32)
  count = lambda rows: jax.ShapeDtypeStruct((batch, heads, rows), jnp.int32)
  lse = jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32)
  blocks = dict(block_q=block_q, block_kv=BLOCK_KV, scale=head_dim**-0.5)
  export = lambda f, *args: jax.export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()

  def export_forward(**tuning):
    return export(lambda *a: mosaic_block_sparse.forward(*a, **blocks, **tuning), x, x, x, table(n_q, n_kv), count(n_q))

  def export_backward(**tuning):
    def backward(q, k, v, out, lse, d_out, *tables):
      return mosaic_block_sparse.backward(q, k, v, out, lse, d_out, None, *tables, **blocks, **tuning)

    return export(backward, x, x, x, x, lse, x, table(n_q, n_kv), count(n_q), table(n_kv, n_q), count(n_kv))

  assert export_forward().count("mosaic_gpu") >= 1 and export_backward().count("mosaic_gpu") >= 2
  deep = head_dim == 64  # deeper pipelines fit in shared memory only at head_dim 64
  for tuning in (dict(forward_stages=4 if deep else 1), dict(num_ctas=7)):
    assert export_forward(**tuning).count("mosaic_gpu") >= 1, tuning
  for tuning in (
    dict(dq_stages=3),  # one Q/dO row slot at head_dim 128
    dict(dkv_stages=1),  # two K/V slots per dK/dV pair at head_dim 128
    dict(dq_stages=4 if deep else 2, dkv_stages=3 if deep else 2),
    dict(balanced=head_dim != 128),
  ):
    assert export_backward(**tuning).count("mosaic_gpu") >= 2, tuning


@pytest.mark.parametrize("block_q,head_dim", [(128, 128), (64, 64)])
def test_contract_kernels_lower_for_hopper(block_q, head_dim):
  """GQA, kv lengths, causal masking, the lse cotangent and lengths that are not multiples of 8 (zero
  padded for the TMA) lower for CUDA."""
  batch, q_len, kv_len, heads, kv_heads = 2, 1001, 777, 4, 2
  n_q, n_kv = -(-q_len // block_q), -(-kv_len // BLOCK_KV)
  q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
  forward_table = (
    jax.ShapeDtypeStruct((batch, heads, n_q, n_kv), jnp.int32),
    jax.ShapeDtypeStruct((batch, heads, n_q), jnp.int32),
  )
  backward_table = (
    jax.ShapeDtypeStruct((batch, kv_heads, n_kv, heads // kv_heads * n_q), jnp.int32),
    jax.ShapeDtypeStruct((batch, kv_heads, n_kv), jnp.int32),
  )
  settings = dict(block_q=block_q, block_kv=BLOCK_KV, scale=head_dim**-0.5, is_causal=True)
  export = lambda f, *args: jax.export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()

  def forward(q, k, v, index, count, lengths):
    return mosaic_block_sparse.forward(q, k, v, index, count, kv_seq_lengths=lengths, **settings)

  def backward(q, k, v, out, lse, d_out, d_lse, *tables_and_lengths):
    *tables, lengths = tables_and_lengths
    return mosaic_block_sparse.backward(q, k, v, out, lse, d_out, d_lse, *tables, kv_seq_lengths=lengths, **settings)

  assert export(forward, q, kv, kv, *forward_table, lengths).count("mosaic_gpu") >= 1
  assert (
    export(backward, q, kv, kv, q, rows, q, rows, *forward_table, *backward_table, lengths).count("mosaic_gpu") >= 2
  )


@pytest.mark.parametrize(
  "tuning,message",
  [
    (dict(kv_blocks_per_step=2), "kv_blocks_per_step"),  # not a setting (any more)
    (dict(forward_stages=3), "forward_stages"),  # 288 KB of SMEM at head_dim 128
    (dict(forward_stages=0), "forward_stages"),
    (dict(num_ctas=0), "num_ctas"),
    (dict(balanced="yes"), "balanced"),
  ],
)
def test_rejects_forward_tuning_that_does_not_exist(tuning, message):
  q, k, v, _ = cases.random_qkv(0, 1, 128, 128, 1, 128, jnp.bfloat16)
  with pytest.raises(ValueError, match=message):
    _forward(q, k, v, jnp.ones((1, 1, 1, 2), bool), 128, **tuning)


@pytest.mark.parametrize(
  "tuning,message",
  [
    (dict(dq_persistent=True), "dq_persistent"),
    (dict(num_ctas=-1), "num_ctas"),
    (dict(dkv_stages=3), "dkv_stages"),  # 259 KB of SMEM at head_dim 128
    (dict(dq_stages=5), "dq_stages"),  # even one row slot: 228 KB
  ],
)
def test_rejects_backward_tuning_that_does_not_exist(tuning, message):
  q, k, v, d_out = cases.random_qkv(0, 1, 128, 128, 1, 128, jnp.bfloat16)
  lse = jnp.zeros((1, 1, 128), jnp.float32)
  with pytest.raises(ValueError, match=message):
    _backward(q, k, v, q, lse, d_out, jnp.ones((1, 1, 1, 2), bool), 128, **tuning)


@pytest.mark.parametrize("head_dim,block_q", [(128, 128), (64, 64)])
def test_api_gradients_lower_for_hopper_under_shard_map(head_dim, block_q, monkeypatch):
  """Inside `jax.shard_map` at its default check_vma=True, the API's custom_vjp backward must return dq, dk
  and dv varying over the mesh axes as q, k and v do: lowered for an H200 on CPU through the API (the mask
  and index-table kernels, the three Mosaic kernels; at head_dim 128 also the balanced dK/dV schedule),
  with GQA, causal masking, kv lengths and the lse cotangent. The Pallas interpreter cannot run the Triton
  index-table kernel under check_vma, so this is lowered, not run."""
  h200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), abstract_device=h200)
  monkeypatch.setattr(backends, "compute_capability", lambda: "9.0")
  batch, q_len, kv_len, heads, kv_heads = 2, 300, 264, 4, 2
  sharded = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=jax.NamedSharding(mesh, P("data")))
  q = sharded((batch, q_len, heads, head_dim), jnp.bfloat16)
  kv = sharded((batch, kv_len, kv_heads, head_dim), jnp.bfloat16)
  lengths = sharded((batch,), jnp.int32)

  def local(q, k, v, lengths):
    out, lse = attention.dot_product_attention(
      q,
      k,
      v,
      is_causal=True,
      key_value_seq_lengths=lengths,
      topk=0.5,
      block_q=block_q,
      block_kv=BLOCK_KV,
      implementation="mosaic",
      return_residual=True,
    )
    return (jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.maximum(lse.astype(jnp.float32), 0.0)))[None]

  def loss(q, k, v, lengths):
    return jnp.sum(jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=P("data"))(q, k, v, lengths))

  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, kv, kv, lengths).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  for kernel in ("mosaic_block_sparse_forward", "mosaic_block_sparse_dq", "mosaic_block_sparse_dkv"):
    assert kernel in text, kernel
