"""SpargeAttention2's block mask in plain JAX: the reference, and the "xla" mask implementation.

Pooled scores P̄ (a row softmax of mean-pooled query blocks against mean-pooled key blocks, over the blocks
a row may attend), then the hybrid Top-k ∪ Top-p selection by a sort and a cumulative sum.
`triton_pool` and `triton_select` beside this compute the same mask with Pallas kernels; the tests hold
them to this file.

Which blocks a row may attend ("allowed") is always a prefix of the kv blocks: a q block with no valid
query allows none; a kv block with no valid key (past `kv_seq_lengths`) is never allowed; with causal
masking, blocks wholly above the diagonal are not allowed. `kv_block_limits` gives that prefix's length
per q block, and for causal masking the "anchor" block that holds the q block's first query position
(or the last valid key, if that lies before it), which is always kept, so every valid query attends at
least one key.

Grouped heads: query head n is pooled against kv head n // G (G = heads // kv_heads).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

MODES = ("hybrid", "topk", "topp")

# topk·n_kv products closer than this above an integer are float rounding, not a fraction of a block
# (float32 0.1 * 50 would otherwise keep 6 blocks).
COUNT_SLACK = 1e-3


def _valid_counts(n_blocks, block, seq, lengths):
  """Valid tokens of each block: int32 [batch or 1, n_blocks] (tokens below seq and lengths[b])."""
  limit = jnp.full((1, 1), seq, jnp.int32) if lengths is None else jnp.minimum(lengths, seq).reshape(-1, 1)
  starts = jnp.arange(n_blocks, dtype=jnp.int32) * block
  return jnp.clip(limit - starts, 0, block)


def block_means_reference(x, block: int, lengths=None):
  """Means of the valid tokens of each block.

  x: [batch, seq, heads, dim]; lengths: int32 [batch] or None (every token valid).
  Returns float32 [batch, heads, ceil(seq/block), dim]; a block with no valid token gives 0.
  """
  batch, seq, heads, dim = x.shape
  n_blocks = -(-seq // block)
  pad = n_blocks * block - seq
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  if lengths is not None:
    valid = jnp.arange(n_blocks * block) < jnp.asarray(lengths).reshape(-1, 1)
    x = jnp.where(valid[:, :, None, None], x, 0.0)
  sums = x.reshape(batch, n_blocks, block, heads, dim).sum(axis=2)
  counts = _valid_counts(n_blocks, block, seq, lengths).astype(jnp.float32)
  means = sums / jnp.maximum(counts, 1.0)[:, :, None, None]
  return means.transpose(0, 2, 1, 3)


def kv_block_limits(
  *, q_len: int, kv_len: int, block_q: int, block_kv: int, q_seq_lengths=None, kv_seq_lengths=None, is_causal=False
):
  """The allowed kv blocks of each q block: a prefix of `limit` blocks, and the causal anchor.

  q_seq_lengths, kv_seq_lengths: int32 [batch] or None. Returns (limit int32 [batch or 1, n_q_blocks],
  anchor int32 [batch or 1, n_q_blocks] or None without causal masking). The anchor lies in the prefix
  wherever the limit is positive.
  """
  n_q, n_kv = -(-q_len // block_q), -(-kv_len // block_kv)
  q_limit = jnp.full((1, 1), q_len, jnp.int32) if q_seq_lengths is None else q_seq_lengths.reshape(-1, 1)
  kv_limit = jnp.full((1, 1), kv_len, jnp.int32) if kv_seq_lengths is None else kv_seq_lengths.reshape(-1, 1)
  q_limit, kv_limit = jnp.clip(q_limit, 0, q_len), jnp.clip(kv_limit, 0, kv_len)
  q_start = jnp.arange(n_q, dtype=jnp.int32)[None, :] * block_q
  limit = -(-kv_limit // block_kv)
  if is_causal:
    last_query = jnp.minimum(q_start + block_q, q_limit) - 1
    limit = jnp.minimum(limit, last_query // block_kv + 1)
  limit = jnp.where(q_start < q_limit, jnp.clip(limit, 0, n_kv), 0).astype(jnp.int32)
  if not is_causal:
    return limit, None
  anchor = jnp.minimum(q_start, kv_limit - 1) // block_kv
  return limit, jnp.where(limit > 0, anchor, -1).astype(jnp.int32)


def allowed_blocks(limit, n_kv: int):
  """bool [batch or 1, n_q_blocks, n_kv_blocks] from `kv_block_limits`'s limit."""
  return jnp.arange(n_kv, dtype=jnp.int32) < limit[..., None]


def pooled_block_logits_reference(
  q, k, *, block_q: int, block_kv: int, scale: float, q_seq_lengths=None, kv_seq_lengths=None
):
  """scale·q̄k̄ᵀ in plain JAX.

  q: [batch, q_len, heads, head_dim], k: [batch, kv_len, kv_heads, head_dim].
  Returns float32 [batch, heads, n_q_blocks, n_kv_blocks], query head n against kv head n // G; q̄ and k̄
  are the means of the valid tokens of each block.
  """
  q_means = block_means_reference(q, block_q, q_seq_lengths)
  k_means = block_means_reference(k, block_kv, kv_seq_lengths)
  batch, heads, n_q, dim = q_means.shape
  kv_heads = k_means.shape[1]
  q_means = q_means.reshape(batch, kv_heads, heads // kv_heads, n_q, dim)
  scores = jnp.einsum("bkgid,bkjd->bkgij", q_means, k_means, precision=lax.Precision.HIGHEST)
  return scores.reshape(batch, heads, n_q, -1) * scale


def pooled_block_probs_reference(
  q,
  k,
  *,
  block_q: int,
  block_kv: int,
  scale: float,
  q_seq_lengths=None,
  kv_seq_lengths=None,
  is_causal: bool = False,
):
  """P̄ in plain JAX: the row softmax of `pooled_block_logits_reference` over the allowed blocks.

  Returns float32 [batch, heads, n_q_blocks, n_kv_blocks]; blocks a row may not attend get 0, and a row
  that may attend none is all 0.
  """
  logits = pooled_block_logits_reference(
    q, k, block_q=block_q, block_kv=block_kv, scale=scale, q_seq_lengths=q_seq_lengths, kv_seq_lengths=kv_seq_lengths
  )
  limit, _ = kv_block_limits(
    q_len=q.shape[1],
    kv_len=k.shape[1],
    block_q=block_q,
    block_kv=block_kv,
    q_seq_lengths=q_seq_lengths,
    kv_seq_lengths=kv_seq_lengths,
    is_causal=is_causal,
  )
  return masked_softmax(logits, allowed_blocks(limit, logits.shape[-1])[:, None])


def masked_softmax(logits, allowed):
  """Row softmax over the allowed entries; the others (and rows with none) are 0."""
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  exps = jnp.where(allowed, jnp.exp(logits - jnp.where(jnp.isneginf(row_max), 0.0, row_max)), 0.0)
  total = exps.sum(axis=-1, keepdims=True)
  return exps / jnp.where(total == 0, 1.0, total)


def _per_head(value):
  value = jnp.asarray(value, jnp.float32)
  return value.reshape((1, -1, 1, 1)) if value.ndim else value


def select_blocks_from_probs(probs, topk, topp, mode: str, *, kv_block_limit=None, anchor=None):
  """Top-k ∪ Top-p selection on pooled probabilities.

  probs: float32 [batch, heads, n_q_blocks, n_kv_blocks], rows summing to 1 over the allowed blocks.
  topk, topp: scalars or [heads] arrays in [0, 1].
  kv_block_limit: int32 [batch or 1, n_q_blocks]: row (b, ·, i) may attend its first kv_block_limit[b, i]
  blocks (default: all). anchor: int32 [batch or 1, n_q_blocks] or None: a block each row keeps.
  Returns a bool mask of the probs' shape. Top-k keeps ⌈topk · allowed⌉ blocks; Top-p the fewest largest
  whose mass reaches topp. Every row that allows a block keeps at least one; ties go to the lower index;
  a row with a NaN keeps every allowed block, so NaN inputs reach the output instead of being masked away.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  n_kv = probs.shape[-1]
  index = lax.broadcasted_iota(jnp.int32, probs.shape, probs.ndim - 1)
  if kv_block_limit is None:
    n_allowed = jnp.full((1, 1, 1, 1), n_kv, jnp.int32)
  else:
    n_allowed = kv_block_limit[:, None, :, None].astype(jnp.int32)
  allowed = index < n_allowed
  topk, topp = _per_head(topk), _per_head(topp)

  # Stable sort of -P: descending probabilities, equal ones in ascending index order; blocks that are not
  # allowed sort last (below every probability).
  ranked = jnp.where(allowed, probs, -1.0)
  neg_sorted, order = lax.sort((-ranked, index), dimension=probs.ndim - 1, is_stable=True, num_keys=1)
  sorted_probs = -neg_sorted
  sorted_mass = jnp.where(sorted_probs >= 0, sorted_probs, 0.0)

  n_topk = jnp.ceil(topk * n_allowed.astype(jnp.float32) - COUNT_SLACK).astype(jnp.int32)
  # Top-p keeps rank r while the mass before it is still short of p: the smallest prefix reaching p.
  mass_before = jnp.cumsum(sorted_mass, axis=-1) - sorted_mass
  n_topp = jnp.sum((mass_before < topp) & (sorted_probs >= 0), axis=-1, keepdims=True, dtype=jnp.int32)
  n_topp = jnp.where(topp >= 1.0, n_allowed, n_topp)  # cumsum rounding must not drop blocks at p = 1
  n_topk = jnp.broadcast_to(n_topk, n_topp.shape)
  n_keep = {"hybrid": jnp.maximum(n_topk, n_topp), "topk": n_topk, "topp": n_topp}[mode]
  n_keep = jnp.minimum(jnp.maximum(n_keep, 1), n_allowed)

  # The union of two prefixes of one order is the longer prefix: keep everything at or before the
  # last kept element in the (-P, index) order.
  last = jnp.maximum(n_keep - 1, 0)
  threshold = jnp.take_along_axis(sorted_probs, last, axis=-1)
  threshold_index = jnp.take_along_axis(order, last, axis=-1)
  keep = (ranked > threshold) | ((ranked == threshold) & (index <= threshold_index))
  keep = keep & (n_keep > 0)
  keep = keep | jnp.any(jnp.isnan(probs) & allowed, axis=-1, keepdims=True)
  if anchor is not None:
    keep = keep | (index == anchor[:, None, :, None])
  return keep & allowed


def block_mask_reference(
  q,
  k,
  topk,
  topp,
  mode: str,
  *,
  block_q: int,
  block_kv: int,
  scale: float,
  q_seq_lengths=None,
  kv_seq_lengths=None,
  is_causal: bool = False,
):
  """The whole mask in plain JAX: bool [batch, heads, n_q_blocks, n_kv_blocks]. No gradient flows."""
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  limit, anchor = kv_block_limits(
    q_len=q.shape[1],
    kv_len=k.shape[1],
    block_q=block_q,
    block_kv=block_kv,
    q_seq_lengths=q_seq_lengths,
    kv_seq_lengths=kv_seq_lengths,
    is_causal=is_causal,
  )
  logits = pooled_block_logits_reference(
    q, k, block_q=block_q, block_kv=block_kv, scale=scale, q_seq_lengths=q_seq_lengths, kv_seq_lengths=kv_seq_lengths
  )
  probs = masked_softmax(logits, allowed_blocks(limit, logits.shape[-1])[:, None])
  return select_blocks_from_probs(probs, topk, topp, mode, kv_block_limit=limit, anchor=anchor)


__all__ = [
  "MODES",
  "allowed_blocks",
  "block_mask_reference",
  "block_means_reference",
  "kv_block_limits",
  "masked_softmax",
  "pooled_block_logits_reference",
  "pooled_block_probs_reference",
  "select_blocks_from_probs",
]
