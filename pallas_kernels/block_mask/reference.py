"""SpargeAttention2's block mask in plain JAX: the reference, and the "xla" mask implementation.

Pooled scores P̄ (a row-softmax of mean-pooled query blocks against mean-pooled key blocks), then the hybrid
Top-k ∪ Top-p selection by a sort and a cumulative sum. `triton_pool` and `triton_select` beside this compute
the same mask with Pallas kernels; the tests hold them to this file.
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
