"""Pooled block scores for the block mask, as Pallas Triton kernels.

`block_means` reads Q (or K) once and writes the mean of the real tokens of every block; `pooled_logits`
takes those means and writes scale·q̄k̄ᵀ, one (query tile, key tile) pair per program so the small matmul
spreads over the whole GPU. The row softmax and the Top-k ∪ Top-p selection follow in
`mask_select` (a kernel) or `sparge_jax.mask.select_blocks` (XLA).
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_Q_TILE = 32
_KV_TILE = 64


def _block_means_kernel(x_ref, out_ref, *, block, seq):
  pos = pl.program_id(0) * block + jnp.arange(block)
  x = pltriton.load(x_ref, mask=(pos < seq)[:, None], other=0.0).astype(jnp.float32)
  count = jnp.minimum(block, seq - pl.program_id(0) * block).astype(jnp.float32)
  out_ref[...] = x.sum(axis=0) / count


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def block_means(x, *, block, interpret=False):
  """x: [batch, seq, heads, dim] -> float32 [batch, heads, ceil(seq/block), dim], means of real tokens."""
  batch, seq, heads, dim = x.shape
  n_blocks = pl.cdiv(seq, block)
  return pl.pallas_call(
      functools.partial(_block_means_kernel, block=block, seq=seq),
      grid=(n_blocks, batch, heads),
      in_specs=[pl.BlockSpec((None, block, None, dim), lambda i, b, h: (b, i, h, 0))],
      out_specs=pl.BlockSpec((None, None, None, dim), lambda i, b, h: (b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, heads, n_blocks, dim), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="block_means",
  )(x)


def _split_bf16(x):
  """x ≈ hi + lo with both halves bfloat16: 16 mantissa bits between them."""
  hi = x.astype(jnp.bfloat16)
  return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _pooled_logits_kernel(q_means_ref, k_means_ref, logits_ref, *, scale, n_q, n_kv):
  rows = pl.program_id(0) * _Q_TILE + jnp.arange(_Q_TILE)
  cols = pl.program_id(1) * _KV_TILE + jnp.arange(_KV_TILE)
  q_hi, q_lo = _split_bf16(pltriton.load(q_means_ref, mask=(rows < n_q)[:, None], other=0.0))
  k_hi, k_lo = _split_bf16(pltriton.load(k_means_ref, mask=(cols < n_kv)[:, None], other=0.0))
  # Three bf16 tensor-core products carry ~fp32 accuracy (relative error ~1e-5); a true fp32 dot in
  # Triton runs on the FMA units and was 10x slower here at head_dim 128.
  dot = lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  logits = dot(q_hi, k_hi) + (dot(q_hi, k_lo) + dot(q_lo, k_hi))
  pltriton.store(logits_ref, logits * scale, mask=(rows < n_q)[:, None] & (cols < n_kv)[None, :])


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def pooled_logits(q_means, k_means, *, scale, interpret=False):
  """q_means: f32 [batch, heads, n_q, dim], k_means: f32 [batch, heads, n_kv, dim] -> scale·q̄k̄ᵀ, f32 [batch, heads, n_q, n_kv]."""
  batch, heads, n_q, dim = q_means.shape
  n_kv = k_means.shape[2]
  return pl.pallas_call(
      functools.partial(_pooled_logits_kernel, scale=scale, n_q=n_q, n_kv=n_kv),
      grid=(pl.cdiv(n_q, _Q_TILE), pl.cdiv(n_kv, _KV_TILE), batch * heads),
      in_specs=[pl.BlockSpec((None, _Q_TILE, dim), lambda i, j, bh: (bh, i, 0)),
                pl.BlockSpec((None, _KV_TILE, dim), lambda i, j, bh: (bh, j, 0))],
      out_specs=pl.BlockSpec((None, _Q_TILE, _KV_TILE), lambda i, j, bh: (bh, i, j)),
      out_shape=jax.ShapeDtypeStruct((batch * heads, n_q, n_kv), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="pooled_block_logits",
  )(q_means.reshape(batch * heads, n_q, dim), k_means.reshape(batch * heads, n_kv, dim)).reshape(
      batch, heads, n_q, n_kv)


def pooled_block_logits(q, k, *, block_q, block_kv, scale, interpret=False):
  """scale·q̄k̄ᵀ for the block mask. q: [batch, q_len, heads, dim], k: [batch, kv_len, heads, dim].

  Returns float32 [batch, heads, ceil(q_len/block_q), ceil(kv_len/block_kv)]; P̄ is its row softmax.
  """
  return pooled_logits(block_means(q, block=block_q, interpret=interpret),
                       block_means(k, block=block_kv, interpret=interpret), scale=scale, interpret=interpret)


def pooled_block_probs(q, k, *, block_q, block_kv, scale, interpret=False):
  """P̄ = row softmax of `pooled_block_logits`."""
  return jax.nn.softmax(pooled_block_logits(q, k, block_q=block_q, block_kv=block_kv, scale=scale,
                                            interpret=interpret), axis=-1)
