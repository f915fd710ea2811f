"""Block-sparse attention in plain JAX: the "xla" backend.

The same algorithm as the Pallas kernels, written with gathers: a loop over the columns of the index
table, each step gathering one kept kv block (or q block, for dK/dV) per row and doing an online-softmax
update. Work is proportional to the kept blocks (times the longest row), never T·S. Runs anywhere; it is
the readable statement of what the kernels compute.

Grouped heads: query head n reads kv head n // G (G = heads // kv_heads). The query heads of one kv head
are laid side by side as rows `member · n_q_blocks + q_block` of that kv head, which is also how the dK/dV
table numbers its entries, so both directions gather from the kv head's own tiles (no copy of K or V per
query head).

Conventions shared with the kernels (the package's backend contract): `lse` is the natural-log
log-sum-exp of the scaled scores per query token, float32 [batch, heads, q_len]; a query row that attends
no key outputs zeros and has lse = -inf.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.varying import vary, varying_axes

_MASKED = -1e30  # finite, so masked columns never make inf - inf = NaN
_HI = lax.Precision.HIGHEST


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


def _group(x, kv_heads):
  """[batch, heads, n, ...] -> [batch, kv_heads, group · n, ...]: the query heads of a kv head side by side."""
  batch, heads, n = x.shape[:3]
  return x.reshape(batch, kv_heads, (heads // kv_heads) * n, *x.shape[3:])


def _ungroup(x, heads):
  """Inverse of `_group`."""
  batch, kv_heads, rows = x.shape[:3]
  return x.reshape(batch, heads, rows * kv_heads // heads, *x.shape[3:])


def _gather(blocks, index):
  """blocks: [b, h, n, block, ...], index: [b, h, rows] -> [b, h, rows, block, ...]."""
  index = index.reshape(index.shape + (1,) * (blocks.ndim - 3))
  return jnp.take_along_axis(blocks, index, axis=2)


def _positions(block_index, block):
  """Token positions of the blocks [b, h, rows] -> [b, h, rows, block]."""
  return block_index[..., None] * block + jnp.arange(block)


def _allowed(q_pos, k_pos, kv_limit, is_causal):
  """Which (query, key) pairs take part: q_pos [..., bq], k_pos [..., bk] -> bool [..., bq, bk]."""
  allowed = (k_pos < kv_limit)[..., None, :]
  if is_causal:
    allowed = allowed & (k_pos[..., None, :] <= q_pos[..., :, None])
  return allowed


def _kv_limit(kv_seq_lengths, kv_len):
  """Keys at positions >= this take no part: [batch, 1, 1, 1] or a scalar."""
  if kv_seq_lengths is None:
    return kv_len
  return jnp.minimum(kv_seq_lengths, kv_len).reshape(-1, 1, 1, 1)


def forward(
  q,
  k,
  v,
  kv_block_index,
  kv_block_count,
  *,
  kv_seq_lengths=None,
  block_q,
  block_kv,
  scale,
  is_causal=False,
  interpret=False,
):
  """q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, kv_heads, dim].

  kv_block_index: int32 [batch, heads, n_q_blocks, n_kv_blocks], kv_block_count: int32 [batch, heads, n_q_blocks].
  kv_seq_lengths: int32 [batch] or None. interpret: ignored (nothing here is a Pallas kernel).
  Returns (out [batch, q_len, heads, dim] in q's dtype, lse float32 [batch, heads, q_len]).
  """
  del interpret
  q_len, heads, kv_len, kv_heads = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
  n_q = -(-q_len // block_q)
  qb = _group(_to_blocks(q, block_q), kv_heads)  # [b, kv_heads, group · n_q, block_q, dim]
  kb, vb = _to_blocks(k, block_kv), _to_blocks(v, block_kv)
  kv_block_index, kv_block_count = _group(kv_block_index, kv_heads), _group(kv_block_count, kv_heads)
  q_pos = _positions(jnp.arange(qb.shape[2]) % n_q, block_q)
  kv_limit = _kv_limit(kv_seq_lengths, kv_len)
  rows_shape = qb.shape[:4]

  def step(c, carry):
    acc, row_max, row_sum = carry
    kv_index = kv_block_index[..., c]
    keep = _allowed(q_pos, _positions(kv_index, block_kv), kv_limit, is_causal)
    keep = keep & (c < kv_block_count)[..., None, None]
    scores = jnp.einsum("bhiqd,bhikd->bhiqk", qb, _gather(kb, kv_index), precision=_HI) * scale
    scores = jnp.where(keep, scores, _MASKED)
    new_max = jnp.maximum(row_max, scores.max(-1))
    correction = jnp.exp(row_max - new_max)
    probs = jnp.where(keep, jnp.exp(scores - new_max[..., None]), 0.0)
    acc = acc * correction[..., None] + jnp.einsum("bhiqk,bhikd->bhiqd", probs, _gather(vb, kv_index), precision=_HI)
    return acc, new_max, row_sum * correction + probs.sum(-1)

  init = (
    jnp.zeros(rows_shape + (v.shape[-1],), jnp.float32),
    jnp.full(rows_shape, -jnp.inf, jnp.float32),
    jnp.zeros(rows_shape, jnp.float32),
  )
  # Under shard_map's check_vma the carry must vary over the axes the inputs do.
  axes = varying_axes(q, k, v, kv_block_index, kv_block_count, kv_seq_lengths)
  init = tuple(vary(x, axes) for x in init)
  acc, row_max, row_sum = lax.fori_loop(0, jnp.max(kv_block_count, initial=0), step, init)
  empty = row_sum == 0
  out = acc / jnp.where(empty, 1.0, row_sum)[..., None]
  lse = jnp.where(empty, -jnp.inf, row_max + jnp.log(jnp.where(empty, 1.0, row_sum)))
  lse = _ungroup(lse, heads).reshape(lse.shape[0], heads, -1)[..., :q_len]
  return _from_blocks(_ungroup(out, heads), q_len).astype(q.dtype), lse


def backward(
  q,
  k,
  v,
  out,
  lse,
  d_out,
  d_lse,
  kv_block_index,
  kv_block_count,
  q_block_index,
  q_block_count,
  *,
  kv_seq_lengths=None,
  block_q,
  block_kv,
  scale,
  is_causal=False,
  interpret=False,
):
  """Gradients of `forward`: dQ over the forward table, dK and dV over the dK/dV table.

  d_lse: float32 [batch, heads, q_len], the cotangent of lse, or None.
  q_block_index: int32 [batch, kv_heads, n_kv_blocks, group · n_q_blocks], entries member · n_q_blocks +
  q_block; q_block_count: int32 [batch, kv_heads, n_kv_blocks]. dK and dV sum over each kv head's group.
  Returns (dq, dk, dv) in the dtypes of q, k, v.
  """
  del interpret
  q_len, heads, kv_len, kv_heads = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
  n_q = -(-q_len // block_q)
  # delta_i = Σ_d dO_i·O_i - d_lse_i: the softmax-backward correction per query row (with the lse term,
  # d s_ij = P_ij (dP_ij - delta_i) also carries d lse_i / d s_ij = P_ij).
  delta = jnp.einsum("bnhd,bnhd->bhn", d_out.astype(jnp.float32), out.astype(jnp.float32))
  if d_lse is not None:
    delta = delta - d_lse
  # A row that attends no key (lse = -inf) must give P = 0, not exp(s + inf).
  lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
  qb, dob = _group(_to_blocks(q, block_q), kv_heads), _group(_to_blocks(d_out, block_q), kv_heads)
  kb, vb = _to_blocks(k, block_kv), _to_blocks(v, block_kv)
  lse_b, delta_b = _group(_rows_to_blocks(lse, block_q), kv_heads), _group(_rows_to_blocks(delta, block_q), kv_heads)
  kv_block_index, kv_block_count = _group(kv_block_index, kv_heads), _group(kv_block_count, kv_heads)
  q_pos = _positions(jnp.arange(qb.shape[2]) % n_q, block_q)
  kv_limit = _kv_limit(kv_seq_lengths, kv_len)

  def dq_step(c, dq):
    kv_index = kv_block_index[..., c]
    keep = _allowed(q_pos, _positions(kv_index, block_kv), kv_limit, is_causal)
    keep = keep & (c < kv_block_count)[..., None, None]
    k_tile, v_tile = _gather(kb, kv_index), _gather(vb, kv_index)
    scores = jnp.einsum("bhiqd,bhikd->bhiqk", qb, k_tile, precision=_HI) * scale
    probs = jnp.where(keep, jnp.exp(scores - lse_b[..., None]), 0.0)
    d_probs = jnp.einsum("bhiqd,bhikd->bhiqk", dob, v_tile, precision=_HI)
    d_scores = probs * (d_probs - delta_b[..., None])
    return dq + jnp.einsum("bhiqk,bhikd->bhiqd", d_scores, k_tile, precision=_HI)

  k_pos = _positions(jnp.arange(kb.shape[2]), block_kv)

  def dkv_step(c, carry):
    dk, dv = carry
    entry = q_block_index[..., c]  # member · n_q + q block, a row of the grouped q tiles
    entry_q_pos = _positions(entry % n_q, block_q)
    keep = _allowed(entry_q_pos, k_pos, kv_limit, is_causal)  # [b, kv_heads, n_kv, block_q, block_kv]
    keep = keep & (entry_q_pos < q_len)[..., None] & (c < q_block_count)[..., None, None]
    q_tile, do_tile = _gather(qb, entry), _gather(dob, entry)
    lse_tile, delta_tile = _gather(lse_b, entry), _gather(delta_b, entry)
    scores = jnp.einsum("bhjqd,bhjkd->bhjqk", q_tile, kb, precision=_HI) * scale
    probs = jnp.where(keep, jnp.exp(scores - lse_tile[..., None]), 0.0)
    dv = dv + jnp.einsum("bhjqk,bhjqd->bhjkd", probs, do_tile, precision=_HI)
    d_probs = jnp.einsum("bhjqd,bhjkd->bhjqk", do_tile, vb, precision=_HI)
    d_scores = probs * (d_probs - delta_tile[..., None])
    return dk + jnp.einsum("bhjqk,bhjqd->bhjkd", d_scores, q_tile, precision=_HI), dv

  axes = varying_axes(q, k, v, out, lse, d_out, d_lse, kv_block_index, q_block_index, kv_seq_lengths)
  dq = lax.fori_loop(0, jnp.max(kv_block_count, initial=0), dq_step, vary(jnp.zeros(qb.shape, jnp.float32), axes))
  dkv_init = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape[:-1] + (v.shape[-1],), jnp.float32))
  dk, dv = lax.fori_loop(0, jnp.max(q_block_count, initial=0), dkv_step, tuple(vary(x, axes) for x in dkv_init))
  return (
    _from_blocks(_ungroup(dq, heads) * scale, q_len).astype(q.dtype),
    _from_blocks(dk * scale, kv_len).astype(k.dtype),
    _from_blocks(dv, kv_len).astype(v.dtype),
  )
