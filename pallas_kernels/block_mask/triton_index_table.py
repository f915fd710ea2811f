"""The kernels' index tables (per row of a block mask, its kept columns in order) as a Pallas Triton kernel.

Same output as `index_table.index_table`, which builds it in XLA with a cumulative sum and a scatter over
the whole mask (the scatter is its cost). Here each program holds a few rows in registers, ranks their
columns (kept ones first, in order; skipped ones after them) and writes every column id to its rank in one
pass: every slot of the row is written exactly once, so the row needs no zero fill and no second pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.block_mask.index_table import transposed_mask
from pallas_kernels.varying import shape_dtype, varying_axes

_ROWS = 4


def _index_table_kernel(mask_ref, index_ref, count_ref, *, n_rows, n_cols, n_pad):
  rows = pl.program_id(0) * _ROWS + jnp.arange(_ROWS)
  cols = jnp.arange(n_pad)
  valid = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
  keep = (pltriton.load(mask_ref, mask=valid, other=0) != 0) & valid
  kept = keep.astype(jnp.int32)
  kept_before = jnp.cumsum(kept, axis=1) - kept
  count = kept.sum(axis=1)
  # Kept column j goes to slot (kept columns before j); skipped ones fill the slots after the count with 0,
  # a valid column id, so a kernel may prefetch one entry past the count.
  slot = jnp.where(keep, kept_before, count[:, None] + cols[None, :] - kept_before)
  local_row = jnp.broadcast_to(jnp.arange(_ROWS)[:, None], slot.shape)
  pltriton.store(index_ref.at[local_row, slot], jnp.where(keep, cols[None, :], 0), mask=valid)
  pltriton.store(count_ref, count, mask=rows < n_rows)


@functools.partial(jax.jit, static_argnames=("interpret",))
def index_table(mask, interpret: bool = False):
  """Compact per-row list of kept columns.

  mask: bool (or int8) [..., rows, cols].
  Returns (index int32 [..., rows, cols], count int32 [..., rows]): row r keeps columns index[r, :count[r]]
  in ascending order; entries past the count are 0.
  """
  *lead, n_rows, n_cols = mask.shape
  flat = mask.reshape(-1, n_rows, n_cols)  # bool is read as bytes: no conversion pass
  n_pad = pl.next_power_of_2(n_cols)
  axes = varying_axes(mask)
  index, count = pl.pallas_call(
    functools.partial(_index_table_kernel, n_rows=n_rows, n_cols=n_cols, n_pad=n_pad),
    grid=(pl.cdiv(n_rows, _ROWS), flat.shape[0]),
    in_specs=[pl.BlockSpec((None, _ROWS, n_pad), lambda i, b: (b, i, 0))],
    out_specs=[
      pl.BlockSpec((None, _ROWS, n_pad), lambda i, b: (b, i, 0)),
      pl.BlockSpec((None, _ROWS), lambda i, b: (b, i)),
    ],
    out_shape=[shape_dtype(flat.shape, jnp.int32, axes), shape_dtype(flat.shape[:2], jnp.int32, axes)],
    compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
    interpret=interpret,
    name="index_table",
  )(flat)
  return index.reshape(*lead, n_rows, n_cols), count.reshape(*lead, n_rows)


def index_tables(mask, kv_heads: int | None = None, interpret: bool = False):
  """Forward/dQ table (per q block: its kv blocks) and dK/dV table (per kv block: its q blocks).

  mask: bool [batch, heads, n_q_blocks, n_kv_blocks]; kv_heads: as in `index_table.transposed_mask`.
  Returns ((kv_block_index, kv_block_count), (q_block_index, q_block_count)), as `index_table.index_tables`.
  """
  return index_table(mask, interpret=interpret), index_table(transposed_mask(mask, kv_heads), interpret=interpret)
