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

from pallas_kernels.block_sparse_attention import mosaic as mosaic_block_sparse
from pallas_kernels.block_sparse_attention.reference import masked_attention_reference, token_mask
from sparge_jax import mask as mask_lib

# (batch, q_len, kv_len, heads, head_dim, block_q, dtype, tuning): lengths that are not block multiples,
# one or two compute warpgroups, an odd number of kv blocks (dK/dV CTAs hold two), head dims 64 and 128,
# odd and even kv counts (two kv blocks per forward step); the defaults (one work item per CTA), and
# persistent CTAs running 2 or 3 work items each, so Q slots, row slots, K/V slots and rings carry over.
CASES = [
  (1, 300, 250, 2, 64, 128, jnp.bfloat16, {}),
  # head_dim 128: delta formed from two O column parts per row tile; dK/dV with one K/V slot per pair
  # (6 items on 4 lanes)
  (2, 130, 180, 1, 128, 128, jnp.float16, dict(num_ctas=2)),
  (2, 264, 200, 2, 128, 128, jnp.bfloat16, dict(num_ctas=3)),
  # one compute warpgroup per CTA
  (1, 200, 128, 2, 64, 64, jnp.bfloat16, dict(num_ctas=3)),
  # head_dim 64: the deeper pipelines that fit in its shared memory (benchmarks.mosaic_smoke sweeps them)
  (1, 264, 320, 1, 64, 128, jnp.bfloat16, dict(num_ctas=2, forward_stages=4, dq_stages=4, dkv_stages=3)),
  # dQ with one Q/dO row slot (two do not fit beside 3 K/V stages at head_dim 128); dK/dV lanes dealt by
  # balanced_schedule at head_dim 64 (the default only at 128)
  (1, 264, 300, 2, 128, 128, jnp.bfloat16, dict(dq_stages=3, num_ctas=2)),
  (1, 296, 328, 2, 64, 128, jnp.bfloat16, dict(dkv_balanced=True)),
]
# Compiled, the TMA copies need lengths in whole 8-row tiles.
COMPILED_CASES = [case for case in CASES if case[1] % 8 == 0 and case[2] % 8 == 0]
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
@pytest.mark.parametrize("case", COMPILED_CASES, ids=str)
def test_compiled_kernels_match_reference(case):
  """The same cases compiled: register operands, which the interpreter stages through shared memory,
  run only here."""
  _check_case(case, interpret=False)


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
    dkv_balanced=True,
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
    dict(dkv_balanced=head_dim != 128),
  ):
    assert export_backward(**tuning).count("mosaic_gpu") >= 2, tuning


@pytest.mark.parametrize(
  "tuning,message",
  [
    (dict(kv_blocks_per_step=2), "kv_blocks_per_step"),  # not a setting (any more)
    (dict(forward_stages=3), "forward_stages"),  # 288 KB of SMEM at head_dim 128
    (dict(forward_stages=0), "forward_stages"),
    (dict(num_ctas=0), "num_ctas"),
    (dict(dkv_balanced="yes"), "dkv_balanced"),
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
