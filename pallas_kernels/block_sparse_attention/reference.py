"""Dense float32 reference for block-sparse attention: the block mask applied at token level.

Quadratic in memory; for tests and error measurements, not for long sequences.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def token_mask(mask, q_len: int, kv_len: int, *, block_q: int, block_kv: int):
  """bool [batch, heads, n_q_blocks, n_kv_blocks] -> bool [batch, heads, q_len, kv_len]."""
  mask = jnp.repeat(jnp.repeat(mask, block_q, axis=-2), block_kv, axis=-1)
  return mask[..., :q_len, :kv_len]


def masked_attention_reference(q, k, v, mask, *, block_q: int = 128, block_kv: int = 64, scale=None):
  """Attention over the kept blocks of `mask`, in float32 with full-precision matmuls.

  q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, heads, dim]; mask: bool [batch, heads, n_q_blocks, n_kv_blocks].
  Returns float32 [batch, q_len, heads, dim]; rows with no kept block are zero.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  allowed = token_mask(mask, q.shape[1], k.shape[1], block_q=block_q, block_kv=block_kv)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=lax.Precision.HIGHEST) * scale
  scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
  weights = jnp.where(allowed, jnp.exp(scores - row_max), 0.0)
  total = weights.sum(-1, keepdims=True)
  weights = weights / jnp.where(total == 0, 1.0, total)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=lax.Precision.HIGHEST)
