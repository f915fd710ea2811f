"""Index tables in plain JAX: each row of a block mask as a compact, ascending list of its kept columns.

The attention kernels loop over these lists instead of the mask, so skipped blocks cost nothing.
`triton_index_table` beside this builds the same tables with a Pallas kernel.
"""

from __future__ import annotations

import jax.numpy as jnp


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


def transposed_mask(mask, kv_heads: int | None = None):
  """The mask as the dK/dV kernels read it: per kv head and kv block, the (query head, q block) pairs.

  mask: bool [batch, heads, n_q_blocks, n_kv_blocks] -> bool [batch, kv_heads, n_kv_blocks, group · n_q_blocks],
  group = heads // kv_heads, column member · n_q_blocks + q_block for query head kv_head · group + member.
  kv_heads defaults to heads (one query head per kv head: the mask with its block axes swapped).
  """
  batch, heads, n_q, n_kv = mask.shape
  kv_heads = heads if kv_heads is None else kv_heads
  grouped = mask.reshape(batch, kv_heads, heads // kv_heads, n_q, n_kv)
  return grouped.transpose(0, 1, 4, 2, 3).reshape(batch, kv_heads, n_kv, -1)


def index_tables(mask, kv_heads: int | None = None):
  """Forward/dQ table (per q block: its kv blocks) and dK/dV table (per kv block: its q blocks).

  mask: bool [batch, heads, n_q_blocks, n_kv_blocks]; kv_heads: as in `transposed_mask`.
  Returns ((kv_block_index, kv_block_count), (q_block_index, q_block_count)), the dK/dV table of
  `transposed_mask`.
  """
  return index_table(mask), index_table(transposed_mask(mask, kv_heads))
