"""Block-sparse flash attention as Pallas Triton kernels: forward, dQ, and dK/dV.

Every kernel program owns one tile (a q block of one query head for forward and dQ, a kv block of one kv
head for dK/dV) and loops only over the blocks listed for it in a compact index table, so skipped blocks
cost nothing, and no two programs write the same output (no atomics). Softmax runs in base 2 in float32;
the saved `lse` is the natural-log log-sum-exp [batch, heads, q_len], the convention of `xla` beside this,
which is the plain-JAX statement of the same algorithm.

- Grouped heads: forward and dQ programs of query head n read kv head n // G through their BlockSpecs; a
  dK/dV program holds the rows of its kv head's G query heads and walks the dK/dV table's entries
  `member · n_q_blocks + q_block`, so dK and dV sum over the group in registers.
- Masks cost only where they apply: out-of-range keys and keys past `kv_seq_lengths` get a large finite
  negative score (never -inf arithmetic) in the block that holds the boundary; causal masking runs only in
  blocks that cross the diagonal. K and V rows past the length are never read.
- Sequence lengths need not be multiples of the blocks: out-of-range rows load as zeros and are never
  stored. Head dims that are not powers of two ≥ 16 are zero padded to one (zero columns change neither
  scores nor outputs).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.varying import shape_dtype, varying_axes

LOG2E = math.log2(math.e)
_MASKED = -1e30
# The forward's running max starts above every masked score and below every real one, so a row whose
# listed keys are all masked keeps zero weight (exp2(masked - start) = 0) and ends with row sum 0.
_ROW_MAX_START = _MASKED / 2


def _dot(a, b, trans_b=False):
  """a @ b (or a @ bᵀ) with float32 accumulation; full precision for float32 operands."""
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _compiler_params(num_warps, num_stages):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _positions(block_index, block):
  return block_index * block + jnp.arange(block)


def _kv_limit(kv_length_ref, kv_len):
  """Keys at positions >= this take no part: the batch's length when lengths are given, else kv_len."""
  return kv_len if kv_length_ref is None else jnp.minimum(kv_length_ref[0], kv_len)


def _needs_mask(kv_start, q_start, *, block_q, block_kv, kv_len, kv_limit, has_lengths, is_causal):
  """Whether a (q block, kv block) pair needs the mask: it holds the key boundary or crosses the diagonal.

  None when no pair ever does (static: no lengths, no causal, kv_len a multiple of block_kv).
  """
  need = None
  if has_lengths:
    need = kv_start + block_kv > kv_limit  # listed blocks start below the limit, so this one holds it
  elif kv_len % block_kv:
    need = kv_start + block_kv > kv_len
  if is_causal:
    crossing = kv_start + block_kv - 1 > q_start  # some key lies past the block's first query
    need = crossing if need is None else need | crossing
  return need


def _allowed(q_pos, kv_pos, kv_limit, is_causal):
  """bool [block_q, block_kv]: the (query, key) pairs that take part."""
  allowed = jnp.broadcast_to((kv_pos < kv_limit)[None, :], (q_pos.shape[0], kv_pos.shape[0]))
  if is_causal:
    allowed = allowed & (kv_pos[None, :] <= q_pos[:, None])
  return allowed


def _group_rows(ref, group, start, block):
  """The `block` rows from `start` of one query head of a ref holding a group's heads.

  Refs of a group hold [rows, group, dim] (or [group, rows] for lse and delta), or with group 1 the
  squeezed [rows, dim] ([rows]); returns a function of the member.
  """
  if group == 1:
    return lambda member: ref.at[pl.ds(start, block)]
  if len(ref.shape) == 2:
    return lambda member: ref.at[member, pl.ds(start, block)]
  return lambda member: ref.at[pl.ds(start, block), member]


# ----------------------------------------------------------------------------------------- forward


def _forward_kernel(
  kv_index_ref,
  kv_count_ref,
  *refs,
  scale,
  block_q,
  block_kv,
  q_len,
  kv_len,
  has_lengths,
  is_causal,
):
  kv_length_ref, q_ref, k_ref, v_ref, out_ref, lse_ref = refs if has_lengths else (None, *refs)
  q_block = pl.program_id(0)
  q_start = q_block * block_q
  q_pos = _positions(q_block, block_q)
  q_valid = q_pos < q_len
  q = pltriton.load(q_ref, mask=q_valid[:, None], other=0.0)
  score_scale = scale * LOG2E
  kv_limit = _kv_limit(kv_length_ref, kv_len)

  def body(c, carry):
    acc, row_max, row_sum = carry
    kv_block = kv_index_ref[c]
    start = kv_block * block_kv
    kv_pos = _positions(kv_block, block_kv)
    kv_in = kv_pos < kv_limit
    k = pltriton.load(k_ref.at[pl.ds(start, block_kv)], mask=kv_in[:, None], other=0.0)
    # The max is of unscaled scores, so the scale folds into exp2's argument (one multiply-add).
    scores = _dot(q, k, trans_b=True)
    need = _needs_mask(
      start,
      q_start,
      block_q=block_q,
      block_kv=block_kv,
      kv_len=kv_len,
      kv_limit=kv_limit,
      has_lengths=has_lengths,
      is_causal=is_causal,
    )
    if need is not None:
      masked = lambda s: jnp.where(_allowed(q_pos, kv_pos, kv_limit, is_causal), s, _MASKED)
      scores = lax.cond(need, masked, lambda s: s, scores)
    new_max = jnp.maximum(row_max, scores.max(axis=1))
    scaled_max = new_max * score_scale
    correction = jnp.exp2(row_max * score_scale - scaled_max)
    probs = jnp.exp2(scores * score_scale - scaled_max[:, None])
    v = pltriton.load(v_ref.at[pl.ds(start, block_kv)], mask=kv_in[:, None], other=0.0)
    acc = acc * correction[:, None] + _dot(probs.astype(v.dtype), v)
    return acc, new_max, row_sum * correction + probs.sum(axis=1)

  init = (
    jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32),
    jnp.full((block_q,), _ROW_MAX_START, jnp.float32),
    jnp.zeros((block_q,), jnp.float32),
  )
  acc, row_max, row_sum = lax.fori_loop(0, kv_count_ref[0], body, init)
  empty = row_sum == 0.0
  safe_sum = jnp.where(empty, 1.0, row_sum)
  pltriton.store(out_ref, (acc / safe_sum[:, None]).astype(out_ref.dtype), mask=q_valid[:, None])
  lse = jnp.where(empty, -jnp.inf, row_max * scale + jnp.log(safe_sum))
  pltriton.store(lse_ref, lse, mask=q_valid)


def _pad_head_dim(*xs):
  """Zero pads the last axis to a power of two ≥ 16, which Triton tiles need."""
  dim = xs[0].shape[-1]
  padded = max(16, pl.next_power_of_2(dim))
  if padded == dim:
    return xs
  return tuple(jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, padded - dim),)) for x in xs)


def _lengths_args(kv_seq_lengths, index_map):
  """The optional kv lengths input: (arrays, specs), one int32 per batch."""
  if kv_seq_lengths is None:
    return (), ()
  return (kv_seq_lengths.astype(jnp.int32).reshape(-1, 1),), (pl.BlockSpec((None, 1), index_map),)


@functools.partial(
  jax.jit, static_argnames=("block_q", "block_kv", "scale", "is_causal", "num_warps", "num_stages", "interpret")
)
def forward(
  q,
  k,
  v,
  kv_block_index,
  kv_block_count,
  *,
  kv_seq_lengths=None,
  block_q,
  block_kv,
  scale,
  is_causal=False,
  num_warps=4,
  num_stages=2,
  interpret=False,
):
  """Block-sparse attention forward.

  q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, kv_heads, dim], heads a multiple of kv_heads.
  kv_block_index: int32 [batch, heads, n_q_blocks, n_kv_blocks]; kv_block_count: int32 [batch, heads, n_q_blocks].
  kv_seq_lengths: int32 [batch] or None. is_causal: query i attends keys j ≤ i only.
  Returns (out [batch, q_len, heads, dim], lse float32 [batch, heads, q_len]).
  Launch defaults (here and in `backward`) are the best of `python -m benchmarks.attention --sweep`.
  """
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  (q, k, v) = _pad_head_dim(q, k, v)
  n_q_blocks, n_kv_blocks = kv_block_index.shape[-2:]
  kernel = functools.partial(
    _forward_kernel,
    scale=scale,
    block_q=block_q,
    block_kv=block_kv,
    q_len=q_len,
    kv_len=kv_len,
    has_lengths=kv_seq_lengths is not None,
    is_causal=is_causal,
  )
  padded_dim = q.shape[-1]
  q_tile = pl.BlockSpec((None, block_q, None, padded_dim), lambda i, b, h: (b, i, h, 0))
  kv_full = pl.BlockSpec((None, kv_len, None, padded_dim), lambda i, b, h: (b, 0, h // group, 0))
  lengths, length_specs = _lengths_args(kv_seq_lengths, lambda i, b, h: (b, 0))
  axes = varying_axes(q, k, v, kv_block_index, kv_block_count, kv_seq_lengths)
  out, lse = pl.pallas_call(
    kernel,
    grid=(n_q_blocks, batch, heads),
    in_specs=[
      pl.BlockSpec((None, None, None, n_kv_blocks), lambda i, b, h: (b, h, i, 0)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, i)),
      *length_specs,
      q_tile,
      kv_full,
      kv_full,
    ],
    out_specs=[q_tile, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
    out_shape=[shape_dtype(q.shape, q.dtype, axes), shape_dtype((batch, heads, q_len), jnp.float32, axes)],
    compiler_params=_compiler_params(num_warps, num_stages),
    interpret=interpret,
    name="block_sparse_forward",
  )(kv_block_index, kv_block_count, *lengths, q, k, v)
  return out[..., :dim], lse


# ---------------------------------------------------------------------------------------- backward


def _dq_kernel(
  kv_index_ref,
  kv_count_ref,
  *refs,
  scale,
  block_q,
  block_kv,
  q_len,
  kv_len,
  has_lengths,
  is_causal,
):
  kv_length_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs if has_lengths else (None, *refs)
  q_block = pl.program_id(0)
  q_start = q_block * block_q
  q_pos = _positions(q_block, block_q)
  q_valid = q_pos < q_len
  q = pltriton.load(q_ref, mask=q_valid[:, None], other=0.0)
  d_out = pltriton.load(do_ref, mask=q_valid[:, None], other=0.0)
  lse2 = pltriton.load(lse_ref, mask=q_valid, other=0.0) * LOG2E
  delta = pltriton.load(delta_ref, mask=q_valid, other=0.0)
  score_scale = scale * LOG2E
  kv_limit = _kv_limit(kv_length_ref, kv_len)

  def body(c, dq):
    kv_block = kv_index_ref[c]
    start = kv_block * block_kv
    kv_pos = _positions(kv_block, block_kv)
    kv_in = kv_pos < kv_limit
    k = pltriton.load(k_ref.at[pl.ds(start, block_kv)], mask=kv_in[:, None], other=0.0)
    v = pltriton.load(v_ref.at[pl.ds(start, block_kv)], mask=kv_in[:, None], other=0.0)
    # Scaled, then masked by the key range every step: the forward's way (unscaled scores, the scale in
    # exp2's argument, the mask only on the last block, by a branch) was slower here (benchmarks/NOTES.md).
    scores = _dot(q, k, trans_b=True) * score_scale
    key_masked = lambda s: jnp.where(kv_in[None, :], s, _MASKED)
    if is_causal:
      crossing = start + block_kv - 1 > q_start
      causal_masked = lambda s: jnp.where(_allowed(q_pos, kv_pos, kv_limit, True), s, _MASKED)
      scores = lax.cond(crossing, causal_masked, key_masked, scores)
    else:
      scores = key_masked(scores)
    probs = jnp.exp2(scores - lse2[:, None])
    d_scores = probs * (_dot(d_out, v, trans_b=True) - delta[:, None])
    return dq + _dot(d_scores.astype(k.dtype), k)

  dq = lax.fori_loop(0, kv_count_ref[0], body, jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32))
  pltriton.store(dq_ref, (dq * scale).astype(dq_ref.dtype), mask=q_valid[:, None])


def _dkv_kernel(
  q_index_ref,
  q_count_ref,
  *refs,
  scale,
  block_q,
  block_kv,
  q_len,
  kv_len,
  n_q_blocks,
  group,
  has_lengths,
  is_causal,
):
  kv_length_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = (
    refs if has_lengths else (None, *refs)
  )
  kv_block = pl.program_id(0)
  kv_start = kv_block * block_kv
  kv_pos = _positions(kv_block, block_kv)
  kv_limit = _kv_limit(kv_length_ref, kv_len)
  kv_in = kv_pos < kv_limit
  k = pltriton.load(k_ref, mask=kv_in[:, None], other=0.0)
  v = pltriton.load(v_ref, mask=kv_in[:, None], other=0.0)
  score_scale = scale * LOG2E

  def body(c, carry):
    dk, dv = carry
    entry = q_index_ref[c]
    member, q_block = entry // n_q_blocks, entry % n_q_blocks
    start = q_block * block_q
    q_pos = _positions(q_block, block_q)
    q_valid = q_pos < q_len
    # Rows past q_len load as zeros (q, dO, lse, delta), so they add exactly zero to dK and dV.
    rows = lambda ref: _group_rows(ref, group, start, block_q)(member)
    q = pltriton.load(rows(q_ref), mask=q_valid[:, None], other=0.0)
    d_out = pltriton.load(rows(do_ref), mask=q_valid[:, None], other=0.0)
    lse2 = pltriton.load(rows(lse_ref), mask=q_valid, other=0.0) * LOG2E
    delta = pltriton.load(rows(delta_ref), mask=q_valid, other=0.0)
    # Keys past the length need no mask here: they affect only their own rows of dK and dV, which are
    # zeroed at the store.
    scores_t = _dot(k, q, trans_b=True) * score_scale
    if is_causal:
      causal_masked = lambda s: jnp.where(kv_pos[:, None] <= q_pos[None, :], s, _MASKED)
      scores_t = lax.cond(kv_start + block_kv - 1 > start, causal_masked, lambda s: s, scores_t)
    probs_t = jnp.exp2(scores_t - lse2[None, :])
    dv = dv + _dot(probs_t.astype(d_out.dtype), d_out)
    d_scores_t = probs_t * (_dot(v, d_out, trans_b=True) - delta[None, :])
    return dk + _dot(d_scores_t.astype(q.dtype), q), dv

  dim = k_ref.shape[-1]
  init = (jnp.zeros((block_kv, dim), jnp.float32), jnp.zeros((block_kv, v_ref.shape[-1]), jnp.float32))
  dk, dv = lax.fori_loop(0, q_count_ref[0], body, init)
  if has_lengths:
    dk, dv = jnp.where(kv_in[:, None], dk, 0.0), jnp.where(kv_in[:, None], dv, 0.0)
  pltriton.store(dk_ref, (dk * scale).astype(dk_ref.dtype), mask=(kv_pos < kv_len)[:, None])
  pltriton.store(dv_ref, dv.astype(dv_ref.dtype), mask=(kv_pos < kv_len)[:, None])


@functools.partial(
  jax.jit, static_argnames=("block_q", "block_kv", "scale", "is_causal", "num_warps", "num_stages", "interpret")
)
def backward(
  q,
  k,
  v,
  out,
  lse,
  d_out,
  d_lse,
  kv_block_index,
  kv_block_count,
  q_block_index,
  q_block_count,
  *,
  kv_seq_lengths=None,
  block_q,
  block_kv,
  scale,
  is_causal=False,
  num_warps=8,
  num_stages=None,
  interpret=False,
):
  """Gradients (dq, dk, dv) of `forward`.

  d_lse: float32 [batch, heads, q_len], the cotangent of lse, or None.
  q_block_index: int32 [batch, kv_heads, n_kv_blocks, group · n_q_blocks], entries member · n_q_blocks +
  q_block for query head kv_head · group + member; q_block_count: int32 [batch, kv_heads, n_kv_blocks].
  num_stages defaults to 3 for 16-bit inputs and 1 for float32, whose tiles take twice the shared memory.
  """
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  n_q_blocks, n_kv_blocks = kv_block_index.shape[-2:]
  delta = jnp.einsum("bnhd,bnhd->bhn", d_out.astype(jnp.float32), out.astype(jnp.float32))
  if d_lse is not None:
    delta = delta - d_lse.astype(jnp.float32)
  # A row that attends no key (lse = -inf) must give P = 0, not exp2(s + inf).
  lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
  q, k, v, d_out = _pad_head_dim(q, k, v, d_out)
  padded_dim = q.shape[-1]
  has_lengths = kv_seq_lengths is not None
  tables = (kv_block_index, kv_block_count, q_block_index, q_block_count)
  axes = varying_axes(q, k, v, out, lse, d_out, d_lse, tables, kv_seq_lengths)
  statics = dict(
    scale=scale,
    block_q=block_q,
    block_kv=block_kv,
    q_len=q_len,
    kv_len=kv_len,
    has_lengths=has_lengths,
    is_causal=is_causal,
  )
  if num_stages is None:
    num_stages = 3 if q.dtype.itemsize <= 2 else 1
  params = _compiler_params(num_warps, num_stages)

  q_tile = pl.BlockSpec((None, block_q, None, padded_dim), lambda i, b, h: (b, i, h, 0))
  row_tile = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
  kv_full = pl.BlockSpec((None, kv_len, None, padded_dim), lambda i, b, h: (b, 0, h // group, 0))
  lengths, length_specs = _lengths_args(kv_seq_lengths, lambda i, b, h: (b, 0))
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, **statics),
    grid=(n_q_blocks, batch, heads),
    in_specs=[
      pl.BlockSpec((None, None, None, n_kv_blocks), lambda i, b, h: (b, h, i, 0)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, i)),
      *length_specs,
      q_tile,
      kv_full,
      kv_full,
      q_tile,
      row_tile,
      row_tile,
    ],
    out_specs=q_tile,
    out_shape=shape_dtype(q.shape, q.dtype, axes),
    compiler_params=params,
    interpret=interpret,
    name="block_sparse_dq",
  )(kv_block_index, kv_block_count, *lengths, q, k, v, d_out, lse, delta)

  # A dK/dV program holds its kv head's query heads: squeezed when there is one.
  heads_block = None if group == 1 else group
  kv_tile = pl.BlockSpec((None, block_kv, None, padded_dim), lambda j, b, g: (b, j, g, 0))
  q_full = pl.BlockSpec((None, q_len, heads_block, padded_dim), lambda j, b, g: (b, 0, g, 0))
  rows_full = pl.BlockSpec((None, heads_block, q_len), lambda j, b, g: (b, g, 0))
  lengths, length_specs = _lengths_args(kv_seq_lengths, lambda j, b, g: (b, 0))
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, n_q_blocks=n_q_blocks, group=group, **statics),
    grid=(n_kv_blocks, batch, kv_heads),
    in_specs=[
      pl.BlockSpec((None, None, None, group * n_q_blocks), lambda j, b, g: (b, g, j, 0)),
      pl.BlockSpec((None, None, 1), lambda j, b, g: (b, g, j)),
      *length_specs,
      q_full,
      kv_tile,
      kv_tile,
      q_full,
      rows_full,
      rows_full,
    ],
    out_specs=[kv_tile, kv_tile],
    out_shape=[shape_dtype(k.shape, k.dtype, axes), shape_dtype(v.shape, v.dtype, axes)],
    compiler_params=params,
    interpret=interpret,
    name="block_sparse_dkv",
  )(q_block_index, q_block_count, *lengths, q, k, v, d_out, lse, delta)
  return dq[..., :dim], dk[..., :dim], dv[..., :dim]
