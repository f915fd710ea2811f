"""Pooled block scores for the block mask, as Pallas Triton kernels.

Two passes: `block_means` reads Q (or K) once and writes the mean of the real tokens of every block;
`pooled_probs` takes those means and writes P̄ = row-softmax(scale·q̄ k̄ᵀ) for tiles of query blocks,
walking the key means twice (row max and sum, then the normalised values) so a row never has to fit in
registers. The selection on P̄ (sort, cumulative sum) stays in XLA (`sparge_jax.mask`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)
_MASKED = -1e30
_Q_TILE = 16  # query-block means per program: the smallest tile Triton's dot accepts
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


def _pooled_probs_kernel(q_means_ref, k_means_ref, probs_ref, *, scale, n_q, n_kv):
  rows = pl.program_id(0) * _Q_TILE + jnp.arange(_Q_TILE)
  q_means = pltriton.load(q_means_ref, mask=(rows < n_q)[:, None], other=0.0)
  score_scale = scale * LOG2E
  n_tiles = pl.cdiv(n_kv, _KV_TILE)

  def scores(t):
    cols = t * _KV_TILE + jnp.arange(_KV_TILE)
    k_means = pltriton.load(k_means_ref.at[pl.ds(t * _KV_TILE, _KV_TILE)],
                            mask=(cols < n_kv)[:, None], other=0.0)
    s = lax.dot_general(q_means, k_means, (((1,), (1,)), ((), ())),
                        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return cols, jnp.where((cols < n_kv)[None, :], s * score_scale, _MASKED)

  def stats(t, carry):
    row_max, row_sum = carry
    _, s = scores(t)
    new_max = jnp.maximum(row_max, s.max(axis=1))
    return new_max, row_sum * jnp.exp2(row_max - new_max) + jnp.exp2(s - new_max[:, None]).sum(axis=1)

  row_max, row_sum = lax.fori_loop(
      0, n_tiles, stats, (jnp.full((_Q_TILE,), -jnp.inf, jnp.float32), jnp.zeros((_Q_TILE,), jnp.float32)))

  def write(t, _):
    cols, s = scores(t)
    probs = jnp.exp2(s - row_max[:, None]) / row_sum[:, None]
    pltriton.store(probs_ref.at[:, pl.ds(t * _KV_TILE, _KV_TILE)], probs,
                   mask=(rows < n_q)[:, None] & (cols < n_kv)[None, :])
    return 0

  lax.fori_loop(0, n_tiles, write, 0)


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def pooled_probs(q_means, k_means, *, scale, interpret=False):
  """q_means: f32 [batch, heads, n_q, dim], k_means: f32 [batch, heads, n_kv, dim] -> f32 [batch, heads, n_q, n_kv]."""
  batch, heads, n_q, dim = q_means.shape
  n_kv = k_means.shape[2]
  return pl.pallas_call(
      functools.partial(_pooled_probs_kernel, scale=scale, n_q=n_q, n_kv=n_kv),
      grid=(pl.cdiv(n_q, _Q_TILE), batch, heads),
      in_specs=[pl.BlockSpec((None, None, _Q_TILE, dim), lambda i, b, h: (b, h, i, 0)),
                pl.BlockSpec((None, None, n_kv, dim), lambda i, b, h: (b, h, 0, 0))],
      out_specs=pl.BlockSpec((None, None, _Q_TILE, n_kv), lambda i, b, h: (b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, heads, n_q, n_kv), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="pooled_block_probs",
  )(q_means, k_means)


def pooled_block_probs(q, k, *, block_q, block_kv, scale, interpret=False):
  """P̄ for the block mask. q: [batch, q_len, heads, dim], k: [batch, kv_len, heads, dim].

  Returns float32 [batch, heads, ceil(q_len/block_q), ceil(kv_len/block_kv)].
  """
  return pooled_probs(block_means(q, block=block_q, interpret=interpret),
                      block_means(k, block=block_kv, interpret=interpret),
                      scale=scale, interpret=interpret)
