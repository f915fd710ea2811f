"""How a Wan layer's attention runs: dense or sparse, per-layer sparsity, batch and sequence sharding.

`WanModel` calls `attend` for self-attention and `cross_attend_sharded` for cross-attention under sequence
parallelism. Each dispatches to `sparge_jax.attention` (dense_attention or sparse_attention) or to
`sparge_jax.parallel` (Ulysses, ring, USP), under `jax.shard_map` when the batch or the tokens are split
over mesh axes (the kernels are opaque to XLA's sharding propagation).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparge_jax import attention as sparge_attention
from sparge_jax import parallel
from sparge_jax.config import AttentionConfig
from sparge_jax.parallel import ulysses as ulysses_layout


class LayerSparsity(NamedTuple):
  """Per-layer values of the sparse self-attention rule, as (traced) arrays.

  topk, topp: float32 [num_layers, heads] in [0, 1] for `WanModel`; a block's slice [heads] for `Attention`.
  """

  topk: jax.Array
  topp: jax.Array


class SequenceSharding(NamedTuple):
  """How the tokens are split over the mesh (`WanConfig.sequence_axes`), as `WanModel` decides per call.

  axes: the mesh axes, in the order the token axis is sharded over them; scheme: `sequence_parallel`;
  devices: their product; tokens: the true token count; padded: the count after padding at the end;
  lengths: int32 [batch] of `tokens` where padded, else None.
  """

  axes: tuple[str, ...]
  scheme: str
  devices: int
  tokens: int
  padded: int
  lengths: jax.Array | None

  def specs(self, batch_axes: tuple[str, ...]):
    """(spec of [batch, tokens, ...] arrays, spec of [batch, ...] arrays)."""
    batch = batch_axes or None
    return P(batch, self.axes if len(self.axes) > 1 else self.axes[0]), P(batch)


def fractions(attention: AttentionConfig, sparsity: LayerSparsity | None, heads: int):
  """(topk, topp) as float32 arrays (scalars or [heads]): the layer's `sparsity` if given."""
  topk, topp = (jnp.asarray(p, jnp.float32) for p in (attention.topk, attention.topp))
  if sparsity is not None:
    topk, topp = sparsity
  for name, p in (("topk", topk), ("topp", topp)):
    if getattr(p, "shape", ()) not in ((), (heads,)):
      raise ValueError(f"attention.{name} must be a float or {heads} per-head values, got shape {p.shape}")
  return topk, topp


def attend_sequence_parallel(q, k, v, attention, batch_axes, sparsity, sequence: SequenceSharding):
  """`attend` with the tokens split over `sequence.axes` (`WanModel` decides the sharding per call)."""
  tokens, examples = sequence.specs(batch_axes)
  axis_names = set(batch_axes) | set(sequence.axes)
  heads = q.shape[2]
  no_sparsity = jnp.zeros(q.shape[:1] + q.shape[2:3], jnp.float32)
  dense = attention.kind == "dense" and sparsity is None
  # check_vma off: cuDNN attention inside shard_map at check_vma=True has not been run on a GPU yet.
  shard_map = functools.partial(jax.shard_map, axis_names=axis_names, check_vma=False)
  if dense and sequence.scheme == "ulysses" and sequence.lengths is None and heads % sequence.devices == 0:
    axis = sequence.axes[0]

    def dense_ulysses(q, k, v):
      heads_of = lambda x: ulysses_layout.to_heads(x, axis)
      return ulysses_layout.to_sequence(sparge_attention.dense_attention(heads_of(q), heads_of(k), heads_of(v)), axis)

    return shard_map(dense_ulysses, in_specs=(tokens,) * 3, out_specs=tokens)(q, k, v), no_sparsity
  # Dense otherwise: the sparse kernels keeping every block (topk = 1).
  topk, topp = (jnp.float32(1.0), jnp.float32(1.0)) if dense else fractions(attention, sparsity, heads)
  settings = dict(
    mode="topk" if dense else attention.mode,
    block_q=attention.block_q,
    block_kv=attention.block_kv,
    implementation=attention.implementation,
    return_stats=True,
  )
  axes = sequence.axes

  def local(q, k, v, topk, topp, lengths):
    kwargs = dict(settings, topk=topk, topp=topp, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    if sequence.scheme == "usp":
      out, stats = parallel.usp_attention(q, k, v, ulysses_axis=axes[0], ring_axis=axes[1], **kwargs)
    else:
      scheme = parallel.ulysses_attention if sequence.scheme == "ulysses" else parallel.ring_attention
      out, stats = scheme(q, k, v, axis_name=axes[0], **kwargs)
    return out, stats["kept_blocks"]

  out, kept = shard_map(local, in_specs=(tokens, tokens, tokens, P(), P(), examples), out_specs=(tokens, examples))(
    q, k, v, topk, topp, sequence.lengths
  )
  if dense:
    return out, no_sparsity
  blocks = -(-sequence.tokens // attention.block_q) * -(-sequence.tokens // attention.block_kv)
  return out, 1.0 - kept.astype(jnp.float32) / blocks


def cross_attend_sharded(q, k, v, batch_axes, sequence: SequenceSharding):
  """Dense cross-attention of sequence-split queries to the whole text on every device."""
  tokens, examples = sequence.specs(batch_axes)
  out = jax.shard_map(
    lambda q, k, v: sparge_attention.dense_attention(q, k, v),
    in_specs=(tokens, examples, examples),
    out_specs=tokens,
    axis_names=set(batch_axes) | set(sequence.axes),
    check_vma=False,
  )(q, k, v)
  return out, jnp.zeros(q.shape[:1] + q.shape[2:3], jnp.float32)


def attend(
  q,
  k,
  v,
  attention: AttentionConfig,
  batch_axes: tuple[str, ...] = (),
  sparsity: LayerSparsity | None = None,
  sequence: SequenceSharding | None = None,
):
  """q, k, v: [batch, seq, heads, head_dim] -> (out like q, sparsity float32 [batch, heads]).

  `sparsity` (topk, topp [heads], may be traced) makes the attention sparse whatever `attention.kind`.
  With `batch_axes`, each device attends over its own examples (`jax.shard_map` over those axes of
  the context mesh): attention is independent per example, and XLA cannot partition the kernels. With
  `sequence`, the devices along its axes share each example's tokens (`sparge_jax.parallel`).
  """
  if sequence is not None:
    return attend_sequence_parallel(q, k, v, attention, batch_axes, sparsity, sequence)
  if batch_axes:
    spec = P(batch_axes)
    return jax.shard_map(
      lambda q, k, v, sparsity: attend(q, k, v, attention, sparsity=sparsity),
      in_specs=(spec, spec, spec, P()),
      out_specs=(spec, spec),
      axis_names=set(batch_axes),
      # cuDNN attention inside shard_map at check_vma=True has not been run on a GPU yet.
      check_vma=False,
    )(q, k, v, sparsity)
  if attention.kind == "dense" and sparsity is None:
    return sparge_attention.dense_attention(q, k, v), jnp.zeros(q.shape[:1] + q.shape[2:3], jnp.float32)
  topk, topp = fractions(attention, sparsity, q.shape[2])
  out, stats = sparge_attention.sparse_attention(
    q,
    k,
    v,
    topk=topk,
    topp=topp,
    mode=attention.mode,
    block_q=attention.block_q,
    block_kv=attention.block_kv,
    implementation=attention.implementation,
    return_stats=True,
  )
  return out, stats["sparsity"].astype(jnp.float32)
