"""Trainable block-sparse attention with SpargeAttention2's hybrid Top-k ∪ Top-p block mask.

A drop-in for `jax.nn.dot_product_attention` (same shapes, arguments and return convention), and an
`attention_fn` for `flax.nnx.MultiHeadAttention`:

    out = dot_product_attention(q, k, v, is_causal=True, topk=0.03)    # q: [B, T, N, H], k, v: [B, S, K, H]
    layer = nnx.MultiHeadAttention(..., attention_fn=make_attention_fn(topk=0.03))

The 4-D pieces underneath ([batch, seq, heads, head_dim]; q may be longer or shorter than k and v):

    out = sparse_attention(q, k, v, topk=0.03, topp=0.2)           # mask + attention, differentiable
    mask = block_mask(q, k, topk=0.03, topp=0.2)                   # bool [batch, heads, n_q_blocks, n_kv_blocks]
    out = block_sparse_attention(q, k, v, mask)                    # attention on the kept blocks only

Query head n attends with kv head n // (N // K) (grouped and multi-query attention). Keys at positions ≥
`key_value_seq_lengths[b]` take no part (not in the output, not in the mask's pooled means); query rows at
positions ≥ `query_seq_lengths[b]` output zeros. `is_causal=True`: query i attends keys j ≤ i (top-left
aligned when T ≠ S); blocks wholly above the diagonal are never kept, and each q block keeps the block that
holds its first query's position. The mask ranks only the blocks a row may attend.

`implementation`: None (auto), "mosaic", "triton" or "xla"; `sparge_jax.backends` says what each needs and
`sparge_jax.backends.explain` which one a call gets. `interpret=True` runs the Pallas kernels on CPU.
Gradients flow to q, k and v through one `jax.custom_vjp` whose backward skips masked blocks and takes the
cotangent of the returned log-sum-exp (lse) as well; the mask is a constant for autodiff.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from sparge_jax import attention_core as core
from sparge_jax import backends, config

BACKENDS = ("auto", *backends.NAMES)  # what the deprecated `backend=` argument accepts
MODES = config.MODES

__all__ = [
  "BACKENDS",
  "MODES",
  "block_mask",
  "block_sparse_attention",
  "dense_attention",
  "dot_product_attention",
  "make_attention_fn",
  "sparse_attention",
]

PADDED_ROW_LSE = core.PADDED_ROW_LSE  # the lse of rows that attend no key, as jax.nn gives padded rows


# ------------------------------------------------------------------------------------ arguments


def _implementation(implementation, backend):
  """(implementation, the argument's name): `backend=` is the deprecated spelling ("auto" = None)."""
  if backend is None:
    config.check_choice("implementation", implementation, config.IMPLEMENTATIONS)
    return implementation, "implementation"
  warnings.warn("backend= is deprecated: pass implementation= (None for auto)", DeprecationWarning, stacklevel=3)
  if implementation is not None:
    raise ValueError(f"pass implementation= or backend=, not both (got {implementation!r} and {backend!r})")
  config.check_choice("backend", backend, BACKENDS)
  return (None if backend == "auto" else backend), "backend"


def _default_scale(scale, head_dim):
  return float(head_dim) ** -0.5 if scale is None else float(scale)


def _checked_lengths(q, k, v, *, block_q, block_kv, scale, query_seq_lengths, key_value_seq_lengths):
  """Checks the arguments every entry point shares; returns the two lengths as arrays (as jax.nn takes
  them: a list of ints becomes int32) or None."""
  query_seq_lengths, key_value_seq_lengths = (
    None if lengths is None else jnp.asarray(lengths) for lengths in (query_seq_lengths, key_value_seq_lengths)
  )
  config.check_qkv(q, k, v)
  config.check_block("block_q", block_q)
  config.check_block("block_kv", block_kv)
  config.check_scale(scale)
  config.check_seq_lengths("query_seq_lengths", query_seq_lengths, q.shape[0])
  config.check_seq_lengths("key_value_seq_lengths", key_value_seq_lengths, q.shape[0])
  return query_seq_lengths, key_value_seq_lengths


def _check_selection(topk, topp, mode, *, heads):
  config.check_fraction_argument("topk", topk, heads)
  config.check_fraction_argument("topp", topp, heads)
  config.check_choice("mode", mode, MODES)


def _kernel(q, k, *, implementation, argument, block_q, block_kv, scale, is_causal, kv_lengths, residual, interpret):
  """Resolves the backend (once per call) and the kernels' static settings."""
  call = backends.call_of(
    q,
    k,
    block_q=block_q,
    block_kv=block_kv,
    is_causal=is_causal,
    kv_lengths=kv_lengths,
    return_residual=residual,
    interpret=interpret,
  )
  backend = backends.choose(implementation, call, argument=argument)
  return core.Kernel(
    backend.name, block_q, block_kv, _default_scale(scale, q.shape[-1]), bool(is_causal), bool(interpret), k.shape[2]
  )


# ------------------------------------------------------------------------------------ public API


def block_mask(
  q,
  k,
  *,
  topk=0.03,
  topp=0.2,
  mode="hybrid",
  block_q=128,
  block_kv=64,
  scale=None,
  is_causal=False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  implementation=None,
  interpret=False,
  backend=None,
):
  """SpargeAttention2's block mask.

  q: [batch, q_len, heads, head_dim], k: [batch, kv_len, kv_heads, head_dim].
  topk, topp: floats in [0, 1] or arrays of shape [heads]; traced values are clipped to [0, 1], and a NaN
  counts as 1 (keep every allowed block). mode: "hybrid" (Top-k ∪ Top-p), "topk", "topp".
  query_seq_lengths, key_value_seq_lengths: int32 [batch] or None. is_causal: see the module docstring.
  implementation: as for the attention ("xla" keeps the mask in XLA; the others take the Triton mask kernels).
  Returns bool [batch, heads, ceil(q_len/block_q), ceil(kv_len/block_kv)]: True where a kv block is kept.

  Row i keeps the ⌈topk·n⌉ largest of the n entries it may attend of P̄ᵢ = softmax_j(scale·q̄ᵢ·k̄ⱼ) (Top-k)
  and/or the fewest largest whose sum reaches topp (Top-p); q̄, k̄ are means of the valid tokens of a block
  (query head n against kv head n // G). Ties go to the lower index; every row that may attend a block
  keeps at least one. No gradient flows through the mask.
  """
  implementation, argument = _implementation(implementation, backend)
  query_seq_lengths, key_value_seq_lengths = _checked_lengths(
    q, k, k, block_q=block_q, block_kv=block_kv, scale=scale,
    query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
  )  # fmt: skip
  _check_selection(topk, topp, mode, heads=q.shape[2])
  return core.block_mask(
    q,
    k,
    jnp.asarray(topk, jnp.float32),
    jnp.asarray(topp, jnp.float32),
    query_seq_lengths,
    key_value_seq_lengths,
    mode=mode,
    block_q=block_q,
    block_kv=block_kv,
    scale=_default_scale(scale, q.shape[-1]),
    is_causal=bool(is_causal),
    implementation=backends.mask_implementation(implementation, q.dtype, interpret=interpret, argument=argument),
    interpret=bool(interpret),
  )


def block_sparse_attention(
  q,
  k,
  v,
  mask,
  *,
  block_q=128,
  block_kv=64,
  scale=None,
  is_causal=False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  implementation=None,
  interpret=False,
  return_residual=False,
  backend=None,
):
  """Attention restricted to the kept blocks of `mask`.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
  mask: bool [batch, heads, ceil(q_len/block_q), ceil(kv_len/block_kv)] (blocks no query of the row may
  attend, under causal masking or the lengths, are dropped from it).
  Returns out [batch, q_len, heads, head_dim] in q's dtype, or (out, lse) with return_residual=True, lse
  [batch, q_len, heads] in q's dtype: the natural-log log-sum-exp of the scaled logits over the keys each
  query attends, and jax.nn's value for rows that attend none (padded queries, empty mask rows), whose
  output is zero.
  """
  implementation, argument = _implementation(implementation, backend)
  query_seq_lengths, key_value_seq_lengths = _checked_lengths(
    q, k, v, block_q=block_q, block_kv=block_kv, scale=scale,
    query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
  )  # fmt: skip
  expected = (q.shape[0], q.shape[2], -(-q.shape[1] // block_q), -(-k.shape[1] // block_kv))
  if not hasattr(mask, "shape") or tuple(mask.shape) != expected:
    raise ValueError(
      f"mask must have shape [batch, heads, ceil(q_len/block_q), ceil(kv_len/block_kv)] = "
      f"{expected}, got {getattr(mask, 'shape', type(mask))}"
    )
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be a bool array, got dtype {mask.dtype}")
  kernel = _kernel(
    q,
    k,
    implementation=implementation,
    argument=argument,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    is_causal=is_causal,
    kv_lengths=key_value_seq_lengths is not None,
    residual=return_residual,
    interpret=interpret,
  )
  out, lse = core.block_sparse_attention(q, k, v, mask, query_seq_lengths, key_value_seq_lengths, kernel=kernel)
  return (out, lse) if return_residual else out


def sparse_attention(
  q,
  k,
  v,
  *,
  topk=0.03,
  topp=0.2,
  mode="hybrid",
  block_q=128,
  block_kv=64,
  scale=None,
  is_causal=False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  implementation=None,
  interpret=False,
  return_residual=False,
  return_stats=False,
  backend=None,
):
  """`block_mask` then `block_sparse_attention`, with one backend choice for both.

  Returns out [batch, q_len, heads, head_dim]; with return_residual=True also lse [batch, q_len, heads]
  (as in `block_sparse_attention`); with return_stats=True also stats, where stats["sparsity"] is float32
  [batch, heads], the fraction of blocks skipped, and stats["kept_blocks"] int32 [batch, heads]. The
  results come in that order: out, lse, stats.
  """
  implementation, argument = _implementation(implementation, backend)
  query_seq_lengths, key_value_seq_lengths = _checked_lengths(
    q, k, v, block_q=block_q, block_kv=block_kv, scale=scale,
    query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
  )  # fmt: skip
  _check_selection(topk, topp, mode, heads=q.shape[2])
  kernel = _kernel(
    q,
    k,
    implementation=implementation,
    argument=argument,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    is_causal=is_causal,
    kv_lengths=key_value_seq_lengths is not None,
    residual=return_residual,
    interpret=interpret,
  )
  mask = core.block_mask(
    q,
    k,
    jnp.asarray(topk, jnp.float32),
    jnp.asarray(topp, jnp.float32),
    query_seq_lengths,
    key_value_seq_lengths,
    mode=mode,
    block_q=block_q,
    block_kv=block_kv,
    scale=kernel.scale,
    is_causal=kernel.is_causal,
    implementation=backends.mask_implementation(kernel.backend, q.dtype, interpret=interpret),
    interpret=kernel.interpret,
  )
  out, lse = core.block_sparse_attention(q, k, v, mask, query_seq_lengths, key_value_seq_lengths, kernel=kernel)
  results = (out, lse) if return_residual else (out,)
  if return_stats:
    kept = jnp.sum(mask, axis=(-2, -1), dtype=jnp.int32)
    sparsity = 1.0 - kept.astype(jnp.float32) / (mask.shape[-2] * mask.shape[-1])
    results += ({"sparsity": sparsity, "kept_blocks": kept},)
  return results[0] if len(results) == 1 else results


def dot_product_attention(
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  scale=None,
  is_causal=False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  local_window_size=None,
  implementation=None,
  return_residual=False,
  topk=0.03,
  topp=0.2,
  mode="hybrid",
  block_q=128,
  block_kv=64,
  interpret=False,
):
  """Block-sparse `jax.nn.dot_product_attention`: the same shapes, arguments and return convention.

  query: [B, T, N, H] or [T, N, H]; key, value: [B, S, K, H] or [S, K, H], N a multiple of K.
  query_seq_lengths, key_value_seq_lengths: int32 [B]. is_causal: query i attends keys j ≤ i.
  implementation: None (auto), "mosaic", "triton" or "xla" (`sparge_jax.backends`).
  return_residual=True returns (out, lse) with lse [B, T, N] (or [T, N]) in the inputs' dtype: the
  natural-log log-sum-exp of the scaled logits over the keys attended (-0.7 · float32 max, as jax.nn, for
  rows that attend none). topk, topp, mode, block_q, block_kv: the mask (`block_mask`); with topk=1 every
  block is kept and the result is jax.nn's. A batch whose key_value_seq_lengths is 0 outputs zeros
  (jax.nn averages every value there).
  bias, mask (token-level) and local_window_size raise NotImplementedError naming the argument, so a
  caller can fall back to another implementation.
  """
  for name, given in (("bias", bias), ("mask", mask), ("local_window_size", local_window_size)):
    if given is not None:
      raise NotImplementedError(
        f"{name}: block-sparse attention takes no {name}; causal masking (is_causal) and padding "
        "(query_seq_lengths, key_value_seq_lengths) are supported"
      )
  arrays = {"query": query, "key": key, "value": value}
  for name, x in arrays.items():
    if not hasattr(x, "ndim") or x.ndim not in (3, 4):
      raise ValueError(
        f"{name} must be [batch, seq, heads, head_dim] or [seq, heads, head_dim], got {getattr(x, 'shape', type(x))}"
      )
  if len({x.ndim for x in arrays.values()}) != 1:
    raise ValueError(
      f"query, key and value must all be batched or all unbatched, got shapes {[x.shape for x in arrays.values()]}"
    )
  unbatched = query.ndim == 3
  if unbatched:
    query, key, value = query[None], key[None], value[None]
  config.check_qkv(query, key, value, names=("query", "key", "value"))
  out, lse = sparse_attention(
    query,
    key,
    value,
    topk=topk,
    topp=topp,
    mode=mode,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    is_causal=is_causal,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    implementation=implementation,
    interpret=interpret,
    return_residual=True,
  )
  if unbatched:
    out, lse = out[0], lse[0]
  return (out, lse) if return_residual else out


def make_attention_fn(
  *, topk=0.03, topp=0.2, mode="hybrid", block_q=128, block_kv=64, implementation=None, interpret=False
):
  """An `attention_fn` for `flax.nnx.MultiHeadAttention`: block-sparse `dot_product_attention` with these settings.

  The function takes what nnx passes (query, key, value: [batch..., length, heads, head_dim]; bias, mask,
  broadcast_dropout, dropout_rng, dropout_rate, deterministic, dtype, precision, module, promote_dtype,
  is_causal). Arguments it cannot honour raise NotImplementedError naming them: a bias; a token-level mask
  (nnx's causal and padding masks are arrays that cannot be recognised under jit: pass is_causal=True to the
  layer instead); dropout at a rate above 0 unless deterministic; `module` (sown attention weights, which
  the kernels never form). `precision` is ignored: the kernels choose their own.
  """
  settings = config.AttentionConfig(
    kind="sparse", topk=topk, topp=topp, mode=mode, block_q=block_q, block_kv=block_kv, implementation=implementation
  )
  as_array = lambda p: jnp.asarray(p, jnp.float32) if isinstance(p, tuple) else p

  def attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout=True,
    dropout_rng=None,
    dropout_rate=0.0,
    deterministic=False,
    dtype=None,
    precision=None,
    module=None,
    promote_dtype=None,
    is_causal=False,
    **unsupported,
  ):
    del broadcast_dropout, dropout_rng, precision
    if unsupported:
      raise NotImplementedError(f"{', '.join(sorted(unsupported))}: not supported by block-sparse attention")
    if dropout_rate > 0.0 and not deterministic:
      raise NotImplementedError(f"dropout_rate: attention dropout is not supported (got {dropout_rate})")
    if module is not None:
      raise NotImplementedError("module: block-sparse attention forms no attention weights to sow")
    if promote_dtype is not None:
      query, key, value = promote_dtype((query, key, value), dtype=dtype)
    else:
      dtype = jnp.result_type(query, key, value) if dtype is None else dtype
      query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
    batch_dims = query.shape[:-3]
    if len(batch_dims) > 1:  # nnx allows several batch axes: fold them into one
      query, key, value = (x.reshape(-1, *x.shape[-3:]) for x in (query, key, value))
    out = dot_product_attention(
      query,
      key,
      value,
      bias,
      mask,
      is_causal=is_causal,
      implementation=settings.implementation,
      topk=as_array(settings.topk),
      topp=as_array(settings.topp),
      mode=settings.mode,
      block_q=settings.block_q,
      block_kv=settings.block_kv,
      interpret=interpret,
    )
    return out.reshape(*batch_dims, *out.shape[-3:]) if len(batch_dims) > 1 else out

  return attention_fn


def dense_attention(q, k, v, *, scale=None):
  """Full attention: cuDNN flash attention on GPUs of compute capability ≥ 8.0 for bf16/fp16 with a head_dim
  that is a multiple of 8 and at most 128, XLA otherwise.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
  """
  config.check_qkv(q, k, v)
  config.check_scale(scale)
  head_dim = q.shape[-1]
  cudnn = backends.on_ampere_or_newer() and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
  cudnn = cudnn and head_dim <= 128
  return jax.nn.dot_product_attention(
    q, k, v, scale=_default_scale(scale, head_dim), implementation="cudnn" if cudnn else "xla"
  )
