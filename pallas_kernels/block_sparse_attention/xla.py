"""Block-sparse attention in plain JAX: the "xla" backend.

The same algorithm as the Pallas kernels, written with gathers: a loop over the columns of the index
table, each step gathering one kept kv block (or q block, for dK/dV) per row and doing an online-softmax
update. Work is proportional to the kept blocks (times the longest row), never N². Runs anywhere;
it is the default on CPU and the readable statement of what the kernels compute.

Conventions shared with the kernels: `lse` is the natural-log log-sum-exp of the scaled scores per query
token, float32 [batch, heads, q_len]; a query row with no kept block outputs zeros and has lse = -inf.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_MASKED = -1e30  # finite, so masked columns never make inf - inf = NaN


def _to_blocks(x, block):
  """[batch, seq, heads, dim] -> float32 [batch, heads, n_blocks, block, dim], zero padded."""
  batch, seq, heads, dim = x.shape
  n_blocks = -(-seq // block)
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n_blocks * block - seq), (0, 0), (0, 0)))
  return x.reshape(batch, n_blocks, block, heads, dim).transpose(0, 3, 1, 2, 4)


def _from_blocks(x, seq):
  """[batch, heads, n_blocks, block, dim] -> [batch, seq, heads, dim]."""
  batch, heads, n_blocks, block, dim = x.shape
  return x.transpose(0, 2, 3, 1, 4).reshape(batch, n_blocks * block, heads, dim)[:, :seq]


def _rows_to_blocks(x, block):
  """[batch, heads, seq] -> [batch, heads, n_blocks, block], zero padded."""
  seq = x.shape[-1]
  n_blocks = -(-seq // block)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, n_blocks * block - seq)))
  return x.reshape(*x.shape[:2], n_blocks, block)


def _gather(blocks, index):
  """blocks: [b, h, n, block, ...], index: [b, h, rows] -> [b, h, rows, block, ...]."""
  index = index.reshape(index.shape + (1,) * (blocks.ndim - 3))
  return jnp.take_along_axis(blocks, index, axis=2)


def _token_valid(block_index, block, seq):
  """Which tokens of the gathered blocks are real: [b, h, rows] -> bool [b, h, rows, block]."""
  return block_index[..., None] * block + jnp.arange(block) < seq


def forward(q, k, v, kv_block_index, kv_block_count, *, block_q, block_kv, scale):
  """q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, heads, dim].

  kv_block_index: int32 [batch, heads, n_q_blocks, n_kv_blocks], kv_block_count: int32 [batch, heads, n_q_blocks].
  Returns (out [batch, q_len, heads, dim] in q's dtype, lse float32 [batch, heads, q_len]).
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  qb, kb, vb = _to_blocks(q, block_q), _to_blocks(k, block_kv), _to_blocks(v, block_kv)
  rows_shape = qb.shape[:3] + (block_q,)

  def step(c, carry):
    acc, row_max, row_sum = carry
    kv_index = kv_block_index[..., c]
    active = c < kv_block_count
    scores = jnp.einsum("bhiqd,bhikd->bhiqk", qb, _gather(kb, kv_index), precision=lax.Precision.HIGHEST) * scale
    keep = (_token_valid(kv_index, block_kv, kv_len) & active[..., None])[..., None, :]
    scores = jnp.where(keep, scores, _MASKED)
    new_max = jnp.maximum(row_max, scores.max(-1))
    correction = jnp.exp(row_max - new_max)
    probs = jnp.where(keep, jnp.exp(scores - new_max[..., None]), 0.0)
    acc = acc * correction[..., None] + jnp.einsum(
      "bhiqk,bhikd->bhiqd", probs, _gather(vb, kv_index), precision=lax.Precision.HIGHEST
    )
    return acc, new_max, row_sum * correction + probs.sum(-1)

  init = (
    jnp.zeros(rows_shape + (v.shape[-1],), jnp.float32),
    jnp.full(rows_shape, -jnp.inf, jnp.float32),
    jnp.zeros(rows_shape, jnp.float32),
  )
  acc, row_max, row_sum = lax.fori_loop(0, jnp.max(kv_block_count, initial=0), step, init)
  empty = row_sum == 0
  out = acc / jnp.where(empty, 1.0, row_sum)[..., None]
  lse = jnp.where(empty, -jnp.inf, row_max + jnp.log(jnp.where(empty, 1.0, row_sum)))
  lse = lse.reshape(*lse.shape[:2], -1)[..., :q_len]
  return _from_blocks(out, q_len).astype(q.dtype), lse


def backward(
  q, k, v, out, lse, d_out, kv_block_index, kv_block_count, q_block_index, q_block_count, *, block_q, block_kv, scale
):
  """Gradients of `forward`: dQ over the forward table, dK and dV over the transposed one.

  q_block_index: int32 [batch, heads, n_kv_blocks, n_q_blocks], q_block_count: int32 [batch, heads, n_kv_blocks].
  Returns (dq, dk, dv) in the dtypes of q, k, v.
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  # delta_i = Σ_d dO_i·O_i = Σ_j P_ij dP_ij: the softmax-backward correction per query row.
  delta = jnp.einsum("bnhd,bnhd->bhn", d_out.astype(jnp.float32), out.astype(jnp.float32))
  qb, dob = _to_blocks(q, block_q), _to_blocks(d_out, block_q)
  kb, vb = _to_blocks(k, block_kv), _to_blocks(v, block_kv)
  lse_b, delta_b = _rows_to_blocks(lse, block_q), _rows_to_blocks(delta, block_q)
  hi = lax.Precision.HIGHEST

  def dq_step(c, dq):
    kv_index = kv_block_index[..., c]
    keep = (_token_valid(kv_index, block_kv, kv_len) & (c < kv_block_count)[..., None])[..., None, :]
    k_tile, v_tile = _gather(kb, kv_index), _gather(vb, kv_index)
    scores = jnp.einsum("bhiqd,bhikd->bhiqk", qb, k_tile, precision=hi) * scale
    probs = jnp.where(keep, jnp.exp(scores - lse_b[..., None]), 0.0)
    d_probs = jnp.einsum("bhiqd,bhikd->bhiqk", dob, v_tile, precision=hi)
    d_scores = probs * (d_probs - delta_b[..., None])
    return dq + jnp.einsum("bhiqk,bhikd->bhiqd", d_scores, k_tile, precision=hi)

  def dkv_step(c, carry):
    dk, dv = carry
    q_index = q_block_index[..., c]
    keep = (_token_valid(q_index, block_q, q_len) & (c < q_block_count)[..., None])[..., None, :]
    q_tile, do_tile = _gather(qb, q_index), _gather(dob, q_index)
    lse_tile, delta_tile = _gather(lse_b, q_index), _gather(delta_b, q_index)
    scores_t = jnp.einsum("bhjkd,bhjqd->bhjkq", kb, q_tile, precision=hi) * scale
    probs_t = jnp.where(keep, jnp.exp(scores_t - lse_tile[..., None, :]), 0.0)
    dv = dv + jnp.einsum("bhjkq,bhjqd->bhjkd", probs_t, do_tile, precision=hi)
    d_probs_t = jnp.einsum("bhjkd,bhjqd->bhjkq", vb, do_tile, precision=hi)
    d_scores_t = probs_t * (d_probs_t - delta_tile[..., None, :])
    return dk + jnp.einsum("bhjkq,bhjqd->bhjkd", d_scores_t, q_tile, precision=hi), dv

  dq = lax.fori_loop(0, jnp.max(kv_block_count, initial=0), dq_step, jnp.zeros_like(qb))
  dk, dv = lax.fori_loop(
    0,
    jnp.max(q_block_count, initial=0),
    dkv_step,
    (jnp.zeros_like(kb), jnp.zeros(vb.shape[:-1] + (v.shape[-1],), jnp.float32)),
  )
  return (
    _from_blocks(dq * scale, q_len).astype(q.dtype),
    _from_blocks(dk * scale, kv_len).astype(k.dtype),
    _from_blocks(dv, kv_len).astype(v.dtype),
  )
