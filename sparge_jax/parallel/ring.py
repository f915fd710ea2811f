"""Ring attention over one mesh axis: q stays on its device, the k/v shards rotate, partial results merge by lse.

Layout. Ring shard r holds `chunks` runs of `chunk` tokens; run u is global chunk u · ring + r. Plain ring
attention has one run per shard (shard r is the r-th slice of the sequence); in USP the Ulysses
all-to-all gathers one run from each Ulysses device. Blocks are cut from the local arrays (the kernels'
blocking); with one run per shard they are the global blocks when the shard length is a block multiple, and
otherwise blocks aligned to the shards, the last of each shard partial.

The mask. Each device pools its q blocks and its k blocks, gathers the pooled k of every shard once (tiny),
and builds its rows of the block mask over every kv block of the sequence, in global order, with the same
pieces as `sparge_jax.attention.block_mask` (XLA or the Triton mask kernels): the Top-k count runs over
the whole row, and causal masking and the lengths use global positions. So, wherever the blocks are the
global blocks, it is the unsharded mask, row for row.

The attention. Step s attends the shard that arrived after s rotations with that shard's mask columns
(skipped under `lax.cond` when they keep nothing for any local row; the shard is passed on either way), and
merges the result into the running output by log-sum-exp. The backward (one `jax.custom_vjp`) rotates the
shards again: each step runs the backend's backward against the final output and lse, which is exact, and
dK/dV travel with their shard, accumulating in float32, one more rotation bringing them home.

Causal masking needs q_len == kv_len. Shard r's pairing with itself comes first and takes the kernels'
causal masking: its local order is the global order. Every other pairing is all before or all after in each
block pair, which the mask alone decides.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values
from jax.experimental import pallas as pl

from pallas_kernels.block_mask import reference as mask_reference
from pallas_kernels.block_mask import triton_pool, triton_select
from pallas_kernels.block_mask.index_table import transposed_mask
from pallas_kernels.varying import vary, varying_axes
from sparge_jax import attention_core as core
from sparge_jax import backends, config


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the tokens of a ring shard lie in the global sequence (see the module docstring)."""

  ring: int
  chunks: int
  chunk: int

  @property
  def local(self) -> int:
    return self.chunks * self.chunk

  @property
  def total(self) -> int:
    return self.ring * self.local

  def blocks(self, block: int):
    """(base, size), int32 numpy [n_local_blocks]: local block b of shard r starts at global token
    base[b] + r · chunk and holds size[b] tokens."""
    start = np.arange(-(-self.local // block)) * block
    run = start // self.chunk
    within = start - run * self.chunk
    return (run * self.ring * self.chunk + within).astype(np.int32), np.minimum(block, self.chunk - within)

  def local_length(self, lengths, shard):
    """Tokens of `shard` below the global `lengths` (int32 [batch]): a prefix of its local sequence."""
    starts = (jnp.arange(self.chunks, dtype=jnp.int32) * self.ring + shard) * self.chunk
    return jnp.sum(jnp.clip(lengths[:, None] - starts[None, :], 0, self.chunk), axis=1, dtype=jnp.int32)


@functools.cache
def kv_columns(layout: Layout, block_kv: int):
  """(order, inverse, starts): the kv blocks of every shard, flattened (shard, local block), sorted by their
  global start (`order`), the inverse permutation, and the sorted global starts (int32 numpy)."""
  base, _ = layout.blocks(block_kv)
  starts = (base[None, :] + np.arange(layout.ring)[:, None] * layout.chunk).reshape(-1)
  order = np.argsort(starts, kind="stable")
  return order, np.argsort(order), starts[order].astype(np.int32)


# ------------------------------------------------------------------------------------------- the mask


def _limits(q_layout, kv_starts, shard, *, block_q, q_lengths, kv_lengths, is_causal, kv_total):
  """`mask_reference.kv_block_limits` for this shard's q blocks over the globally ordered kv blocks."""
  if q_lengths is None and kv_lengths is None and not is_causal:
    return None, None
  base, size = q_layout.blocks(block_q)
  q_start = jnp.asarray(base) + shard * q_layout.chunk  # [n_q]
  total = lambda lengths, n: jnp.full((1, 1), n, jnp.int32) if lengths is None else lengths.reshape(-1, 1)
  q_limit, kv_limit = total(q_lengths, q_layout.total), total(kv_lengths, kv_total)
  bound = jnp.broadcast_to(kv_limit, jnp.broadcast_shapes(kv_limit.shape, q_start[None].shape))
  if is_causal:  # blocks that start after the q block's last valid query
    bound = jnp.minimum(bound, jnp.minimum(q_start + jnp.asarray(size), q_limit))
  starts = jnp.asarray(kv_starts)
  limit = jnp.sum(starts < bound[..., None], axis=-1, dtype=jnp.int32)
  limit = jnp.where(q_start < q_limit, limit, 0)
  if not is_causal:
    return limit, None
  # The block that holds the q block's first query (or the last valid key, if that lies before it).
  anchor = jnp.sum(starts <= jnp.minimum(q_start, kv_limit - 1)[..., None], axis=-1, dtype=jnp.int32) - 1
  return limit, jnp.where(limit > 0, anchor, -1)


def _pooled_logits_reference(q_means, k_means, scale):
  """`mask_reference.pooled_block_logits_reference` from the means: query head n against kv head n // G."""
  batch, heads, n_q, dim = q_means.shape
  kv_heads = k_means.shape[1]
  q_means = q_means.reshape(batch, kv_heads, heads // kv_heads, n_q, dim)
  scores = jnp.einsum("bkgid,bkjd->bkgij", q_means, k_means, precision=lax.Precision.HIGHEST)
  return scores.reshape(batch, heads, n_q, -1) * scale


def global_rows(q, k, topk, topp, q_lengths, kv_lengths, *, axis, q_layout, kv_layout, settings, implementation):
  """This shard's rows of the block mask over every kv block of the sequence, in global order.

  q: [batch, q_local, heads, head_dim], k: [batch, kv_local, kv_heads, head_dim], local; lengths: global
  int32 [batch] or None, clipped. Returns bool [batch, heads, n_q_local_blocks, ring · n_kv_local_blocks].
  implementation: "xla" or "triton" (`backends.mask_implementation`).
  """
  block_q, block_kv = settings.block_q, settings.block_kv
  shard = lax.axis_index(axis) if q_layout.ring > 1 else 0
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  topk, topp = config.clamp_fractions(topk), config.clamp_fractions(topp)
  q_local = None if q_lengths is None else q_layout.local_length(q_lengths, shard)
  kv_local = None if kv_lengths is None else kv_layout.local_length(kv_lengths, shard)
  if implementation == "xla":
    q_means = mask_reference.block_means_reference(q, block_q, q_local)
    k_means = mask_reference.block_means_reference(k, block_kv, kv_local)
  else:
    dim = q.shape[-1]
    padded = max(16, pl.next_power_of_2(dim))
    if padded != dim:  # as `triton_pool.pooled_block_logits`
      pad = ((0, 0), (0, 0), (0, 0), (0, padded - dim))
      q, k = jnp.pad(q, pad), jnp.pad(k, pad)
    q_means, k_means = triton_pool.block_means_pair(
      q,
      k,
      block_q=block_q,
      block_kv=block_kv,
      q_seq_lengths=q_local,
      kv_seq_lengths=kv_local,
      interpret=settings.interpret,
    )
  if kv_layout.ring > 1:
    k_means = lax.all_gather(k_means, axis, axis=2, tiled=True)  # [batch, kv_heads, ring · n_kv, dim]
  order, _, kv_starts = kv_columns(kv_layout, block_kv)
  if np.any(order != np.arange(order.size)):
    k_means = jnp.take(k_means, jnp.asarray(order), axis=2)
  limit, anchor = _limits(
    q_layout,
    kv_starts,
    shard,
    block_q=block_q,
    q_lengths=q_lengths,
    kv_lengths=kv_lengths,
    is_causal=settings.is_causal,
    kv_total=kv_layout.total,
  )
  if implementation == "xla":
    logits = _pooled_logits_reference(q_means, k_means, settings.scale)
    allowed = True if limit is None else mask_reference.allowed_blocks(limit, logits.shape[-1])[:, None]
    probs = mask_reference.masked_softmax(logits, allowed)
    return mask_reference.select_blocks_from_probs(
      probs, topk, topp, settings.mode, kv_block_limit=limit, anchor=anchor
    )
  logits = triton_pool.pooled_logits(q_means, k_means, scale=settings.scale, interpret=settings.interpret)
  return triton_select.select_blocks_from_logits(
    logits, topk, topp, settings.mode, kv_block_limit=limit, anchor=anchor, interpret=settings.interpret
  )


def local_columns(mask, kv_layout: Layout, block_kv: int):
  """A globally ordered mask's columns in (shard, local block) order, the order the ring visits them."""
  _, inverse, _ = kv_columns(kv_layout, block_kv)
  return mask if np.all(inverse == np.arange(inverse.size)) else jnp.take(mask, jnp.asarray(inverse), axis=-1)


# -------------------------------------------------------------------------------------- the attention


@dataclasses.dataclass(frozen=True)
class Ring:
  """The static half of one ring attention call."""

  kernel: core.Kernel
  axis: str
  kv_layout: Layout

  @property
  def size(self) -> int:
    return self.kv_layout.ring


def _merge(out, lse, step_out, step_lse):
  """Two partial results over disjoint keys -> their combination (out float32 [B, T, N, H], lse [B, N, T])."""
  top = jnp.maximum(lse, step_lse)
  top = jnp.where(jnp.isneginf(top), 0.0, top)
  weight, step_weight = jnp.exp(lse - top), jnp.exp(step_lse - top)
  total = weight + step_weight
  scale = lambda w: (w / jnp.where(total == 0, 1.0, total)).swapaxes(1, 2)[..., None]
  out = out.astype(jnp.float32) * scale(weight) + step_out.astype(jnp.float32) * scale(step_weight)
  return out, jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def _skippable(run, skipped, cols, *operands):
  """run(*operands), or `skipped` (zeros of its shapes) where `cols` keeps no block; same varying axes."""
  axes = varying_axes(operands, cols)
  compute = lambda *a: jax.tree.map(lambda x: vary(x, axes), run(*a))
  skip = lambda *a: jax.tree.map(lambda x: vary(x, axes), skipped())
  return lax.cond(jnp.any(cols), compute, skip, *operands)


@functools.cache
def ring_vjp(ring: Ring):
  """(q, k, v, kv_lengths, mask) -> (out [B, T, N, H], lse float32 [B, N, T]), differentiable in q, k, v.

  mask: bool [B, N, n_q, ring · n_kv], columns in visiting order (`local_columns`); kv_lengths: global
  int32 [B] or None. Runs inside `jax.shard_map` over `ring.axis`.
  """
  kernel, size, layout = ring.kernel, ring.size, ring.kv_layout
  backend = backends.TABLE[kernel.backend]
  n_kv = -(-layout.local // kernel.block_kv)
  perm = [(i, (i + 1) % size) for i in range(size)]
  rotate = lambda x: lax.ppermute(x, ring.axis, perm)

  def kwargs(step):  # only a shard's pairing with itself crosses the diagonal
    return backend.kernel_kwargs(
      block_q=kernel.block_q,
      block_kv=kernel.block_kv,
      scale=kernel.scale,
      is_causal=kernel.is_causal and step == 0,
      interpret=kernel.interpret,
    )

  def visiting(mask, kv_lengths, step):
    """The mask columns and local kv lengths of the shard a device holds after `step` rotations."""
    if size == 1:
      return mask, kv_lengths
    shard = (lax.axis_index(ring.axis) - step) % size
    cols = lax.dynamic_slice_in_dim(mask, shard * n_kv, n_kv, axis=3)
    return cols, None if kv_lengths is None else layout.local_length(kv_lengths, shard)

  def step_forward(step, q, k, v, cols, lengths):
    table = backend.index_table(cols, interpret=kernel.interpret)
    return backend.forward(q, k, v, *table, kv_seq_lengths=lengths, **kwargs(step))

  def step_backward(step, q, k, v, out, lse, d_out, d_lse, cols, lengths):
    forward_table = backend.index_table(cols, interpret=kernel.interpret)
    backward_table = backend.index_table(transposed_mask(cols, kernel.kv_heads), interpret=kernel.interpret)
    return backend.backward(
      q, k, v, out, lse, d_out, d_lse, *forward_table, *backward_table, kv_seq_lengths=lengths, **kwargs(step)
    )

  def forward(q, k, v, kv_lengths, mask):
    out = lse = None
    for step in range(size):
      cols, lengths = visiting(mask, kv_lengths, step)
      if step + 1 < size:  # issued before this step's kernel, so the transfer overlaps it
        k_next, v_next = rotate((k, v))
      if step == 0:
        out, lse = step_forward(step, q, k, v, cols, lengths)
      else:
        nothing = lambda: (jnp.zeros(q.shape, q.dtype), jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf))
        run = functools.partial(step_forward, step)
        out, lse = _merge(out, lse, *_skippable(run, nothing, cols, q, k, v, cols, lengths))
      if step + 1 < size:
        k, v = k_next, v_next
    return out.astype(q.dtype), lse

  @jax.custom_vjp
  def attention(q, k, v, kv_lengths, mask):
    return forward(q, k, v, kv_lengths, mask)

  def attention_fwd(q, k, v, kv_lengths, mask):
    q, k, v, kv_lengths, mask = custom_vjp_primal_tree_values((q, k, v, kv_lengths, mask))
    out, lse = forward(q, k, v, kv_lengths, mask)
    return (out, lse), (q, k, v, kv_lengths, mask, out, lse)

  def attention_bwd(residuals, cotangents):
    q, k, v, kv_lengths, mask, out, lse = residuals
    d_out, d_lse = cotangents
    # Symbolic zeros: a loss that ignores lse passes no d_lse, and the kernels skip its term.
    d_out = jnp.zeros_like(out) if isinstance(d_out, SymbolicZero) else d_out
    d_lse = None if isinstance(d_lse, SymbolicZero) else d_lse
    if size == 1:  # nothing to accumulate or to send
      return (*step_backward(0, q, k, v, out, lse, d_out, d_lse, mask, kv_lengths), None, None)
    dq = jnp.zeros(q.shape, jnp.float32)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for step in range(size):
      cols, lengths = visiting(mask, kv_lengths, step)
      if step + 1 < size:
        k_next, v_next = rotate((k, v))
      if step == 0:
        grads = step_backward(step, q, k, v, out, lse, d_out, d_lse, cols, lengths)
      else:
        nothing = lambda: (jnp.zeros(q.shape, q.dtype), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
        run = functools.partial(step_backward, step)
        grads = _skippable(run, nothing, cols, q, k, v, out, lse, d_out, d_lse, cols, lengths)
      dq, dk, dv = (a + g.astype(jnp.float32) for a, g in zip((dq, dk, dv), grads))
      dk, dv = rotate((dk, dv))  # dK/dV travel with their shard; after the last step this brings them home
      if step + 1 < size:
        k, v = k_next, v_next
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

  attention.defvjp(attention_fwd, attention_bwd, symbolic_zeros=True)
  return attention
