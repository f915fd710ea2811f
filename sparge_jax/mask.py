"""SpargeAttention2's block mask: hybrid Top-k ∪ Top-p selection over pooled block scores.

The pooled scores P̄ (a row-softmax of mean-pooled query blocks against mean-pooled key blocks) come
from `pallas_kernels.mask_pool` on GPU and from `pooled_block_probs_reference` elsewhere; the selection
(sort, cumulative sum, threshold) is plain XLA. The index tables that the kernels iterate over are
built here too (the XLA backend's; the GPU backends build the same tables with `pallas_kernels.index_table`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

MODES = ("hybrid", "topk", "topp")

# topk·n_kv products closer than this above an integer are float rounding, not a fraction of a block
# (float32 0.1 * 50 would otherwise keep 6 blocks).
_COUNT_SLACK = 1e-3


def pooled_block_probs_reference(q, k, *, block_q: int, block_kv: int, scale: float):
  """P̄ in plain JAX.

  q: [batch, q_len, heads, head_dim], k: [batch, kv_len, heads, head_dim].
  Returns float32 [batch, heads, n_q_blocks, n_kv_blocks]: row-softmax of scale·(q̄ᵢ·k̄ⱼ), where q̄ᵢ, k̄ⱼ are
  the means of the real tokens of each block (the last block may be partial).
  """
  q_means = block_means_reference(q, block_q)
  k_means = block_means_reference(k, block_kv)
  scores = jnp.einsum("bhid,bhjd->bhij", q_means, k_means, precision=lax.Precision.HIGHEST)
  return jax.nn.softmax(scores * scale, axis=-1)


def block_means_reference(x, block: int):
  """x: [batch, seq, heads, dim] -> float32 [batch, heads, ceil(seq/block), dim], means of real tokens."""
  batch, seq, heads, dim = x.shape
  n_blocks = -(-seq // block)
  pad = n_blocks * block - seq
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  sums = x.reshape(batch, n_blocks, block, heads, dim).sum(axis=2)
  counts = jnp.minimum(block, seq - jnp.arange(n_blocks) * block).astype(jnp.float32)
  return (sums / counts[None, :, None, None]).transpose(0, 2, 1, 3)


def select_blocks(probs, topk, topp, mode: str):
  """Top-k ∪ Top-p selection on pooled probabilities.

  probs: float32 [batch, heads, n_q_blocks, n_kv_blocks], rows summing to 1.
  topk, topp: scalars or [heads] arrays in [0, 1].
  Returns bool mask of the same shape. Every row keeps at least one block; ties go to the lower index;
  a row with a NaN keeps every block, so NaN inputs reach the output instead of being masked away.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  n_kv = probs.shape[-1]
  per_head = lambda a: (
    jnp.asarray(a, jnp.float32).reshape((1, -1, 1, 1)) if jnp.ndim(a) else jnp.asarray(a, jnp.float32)
  )
  topk, topp = per_head(topk), per_head(topp)

  # Stable sort of -P: descending probabilities, equal ones in ascending index order.
  index = lax.broadcasted_iota(jnp.int32, probs.shape, probs.ndim - 1)
  neg_sorted, order = lax.sort((-probs, index), dimension=probs.ndim - 1, is_stable=True, num_keys=1)
  sorted_probs = -neg_sorted

  n_topk = jnp.ceil(topk * n_kv - _COUNT_SLACK).astype(jnp.int32)
  # Top-p keeps rank r while the mass before it is still short of p: the smallest prefix reaching p.
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  n_topp = jnp.sum(mass_before < topp, axis=-1, keepdims=True, dtype=jnp.int32)
  n_topp = jnp.where(topp >= 1.0, n_kv, n_topp)  # cumsum rounding must not drop blocks at p = 1
  n_topk = jnp.broadcast_to(n_topk, n_topp.shape)
  n_keep = {"hybrid": jnp.maximum(n_topk, n_topp), "topk": n_topk, "topp": n_topp}[mode]
  n_keep = jnp.clip(n_keep, 1, n_kv)

  # The union of two prefixes of one order is the longer prefix: keep everything at or before the
  # last kept element in the (-P, index) order.
  last = n_keep - 1
  threshold = jnp.take_along_axis(sorted_probs, last, axis=-1)
  threshold_index = jnp.take_along_axis(order, last, axis=-1)
  keep = (probs > threshold) | ((probs == threshold) & (index <= threshold_index))
  return keep | jnp.any(jnp.isnan(probs), axis=-1, keepdims=True)


def index_table(mask):
  """Compact per-row list of kept columns.

  mask: bool [..., rows, cols].
  Returns (index int32 [..., rows, cols], count int32 [..., rows]): row r keeps columns index[r, :count[r]],
  in ascending order. Entries past the count are 0, a valid column id, so a kernel may prefetch one entry
  ahead without reading out of bounds.
  """
  *lead, cols = mask.shape
  flat = mask.reshape(-1, cols)
  rows = flat.shape[0]
  # A scatter, not a sort: kept column j goes to slot (number of kept columns before j); skipped ones go to
  # a spare slot past the end that is cut off.
  slot = jnp.where(flat, jnp.cumsum(flat, axis=-1, dtype=jnp.int32) - 1, cols)
  target = (jnp.arange(rows, dtype=jnp.int32)[:, None] * (cols + 1) + slot).reshape(-1)
  column = jnp.broadcast_to(jnp.arange(cols, dtype=jnp.int32), flat.shape).reshape(-1)
  index = jnp.zeros(rows * (cols + 1), jnp.int32).at[target].set(column, mode="drop")
  index = index.reshape(rows, cols + 1)[:, :cols].reshape(*lead, cols)
  count = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  return index, count


def index_tables(mask):
  """Forward/dQ table (per q block: its kv blocks) and dK/dV table (per kv block: its q blocks).

  mask: bool [batch, heads, n_q_blocks, n_kv_blocks].
  Returns ((kv_block_index, kv_block_count), (q_block_index, q_block_count)).
  """
  return index_table(mask), index_table(jnp.swapaxes(mask, -1, -2))
