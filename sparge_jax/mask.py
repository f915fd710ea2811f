"""The block mask's plain-JAX pieces, public: pooled block scores, selection and index tables.

`sparge_jax.attention.block_mask` is the mask itself: on a GPU of compute capability ≥ 8.0 (or with
interpret=True) it runs the Pallas Triton mask kernels (`pallas_kernels.block_mask.triton_pool`,
`triton_select`), elsewhere these plain-JAX functions. They are also the references the kernels are tested
against; `index_table` and `index_tables` build the lists of kept blocks the attention kernels read.
"""

from pallas_kernels.block_mask.index_table import index_table, index_tables, transposed_mask
from pallas_kernels.block_mask.reference import (
  MODES,
  allowed_blocks,
  block_mask_reference,
  block_means_reference,
  kv_block_limits,
  masked_softmax,
  pooled_block_logits_reference,
  pooled_block_probs_reference,
  select_blocks_from_probs,
)

__all__ = [
  "MODES",
  "allowed_blocks",
  "block_mask_reference",
  "block_means_reference",
  "index_table",
  "index_tables",
  "kv_block_limits",
  "masked_softmax",
  "pooled_block_logits_reference",
  "pooled_block_probs_reference",
  "select_blocks_from_probs",
  "transposed_mask",
]
