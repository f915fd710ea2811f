"""Pooled block scores for the block mask, as Pallas Triton kernels.

`block_means_pair` reads Q and K once and writes the mean of the real tokens of every block of each;
`pooled_logits` takes those means and writes scale·q̄k̄ᵀ, one (query tile, key tile) pair per program. The
row softmax and the Top-k ∪ Top-p selection follow in `mask_select` (a kernel) or
`sparge_jax.mask.select_blocks` (XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _block_mean(x_ref, start, *, block, seq):
  """Mean of the real tokens of x_ref's block ([block, dim]) that starts at token `start`."""
  pos = start + jnp.arange(block)
  x = pltriton.load(x_ref, mask=(pos < seq)[:, None], other=0.0).astype(jnp.float32)
  return x.sum(axis=0) / jnp.minimum(block, seq - start).astype(jnp.float32)


def _block_means_pair_kernel(q_ref, k_ref, q_out_ref, k_out_ref, *, block_q, block_kv, q_len, kv_len, n_q):
  i = pl.program_id(1)

  @pl.when(i < n_q)
  def _():
    q_out_ref[...] = _block_mean(q_ref, i * block_q, block=block_q, seq=q_len)

  @pl.when(i >= n_q)
  def _():
    k_out_ref[...] = _block_mean(k_ref, (i - n_q) * block_kv, block=block_kv, seq=kv_len)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "interpret"))
def block_means_pair(q, k, *, block_q, block_kv, interpret=False):
  """Means of the real tokens of every block of q and of k (the last block may be partial), float32.

  q: [batch, q_len, heads, dim], k: [batch, kv_len, heads, dim]. Returns (q means [batch, heads, n_q, dim],
  k means [batch, heads, n_kv, dim]). One launch for both (one grid: q's blocks, then k's), so neither
  waits on the other's last wave: 70 µs at 32,760 × 12 × 128 on an H100 against 73 for two launches and
  72 for XLA summing Q and K. Programs that run together read the heads of one block, which lie side by
  side in memory.
  """
  batch, q_len, heads, dim = q.shape
  kv_len = k.shape[1]
  n_q, n_kv = pl.cdiv(q_len, block_q), pl.cdiv(kv_len, block_kv)
  # Programs of one kind still name a block of the other input, clamped in range, and never read it.
  q_block = lambda i: jnp.minimum(i, n_q - 1)
  k_block = lambda i: jnp.maximum(i - n_q, 0)
  return pl.pallas_call(
    functools.partial(
      _block_means_pair_kernel, block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len, n_q=n_q
    ),
    grid=(heads, n_q + n_kv, batch),
    in_specs=[
      pl.BlockSpec((None, block_q, None, dim), lambda h, i, b: (b, q_block(i), h, 0)),
      pl.BlockSpec((None, block_kv, None, dim), lambda h, i, b: (b, k_block(i), h, 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, None, None, dim), lambda h, i, b: (b, h, q_block(i), 0)),
      pl.BlockSpec((None, None, None, dim), lambda h, i, b: (b, h, k_block(i), 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((batch, heads, n_q, dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, n_kv, dim), jnp.float32),
    ],
    compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
    interpret=interpret,
    name="block_means",
  )(q, k)


def _split_bf16(x):
  """x ≈ hi + lo with both halves bfloat16: 16 mantissa bits between them."""
  hi = x.astype(jnp.bfloat16)
  return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _pooled_logits_kernel(q_means_ref, k_means_ref, logits_ref, *, scale, n_q, n_kv, q_tile, kv_tile):
  rows = pl.program_id(0) * q_tile + jnp.arange(q_tile)
  cols = pl.program_id(1) * kv_tile + jnp.arange(kv_tile)
  q_hi, q_lo = _split_bf16(pltriton.load(q_means_ref, mask=(rows < n_q)[:, None], other=0.0))
  k_hi, k_lo = _split_bf16(pltriton.load(k_means_ref, mask=(cols < n_kv)[:, None], other=0.0))
  # Three bf16 tensor-core products carry ~fp32 accuracy (relative error ~1e-5); a true fp32 dot in
  # Triton runs on the FMA units and was 10x slower here at head_dim 128.
  dot = lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  logits = dot(q_hi, k_hi) + (dot(q_hi, k_lo) + dot(q_lo, k_hi))
  pltriton.store(logits_ref, logits * scale, mask=(rows < n_q)[:, None] & (cols < n_kv)[None, :])


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "q_tile", "kv_tile", "num_warps"))
def pooled_logits(q_means, k_means, *, scale, interpret=False, q_tile=128, kv_tile=64, num_warps=4):
  """q_means: f32 [batch, heads, n_q, dim], k_means: f32 [batch, heads, n_kv, dim] -> scale·q̄k̄ᵀ, f32 [batch, heads, n_q, n_kv].

  q_tile × kv_tile logits per program (powers of two ≥ 16). 128 × 64 was fastest on an H100 (8.5 µs at
  32,760 tokens × 12 heads, against 18 µs for 32 × 64; benchmarks/NOTES.md).
  """
  batch, heads, n_q, dim = q_means.shape
  n_kv = k_means.shape[2]
  return pl.pallas_call(
    functools.partial(_pooled_logits_kernel, scale=scale, n_q=n_q, n_kv=n_kv, q_tile=q_tile, kv_tile=kv_tile),
    grid=(pl.cdiv(n_q, q_tile), pl.cdiv(n_kv, kv_tile), batch * heads),
    in_specs=[
      pl.BlockSpec((None, q_tile, dim), lambda i, j, bh: (bh, i, 0)),
      pl.BlockSpec((None, kv_tile, dim), lambda i, j, bh: (bh, j, 0)),
    ],
    out_specs=pl.BlockSpec((None, q_tile, kv_tile), lambda i, j, bh: (bh, i, j)),
    out_shape=jax.ShapeDtypeStruct((batch * heads, n_q, n_kv), jnp.float32),
    compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
    interpret=interpret,
    name="pooled_block_logits",
  )(q_means.reshape(batch * heads, n_q, dim), k_means.reshape(batch * heads, n_kv, dim)).reshape(
    batch, heads, n_q, n_kv
  )


def pooled_block_logits(q, k, *, block_q, block_kv, scale, interpret=False):
  """scale·q̄k̄ᵀ for the block mask. q: [batch, q_len, heads, dim], k: [batch, kv_len, heads, dim].

  Returns float32 [batch, heads, ceil(q_len/block_q), ceil(kv_len/block_kv)]; P̄ is its row softmax.
  """
  q_means, k_means = block_means_pair(q, k, block_q=block_q, block_kv=block_kv, interpret=interpret)
  return pooled_logits(q_means, k_means, scale=scale, interpret=interpret)


def pooled_block_probs(q, k, *, block_q, block_kv, scale, interpret=False):
  """P̄ = row softmax of `pooled_block_logits`."""
  return jax.nn.softmax(
    pooled_block_logits(q, k, block_q=block_q, block_kv=block_kv, scale=scale, interpret=interpret), axis=-1
  )
