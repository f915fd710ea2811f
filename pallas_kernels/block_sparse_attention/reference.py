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


def masked_attention_reference(
  q,
  k,
  v,
  mask,
  *,
  block_q: int = 128,
  block_kv: int = 64,
  scale=None,
  kv_seq_lengths=None,
  is_causal: bool = False,
  return_lse: bool = False,
):
  """Attention over the kept blocks of `mask`, in float32 with full-precision matmuls.

  q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, kv_heads, dim] (query head n reads kv head
  n // (heads // kv_heads)); mask: bool [batch, heads, n_q_blocks, n_kv_blocks]. Keys at positions ≥
  kv_seq_lengths[b] and, with is_causal, keys after the query take no part.
  Returns float32 [batch, q_len, heads, dim]; rows that attend no key are zero. With return_lse also the
  natural-log log-sum-exp float32 [batch, heads, q_len] (-inf for those rows).
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  group = q.shape[2] // k.shape[2]
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)  # a reference may copy per query head
  q_len, kv_len = q.shape[1], k.shape[1]
  allowed = token_mask(mask, q_len, kv_len, block_q=block_q, block_kv=block_kv)
  if kv_seq_lengths is not None:
    allowed = allowed & (jnp.arange(kv_len) < kv_seq_lengths[:, None, None, None])
  if is_causal:
    allowed = allowed & (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=lax.Precision.HIGHEST) * scale
  scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
  weights = jnp.where(allowed, jnp.exp(scores - row_max), 0.0)
  total = weights.sum(-1, keepdims=True)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights / jnp.where(total == 0, 1.0, total), v, precision=lax.Precision.HIGHEST)
  if not return_lse:
    return out
  lse = jnp.where(total[..., 0] == 0, -jnp.inf, row_max[..., 0] + jnp.log(jnp.where(total == 0, 1.0, total))[..., 0])
  return out, lse
