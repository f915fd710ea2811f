"""Block-sparse flash attention as Pallas Triton kernels: forward, dQ, and dK/dV.

Every kernel program owns one tile (a q block for forward and dQ, a kv block for dK/dV) and loops only
over the blocks listed for it in a compact index table, so skipped blocks cost nothing, and no two
programs write the same output (no atomics). Softmax runs in base 2 in float32; the saved `lse` is the
natural-log log-sum-exp [batch, heads, q_len], the convention of `sparge_jax.xla_block_sparse`, which is
the plain-JAX statement of the same algorithm.

Sequence lengths need not be multiples of the blocks: out-of-range rows load as zeros, and out-of-range
keys get a large finite negative score in the forward and dQ (never -inf arithmetic, which can make NaN);
dK/dV needs no key mask, since its rows past kv_len are never stored.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)
_MASKED = -1e30


def _dot(a, b, trans_b=False):
  """a @ b (or a @ bᵀ) with float32 accumulation; full precision for float32 operands."""
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _compiler_params(num_warps, num_stages):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _rows(block_index, block, length):
  """Token positions of a block and which of them are real."""
  pos = block_index * block + jnp.arange(block)
  return pos, pos < length


def _mask_partial_block(scores, kv_block, kv_valid, *, block_kv, kv_len):
  """scores [rows, block_kv] of kv block `kv_block` -> keys past kv_len at a large finite negative.

  Only the last kv block can be partial, so only it pays for the select (a branch on the others).
  """
  if kv_len % block_kv == 0:
    return scores
  return lax.cond(
    kv_block == kv_len // block_kv, lambda s: jnp.where(kv_valid[None, :], s, _MASKED), lambda s: s, scores
  )


# ----------------------------------------------------------------------------------------- forward


def _forward_kernel(
  kv_index_ref, kv_count_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, *, scale, block_q, block_kv, q_len, kv_len
):
  q_block = pl.program_id(0)
  _, q_valid = _rows(q_block, block_q, q_len)
  q = pltriton.load(q_ref, mask=q_valid[:, None], other=0.0)
  score_scale = scale * LOG2E

  def body(c, carry):
    acc, row_max, row_sum = carry
    kv_block = kv_index_ref[c]
    start = kv_block * block_kv
    _, kv_valid = _rows(kv_block, block_kv, kv_len)
    k = pltriton.load(k_ref.at[pl.ds(start, block_kv)], mask=kv_valid[:, None], other=0.0)
    # The max is of unscaled scores, so the scale folds into exp2's argument (one multiply-add).
    scores = _mask_partial_block(_dot(q, k, trans_b=True), kv_block, kv_valid, block_kv=block_kv, kv_len=kv_len)
    new_max = jnp.maximum(row_max, scores.max(axis=1))
    scaled_max = new_max * score_scale
    correction = jnp.exp2(row_max * score_scale - scaled_max)
    probs = jnp.exp2(scores * score_scale - scaled_max[:, None])
    v = pltriton.load(v_ref.at[pl.ds(start, block_kv)], mask=kv_valid[:, None], other=0.0)
    acc = acc * correction[:, None] + _dot(probs.astype(v.dtype), v)
    return acc, new_max, row_sum * correction + probs.sum(axis=1)

  init = (
    jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32),
    jnp.full((block_q,), -jnp.inf, jnp.float32),
    jnp.zeros((block_q,), jnp.float32),
  )
  acc, row_max, row_sum = lax.fori_loop(0, kv_count_ref[0], body, init)
  empty = row_sum == 0.0
  safe_sum = jnp.where(empty, 1.0, row_sum)
  pltriton.store(out_ref, (acc / safe_sum[:, None]).astype(out_ref.dtype), mask=q_valid[:, None])
  lse = jnp.where(empty, -jnp.inf, row_max * scale + jnp.log(safe_sum))
  pltriton.store(lse_ref, lse, mask=q_valid)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale", "num_warps", "num_stages", "interpret"))
def forward(
  q, k, v, kv_block_index, kv_block_count, *, block_q, block_kv, scale, num_warps=4, num_stages=2, interpret=False
):
  """Block-sparse attention forward.

  q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, heads, dim] (dim a power of two ≥ 16).
  kv_block_index: int32 [batch, heads, n_q_blocks, n_kv_blocks]; kv_block_count: int32 [batch, heads, n_q_blocks].
  Returns (out [batch, q_len, heads, dim], lse float32 [batch, heads, q_len]).
  Launch defaults (here and in `backward`) are the best of `python -m benchmarks.attention --sweep`.
  """
  batch, q_len, heads, dim = q.shape
  kv_len = k.shape[1]
  n_q_blocks, n_kv_blocks = kv_block_index.shape[-2:]
  kernel = functools.partial(
    _forward_kernel, scale=scale, block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len
  )
  q_tile = pl.BlockSpec((None, block_q, None, dim), lambda i, b, h: (b, i, h, 0))
  kv_full = pl.BlockSpec((None, kv_len, None, dim), lambda i, b, h: (b, 0, h, 0))
  return pl.pallas_call(
    kernel,
    grid=(n_q_blocks, batch, heads),
    in_specs=[
      pl.BlockSpec((None, None, None, n_kv_blocks), lambda i, b, h: (b, h, i, 0)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, i)),
      q_tile,
      kv_full,
      kv_full,
    ],
    out_specs=[q_tile, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
    compiler_params=_compiler_params(num_warps, num_stages),
    interpret=interpret,
    name="block_sparse_forward",
  )(kv_block_index, kv_block_count, q, k, v)


# ---------------------------------------------------------------------------------------- backward


def _dq_kernel(
  kv_index_ref,
  kv_count_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dq_ref,
  *,
  scale,
  block_q,
  block_kv,
  q_len,
  kv_len,
):
  _, q_valid = _rows(pl.program_id(0), block_q, q_len)
  q = pltriton.load(q_ref, mask=q_valid[:, None], other=0.0)
  d_out = pltriton.load(do_ref, mask=q_valid[:, None], other=0.0)
  lse2 = pltriton.load(lse_ref, mask=q_valid, other=0.0) * LOG2E
  delta = pltriton.load(delta_ref, mask=q_valid, other=0.0)
  score_scale = scale * LOG2E

  def body(c, dq):
    kv_block = kv_index_ref[c]
    start = kv_block * block_kv
    _, kv_valid = _rows(kv_block, block_kv, kv_len)
    k = pltriton.load(k_ref.at[pl.ds(start, block_kv)], mask=kv_valid[:, None], other=0.0)
    v = pltriton.load(v_ref.at[pl.ds(start, block_kv)], mask=kv_valid[:, None], other=0.0)
    # Scaled, then masked, every step: the forward's way (unscaled scores, the scale in exp2's
    # argument, the mask only on the last block, by a branch or a loop of its own) made this kernel
    # 19-20% slower at head_dim 128 on an H100 (benchmarks/NOTES.md).
    scores = jnp.where(kv_valid[None, :], _dot(q, k, trans_b=True) * score_scale, _MASKED)
    probs = jnp.exp2(scores - lse2[:, None])
    d_scores = probs * (_dot(d_out, v, trans_b=True) - delta[:, None])
    return dq + _dot(d_scores.astype(k.dtype), k)

  dq = lax.fori_loop(0, kv_count_ref[0], body, jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32))
  pltriton.store(dq_ref, (dq * scale).astype(dq_ref.dtype), mask=q_valid[:, None])


def _dkv_kernel(
  q_index_ref,
  q_count_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  *,
  scale,
  block_q,
  block_kv,
  q_len,
  kv_len,
):
  _, kv_valid = _rows(pl.program_id(0), block_kv, kv_len)
  k = pltriton.load(k_ref, mask=kv_valid[:, None], other=0.0)
  v = pltriton.load(v_ref, mask=kv_valid[:, None], other=0.0)
  score_scale = scale * LOG2E

  def body(c, carry):
    dk, dv = carry
    q_block = q_index_ref[c]
    start = q_block * block_q
    _, q_valid = _rows(q_block, block_q, q_len)
    # Rows past q_len load as zeros (q, dO, lse, delta), so they add exactly zero to dK and dV.
    q = pltriton.load(q_ref.at[pl.ds(start, block_q)], mask=q_valid[:, None], other=0.0)
    d_out = pltriton.load(do_ref.at[pl.ds(start, block_q)], mask=q_valid[:, None], other=0.0)
    lse2 = pltriton.load(lse_ref.at[pl.ds(start, block_q)], mask=q_valid, other=0.0) * LOG2E
    delta = pltriton.load(delta_ref.at[pl.ds(start, block_q)], mask=q_valid, other=0.0)
    # Keys past kv_len need no mask: their rows of dK and dV are never stored.
    probs_t = jnp.exp2(_dot(k, q, trans_b=True) * score_scale - lse2[None, :])
    dv = dv + _dot(probs_t.astype(d_out.dtype), d_out)
    d_scores_t = probs_t * (_dot(v, d_out, trans_b=True) - delta[None, :])
    return dk + _dot(d_scores_t.astype(q.dtype), q), dv

  dim = k_ref.shape[-1]
  init = (jnp.zeros((block_kv, dim), jnp.float32), jnp.zeros((block_kv, v_ref.shape[-1]), jnp.float32))
  dk, dv = lax.fori_loop(0, q_count_ref[0], body, init)
  pltriton.store(dk_ref, (dk * scale).astype(dk_ref.dtype), mask=kv_valid[:, None])
  pltriton.store(dv_ref, dv.astype(dv_ref.dtype), mask=kv_valid[:, None])


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale", "num_warps", "num_stages", "interpret"))
def backward(
  q,
  k,
  v,
  out,
  lse,
  d_out,
  kv_block_index,
  kv_block_count,
  q_block_index,
  q_block_count,
  *,
  block_q,
  block_kv,
  scale,
  num_warps=8,
  num_stages=None,
  interpret=False,
):
  """Gradients (dq, dk, dv) of `forward`.

  num_stages defaults to 3 for 16-bit inputs and 1 for float32, whose tiles take twice the shared memory.

  q_block_index: int32 [batch, heads, n_kv_blocks, n_q_blocks]; q_block_count: int32 [batch, heads, n_kv_blocks].
  """
  batch, q_len, heads, dim = q.shape
  kv_len = k.shape[1]
  n_q_blocks, n_kv_blocks = kv_block_index.shape[-2:]
  delta = jnp.einsum("bnhd,bnhd->bhn", d_out.astype(jnp.float32), out.astype(jnp.float32))
  statics = dict(scale=scale, block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len)
  if num_stages is None:
    num_stages = 3 if q.dtype.itemsize <= 2 else 1
  params = _compiler_params(num_warps, num_stages)

  q_tile = pl.BlockSpec((None, block_q, None, dim), lambda i, b, h: (b, i, h, 0))
  row_tile = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
  kv_full = pl.BlockSpec((None, kv_len, None, dim), lambda i, b, h: (b, 0, h, 0))
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, **statics),
    grid=(n_q_blocks, batch, heads),
    in_specs=[
      pl.BlockSpec((None, None, None, n_kv_blocks), lambda i, b, h: (b, h, i, 0)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, i)),
      q_tile,
      kv_full,
      kv_full,
      q_tile,
      row_tile,
      row_tile,
    ],
    out_specs=q_tile,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=params,
    interpret=interpret,
    name="block_sparse_dq",
  )(kv_block_index, kv_block_count, q, k, v, d_out, lse, delta)

  kv_tile = pl.BlockSpec((None, block_kv, None, dim), lambda j, b, h: (b, j, h, 0))
  q_full = pl.BlockSpec((None, q_len, None, dim), lambda j, b, h: (b, 0, h, 0))
  rows_full = pl.BlockSpec((None, None, q_len), lambda j, b, h: (b, h, 0))
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, **statics),
    grid=(n_kv_blocks, batch, heads),
    in_specs=[
      pl.BlockSpec((None, None, None, n_q_blocks), lambda j, b, h: (b, h, j, 0)),
      pl.BlockSpec((None, None, 1), lambda j, b, h: (b, h, j)),
      q_full,
      kv_tile,
      kv_tile,
      q_full,
      rows_full,
      rows_full,
    ],
    out_specs=[kv_tile, kv_tile],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=params,
    interpret=interpret,
    name="block_sparse_dkv",
  )(q_block_index, q_block_count, q, k, v, d_out, lse, delta)
  return dq, dk, dv
