"""sparge-jax: trainable block-sparse attention (SpargeAttention2) for video diffusion transformers."""

from sparge_jax.attention import (
  block_mask,
  block_sparse_attention,
  dense_attention,
  dot_product_attention,
  make_attention_fn,
  sparse_attention,
)

__all__ = [
  "block_mask",
  "block_sparse_attention",
  "dense_attention",
  "dot_product_attention",
  "make_attention_fn",
  "sparse_attention",
]
__version__ = "0.1.0"
