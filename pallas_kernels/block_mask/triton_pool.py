"""Pooled block scores for the block mask, as Pallas Triton kernels.

`block_means_pair` reads Q and K once and writes the mean of the valid tokens of every block of each;
`pooled_logits` takes those means and writes scale·q̄k̄ᵀ, one (query tile, key tile) pair per program, query
head n against kv head n // G. The row softmax and the Top-k ∪ Top-p selection follow in `triton_select`
(`select_blocks_from_logits`), or in `reference.select_blocks_from_probs` in plain JAX.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.varying import shape_dtype, varying_axes


def _block_mean(x_ref, start, *, block, seq, length_ref):
  """Mean of the valid tokens of x_ref's block ([block, dim]) that starts at token `start`; 0 if none.

  Valid: below `seq`, and below the batch's length where `length_ref` holds one.
  """
  limit = seq if length_ref is None else jnp.minimum(length_ref[0], seq)
  pos = start + jnp.arange(block)
  x = pltriton.load(x_ref, mask=(pos < limit)[:, None], other=0.0).astype(jnp.float32)
  count = jnp.clip(limit - start, 1, block).astype(jnp.float32)
  return x.sum(axis=0) / count


def _block_means_pair_kernel(*refs, block_q, block_kv, q_len, kv_len, n_q, kv_heads, q_lengths, kv_lengths):
  refs = list(refs)
  q_length_ref = refs.pop(0) if q_lengths else None
  kv_length_ref = refs.pop(0) if kv_lengths else None
  q_ref, k_ref, q_out_ref, k_out_ref = refs
  h, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i < n_q)
  def _():
    q_out_ref[...] = _block_mean(q_ref, i * block_q, block=block_q, seq=q_len, length_ref=q_length_ref)

  # With grouped heads the grid spans the query heads; only the first kv_heads of them pool K.
  k_program = (i >= n_q) if kv_heads is None else (i >= n_q) & (h < kv_heads)

  @pl.when(k_program)
  def _():
    k_out_ref[...] = _block_mean(k_ref, (i - n_q) * block_kv, block=block_kv, seq=kv_len, length_ref=kv_length_ref)


def _lengths_input(lengths, index_map):
  if lengths is None:
    return (), ()
  return (lengths.astype(jnp.int32).reshape(-1, 1),), (pl.BlockSpec((None, 1), index_map),)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "interpret"))
def block_means_pair(q, k, *, block_q, block_kv, q_seq_lengths=None, kv_seq_lengths=None, interpret=False):
  """Means of the valid tokens of every block of q and of k (the last block may be partial), float32.

  q: [batch, q_len, heads, dim], k: [batch, kv_len, kv_heads, dim]; q_seq_lengths, kv_seq_lengths: int32
  [batch] or None: tokens from the length on are not valid. Returns (q means [batch, heads, n_q, dim],
  k means [batch, kv_heads, n_kv, dim]); a block with no valid token gives 0. One launch for both (one
  grid: q's blocks, then k's), so neither waits on the other's last wave. Programs that run together read
  the heads of one block, which lie side by side in memory.
  """
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  n_q, n_kv = pl.cdiv(q_len, block_q), pl.cdiv(kv_len, block_kv)
  # Programs of one kind still name a block of the other input, clamped in range, and never read it.
  q_block = lambda i: jnp.minimum(i, n_q - 1)
  k_block = lambda i: jnp.maximum(i - n_q, 0)
  k_head = (lambda h: h) if kv_heads == heads else (lambda h: jnp.minimum(h, kv_heads - 1))
  q_lengths, q_length_specs = _lengths_input(q_seq_lengths, lambda h, i, b: (b, 0))
  kv_lengths, kv_length_specs = _lengths_input(kv_seq_lengths, lambda h, i, b: (b, 0))
  kernel = functools.partial(
    _block_means_pair_kernel,
    block_q=block_q,
    block_kv=block_kv,
    q_len=q_len,
    kv_len=kv_len,
    n_q=n_q,
    kv_heads=None if kv_heads == heads else kv_heads,
    q_lengths=q_seq_lengths is not None,
    kv_lengths=kv_seq_lengths is not None,
  )
  axes = varying_axes(q, k, q_seq_lengths, kv_seq_lengths)
  return pl.pallas_call(
    kernel,
    grid=(heads, n_q + n_kv, batch),
    in_specs=[
      *q_length_specs,
      *kv_length_specs,
      pl.BlockSpec((None, block_q, None, dim), lambda h, i, b: (b, q_block(i), h, 0)),
      pl.BlockSpec((None, block_kv, None, dim), lambda h, i, b: (b, k_block(i), k_head(h), 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, None, None, dim), lambda h, i, b: (b, h, q_block(i), 0)),
      pl.BlockSpec((None, None, None, dim), lambda h, i, b: (b, k_head(h), k_block(i), 0)),
    ],
    out_shape=[
      shape_dtype((batch, heads, n_q, dim), jnp.float32, axes),
      shape_dtype((batch, kv_heads, n_kv, dim), jnp.float32, axes),
    ],
    compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
    interpret=interpret,
    name="block_means",
  )(*q_lengths, *kv_lengths, q, k)


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
  # Triton runs on the FMA units and was much slower here (benchmarks/NOTES.md).
  dot = lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  logits = dot(q_hi, k_hi) + (dot(q_hi, k_lo) + dot(q_lo, k_hi))
  pltriton.store(logits_ref, logits * scale, mask=(rows < n_q)[:, None] & (cols < n_kv)[None, :])


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "q_tile", "kv_tile", "num_warps"))
def pooled_logits(q_means, k_means, *, scale, interpret=False, q_tile=128, kv_tile=64, num_warps=4):
  """scale·q̄k̄ᵀ: q_means f32 [batch, heads, n_q, dim], k_means f32 [batch, kv_heads, n_kv, dim] -> f32 [batch, heads, n_q, n_kv].

  Query head n is scored against kv head n // (heads // kv_heads). q_tile × kv_tile logits per program
  (powers of two ≥ 16); the defaults were the fastest measured (benchmarks/NOTES.md).
  """
  batch, heads, n_q, dim = q_means.shape
  kv_heads, n_kv = k_means.shape[1], k_means.shape[2]
  group = heads // kv_heads
  kv_row = (lambda bh: bh) if group == 1 else (lambda bh: (bh // heads) * kv_heads + (bh % heads) // group)
  return pl.pallas_call(
    functools.partial(_pooled_logits_kernel, scale=scale, n_q=n_q, n_kv=n_kv, q_tile=q_tile, kv_tile=kv_tile),
    grid=(pl.cdiv(n_q, q_tile), pl.cdiv(n_kv, kv_tile), batch * heads),
    in_specs=[
      pl.BlockSpec((None, q_tile, dim), lambda i, j, bh: (bh, i, 0)),
      pl.BlockSpec((None, kv_tile, dim), lambda i, j, bh: (kv_row(bh), j, 0)),
    ],
    out_specs=pl.BlockSpec((None, q_tile, kv_tile), lambda i, j, bh: (bh, i, j)),
    out_shape=shape_dtype((batch * heads, n_q, n_kv), jnp.float32, varying_axes(q_means, k_means)),
    compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
    interpret=interpret,
    name="pooled_block_logits",
  )(q_means.reshape(batch * heads, n_q, dim), k_means.reshape(batch * kv_heads, n_kv, dim)).reshape(
    batch, heads, n_q, n_kv
  )


def pooled_block_logits(q, k, *, block_q, block_kv, scale, q_seq_lengths=None, kv_seq_lengths=None, interpret=False):
  """scale·q̄k̄ᵀ for the block mask. q: [batch, q_len, heads, dim], k: [batch, kv_len, kv_heads, dim].

  Returns float32 [batch, heads, ceil(q_len/block_q), ceil(kv_len/block_kv)], as
  `reference.pooled_block_logits_reference`.
  """
  dim = q.shape[-1]
  padded = max(16, pl.next_power_of_2(dim))
  if padded != dim:  # Triton tiles need power-of-two sizes; zero columns change neither means nor products
    pad = ((0, 0), (0, 0), (0, 0), (0, padded - dim))
    q, k = jnp.pad(q, pad), jnp.pad(k, pad)
  q_means, k_means = block_means_pair(
    q,
    k,
    block_q=block_q,
    block_kv=block_kv,
    q_seq_lengths=q_seq_lengths,
    kv_seq_lengths=kv_seq_lengths,
    interpret=interpret,
  )
  return pooled_logits(q_means, k_means, scale=scale, interpret=interpret)


def pooled_block_probs(q, k, *, block_q, block_kv, scale, interpret=False):
  """P̄ = row softmax of `pooled_block_logits` (every block allowed)."""
  return jax.nn.softmax(
    pooled_block_logits(q, k, block_q=block_q, block_kv=block_kv, scale=scale, interpret=interpret), axis=-1
  )
