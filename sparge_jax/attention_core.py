"""The traced core of the attention API: the block mask and block-sparse attention on one backend.

`sparge_jax.attention` validates the arguments and resolves the backend (once per call, through
`sparge_jax.backends`); the jitted functions here then build the mask, the index tables and one
`jax.custom_vjp` around the backend's forward and backward, which returns lse as well as the output and
takes the lse cotangent in its backward (with symbolic zeros, so a loss that ignores lse pays nothing).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

from pallas_kernels.block_mask import reference as mask_reference
from pallas_kernels.block_mask import triton_pool, triton_select
from pallas_kernels.block_mask.index_table import transposed_mask
from sparge_jax import backends, config

# The lse jax.nn gives a query row that attends no key: its large negative logit (-0.7 · float32 max).
PADDED_ROW_LSE = float(np.float32(-0.7 * np.finfo(np.float32).max))


@dataclasses.dataclass(frozen=True)
class Kernel:
  """The static half of one attention call: the backend and everything its kernels are compiled for."""

  backend: str
  block_q: int
  block_kv: int
  scale: float
  is_causal: bool
  interpret: bool
  kv_heads: int


# --------------------------------------------------------------------------------------- the vjp


@functools.cache
def attention_vjp(kernel: Kernel):
  """(q, k, v, kv_lengths, mask) -> (out [B, T, N, H], lse float32 [B, N, T]), differentiable in q, k, v."""
  backend = backends.TABLE[kernel.backend]
  kwargs = backend.kernel_kwargs(
    block_q=kernel.block_q,
    block_kv=kernel.block_kv,
    scale=kernel.scale,
    is_causal=kernel.is_causal,
    interpret=kernel.interpret,
  )

  def forward(q, k, v, kv_lengths, mask):
    forward_table = backend.index_table(mask, interpret=kernel.interpret)
    out, lse = backend.forward(q, k, v, *forward_table, kv_seq_lengths=kv_lengths, **kwargs)
    return (out, lse), forward_table

  @jax.custom_vjp
  def attention(q, k, v, kv_lengths, mask):
    return forward(q, k, v, kv_lengths, mask)[0]

  def attention_fwd(q, k, v, kv_lengths, mask):
    q, k, v, kv_lengths, mask = custom_vjp_primal_tree_values((q, k, v, kv_lengths, mask))
    (out, lse), forward_table = forward(q, k, v, kv_lengths, mask)
    return (out, lse), (q, k, v, kv_lengths, mask, out, lse, forward_table)

  def attention_bwd(residuals, cotangents):
    q, k, v, kv_lengths, mask, out, lse, forward_table = residuals
    d_out, d_lse = cotangents
    # Symbolic zeros: a loss that ignores lse passes no d_lse, and the kernels skip its term.
    d_out = jnp.zeros_like(out) if isinstance(d_out, SymbolicZero) else d_out
    d_lse = None if isinstance(d_lse, SymbolicZero) else d_lse
    # The dK/dV table (per kv head and kv block: its query heads' q blocks) is built only here.
    backward_table = backend.index_table(transposed_mask(mask, kernel.kv_heads), interpret=kernel.interpret)
    dq, dk, dv = backend.backward(
      q, k, v, out, lse, d_out, d_lse, *forward_table, *backward_table, kv_seq_lengths=kv_lengths, **kwargs
    )
    return dq, dk, dv, None, None

  attention.defvjp(attention_fwd, attention_bwd, symbolic_zeros=True)
  return attention


# --------------------------------------------------------------------------------- traced bodies


def _clipped(lengths, size):
  return None if lengths is None else jnp.clip(lengths, 0, size).astype(jnp.int32)


def _limits(q_len, kv_len, *, block_q, block_kv, q_lengths, kv_lengths, is_causal):
  """(limit, anchor) of `kv_block_limits`, or (None, None) when every block is allowed."""
  if q_lengths is None and kv_lengths is None and not is_causal:
    return None, None
  return mask_reference.kv_block_limits(
    q_len=q_len,
    kv_len=kv_len,
    block_q=block_q,
    block_kv=block_kv,
    q_seq_lengths=q_lengths,
    kv_seq_lengths=kv_lengths,
    is_causal=is_causal,
  )


@functools.partial(
  jax.jit, static_argnames=("mode", "block_q", "block_kv", "scale", "is_causal", "implementation", "interpret")
)
def block_mask(
  q, k, topk, topp, q_lengths, kv_lengths, *, mode, block_q, block_kv, scale, is_causal, implementation, interpret
):
  """bool [B, N, nq, nkv]: the jitted body of `sparge_jax.attention.block_mask` (no gradient flows).

  implementation: "triton" (the Pallas mask kernels: pooling, pooled logits, selection) or "xla" (the
  plain-JAX reference). topk, topp: float32 scalars or [heads], clamped to [0, 1] here.
  """
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  q_lengths, kv_lengths = _clipped(q_lengths, q.shape[1]), _clipped(kv_lengths, k.shape[1])
  topk, topp = config.clamp_fractions(topk), config.clamp_fractions(topp)
  limit, anchor = _limits(
    q.shape[1],
    k.shape[1],
    block_q=block_q,
    block_kv=block_kv,
    q_lengths=q_lengths,
    kv_lengths=kv_lengths,
    is_causal=is_causal,
  )
  if implementation == "xla":
    logits = mask_reference.pooled_block_logits_reference(
      q, k, block_q=block_q, block_kv=block_kv, scale=scale, q_seq_lengths=q_lengths, kv_seq_lengths=kv_lengths
    )
    allowed = True if limit is None else mask_reference.allowed_blocks(limit, logits.shape[-1])[:, None]
    probs = mask_reference.masked_softmax(logits, allowed)
    return mask_reference.select_blocks_from_probs(probs, topk, topp, mode, kv_block_limit=limit, anchor=anchor)
  logits = triton_pool.pooled_block_logits(
    q,
    k,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    q_seq_lengths=q_lengths,
    kv_seq_lengths=kv_lengths,
    interpret=interpret,
  )
  return triton_select.select_blocks_from_logits(
    logits, topk, topp, mode, kv_block_limit=limit, anchor=anchor, interpret=interpret
  )


@functools.partial(jax.jit, static_argnames=("kernel",))
def block_sparse_attention(q, k, v, mask, q_lengths, kv_lengths, *, kernel: Kernel):
  """(out [B, T, N, H] in q's dtype, lse [B, T, N] in q's dtype) with jax.nn's conventions."""
  q_len, kv_len = q.shape[1], k.shape[1]
  q_lengths, kv_lengths = _clipped(q_lengths, q_len), _clipped(kv_lengths, kv_len)
  mask = jax.lax.stop_gradient(mask)
  limit, _ = _limits(
    q_len,
    kv_len,
    block_q=kernel.block_q,
    block_kv=kernel.block_kv,
    q_lengths=q_lengths,
    kv_lengths=kv_lengths,
    is_causal=kernel.is_causal,
  )
  if limit is not None:  # the kernels are never given a block no query of the row may attend
    mask = mask & mask_reference.allowed_blocks(limit, mask.shape[-1])[:, None]
  out, lse = attention_vjp(kernel)(q, k, v, kv_lengths, mask)
  attended = ~jnp.isneginf(lse)
  if q_lengths is not None:
    valid_q = jnp.arange(q_len) < q_lengths[:, None]  # [B, T]
    out = jnp.where(valid_q[:, :, None, None], out, jnp.zeros((), out.dtype))
    attended = attended & valid_q[:, None, :]
  lse = jnp.where(attended, lse, PADDED_ROW_LSE)
  return out, jnp.swapaxes(lse, 1, 2).astype(q.dtype)
