"""The block mask's plain-JAX pieces, public: pooled block probabilities, selection and index tables.

`sparge_jax.attention.block_mask` is the mask itself (on the Pallas kernels where they apply); these are the
references it is tested against and the tables the attention kernels read. The code lives with the op in
`pallas_kernels.block_mask`.
"""

from pallas_kernels.block_mask.index_table import index_table, index_tables
from pallas_kernels.block_mask.reference import (
  MODES,
  block_means_reference,
  pooled_block_probs_reference,
  select_blocks,
)

__all__ = [
  "MODES",
  "block_means_reference",
  "index_table",
  "index_tables",
  "pooled_block_probs_reference",
  "select_blocks",
]
