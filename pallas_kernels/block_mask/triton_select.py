"""Top-k ∪ Top-p block selection as a Pallas Triton kernel, without sorting.

The same rule as `reference.select_blocks_from_probs` (which sorts each row in XLA): each program (one warp)
takes one row of pooled logits (a few when rows are short), forms the row softmax in registers and finds
the two thresholds by bisection on the bit patterns of the (non-negative) probabilities, whose integer
order is their float order:
- Top-p: the smallest probability v whose strictly-larger mass G(v) = Σ_{P > v} P is still below p. Every
  entry above v is kept, and of the entries equal to v the first ⌈(p − G(v)) / v⌉ (ties in index order).
- the kept set: the n_keep-th largest probability v_k (the smallest t with #{P > t} < n_keep); entries
  above it, then ties at v_k in index order until n_keep. When n_keep ends among the Top-p boundary's
  ties, v_k is that boundary and this second bisection is skipped; Top-k alone needs only this one. For
  the hybrid, one probe at p/n_topk first settles most rows where Top-k keeps more (skewed rows): there the
  Top-p search is skipped.
Bisection over a row held in registers (as many steps as the bits between the row's smallest and largest
entry, ≤ 31; the n_keep-th largest stops once one entry is left, ~10 steps) costs far less than a sort of
the row in global memory.
Masses are summed in a different order than the reference's sorted cumulative sum, so a row whose p
boundary falls within float rounding may keep one block more or less than the reference.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.block_mask.reference import COUNT_SLACK as _COUNT_SLACK
from pallas_kernels.varying import shape_dtype, varying_axes

_INF_BITS = 0x7F800000


def _smallest(predicate, low, high):
  """Per row, the smallest bit pattern t in [low, high] with predicate(t) (monotone False → True; high if
  none), by bisection: as many steps as the widest row's bracket has bits."""

  def step(bounds):
    low, high = bounds
    mid = low + (high - low) // 2
    ok = predicate(mid)
    open_ = low < high  # rows whose bracket has closed wait for the others unchanged
    return jnp.where(open_ & ~ok, mid + 1, low), jnp.where(open_ & ok, mid, high)

  low, _ = lax.while_loop(lambda bounds: jnp.max(bounds[1] - bounds[0]) > 0, step, (low, high))
  return low


def _nth_largest(bits, n, low, high):
  """Per row, the n-th largest bit pattern of bits (with repeats): the smallest t in [low, high] with
  #{bits > t} < n, for a bracket [low, high] that holds it.

  Bisection, but it stops as soon as [low, high] holds a single entry of the row (the counts at both ends
  come with the steps): that entry is the answer. ~10 steps on rows of 512 instead of ~20–30, one per bit
  of the bracket. (The Top-p search would need a second reduction per step for the counts, which cost
  more than the steps it saved: benchmarks/NOTES.md.)
  """
  count_above = lambda t: (bits > t[:, None]).astype(jnp.int32).sum(axis=1)

  def still_open(state):
    low, high, n_from_low, n_above_high = state
    return (low < high) & (n_from_low - n_above_high > 1)

  def step(state):
    low, high, n_from_low, n_above_high = state
    mid = low + (high - low) // 2
    n_above = count_above(mid)
    open_ = still_open(state)  # closed rows wait for the others unchanged
    lower, raise_ = open_ & (n_above < n), open_ & (n_above >= n)
    return (
      jnp.where(raise_, mid + 1, low),
      jnp.where(lower, mid, high),
      jnp.where(raise_, n_above, n_from_low),
      jnp.where(lower, n_above, n_above_high),
    )

  state = (low, high, (bits >= low[:, None]).astype(jnp.int32).sum(axis=1), count_above(high))
  low, _, n_from_low, n_above_high = lax.while_loop(
    lambda state: jnp.max(still_open(state).astype(jnp.int32)) > 0, step, state
  )
  # Below low the count is ≥ n (low was raised past such a t, or is the row's minimum) and at high it is
  # < n, so it drops below n at the one entry in [low, high]: the smallest entry ≥ low.
  first = jnp.where(bits >= low[:, None], bits, _INF_BITS).min(axis=1)
  return jnp.where(n_from_low > n_above_high, first, low)


def _select_kernel(*refs, n_q, n_kv, n_pad, mode, rows_per_program, has_limit, has_anchor):
  refs = list(refs)
  topk_ref, topp_ref = refs.pop(0), refs.pop(0)
  limit_ref = refs.pop(0) if has_limit else None
  anchor_ref = refs.pop(0) if has_anchor else None
  logits_ref, keep_ref = refs
  n_rows = rows_per_program
  rows = pl.program_id(0) * n_rows + jnp.arange(n_rows)
  cols = jnp.arange(n_pad)
  in_range = (rows < n_q)[:, None] & (cols < n_kv)[None, :]
  if has_limit:
    # Row i may attend its first n_allowed[i] blocks only: ranks, counts and masses are over those.
    n_allowed = pltriton.load(limit_ref, mask=rows < n_q, other=0)
    valid = in_range & (cols[None, :] < n_allowed[:, None])
  else:
    n_allowed, valid = n_kv, in_range
  logits = pltriton.load(logits_ref, mask=in_range, other=0.0)
  logits = jnp.where(valid, logits, -jnp.inf)
  exps = jnp.where(valid, jnp.exp(logits - logits.max(axis=1)[:, None]), 0.0)
  probs = exps / exps.sum(axis=1)[:, None]
  has_nan = jnp.where(jnp.isnan(probs) & valid, 1, 0).max(axis=1) > 0  # Triton lowers no reduce_or
  # Padding columns get bit pattern -1: below every threshold, never counted or kept.
  bits = jnp.where(valid, lax.bitcast_convert_type(probs, jnp.int32), -1)

  topk, topp = topk_ref[0], topp_ref[0]
  allowed_count = n_allowed.astype(jnp.float32) if has_limit else n_kv
  n_topk = jnp.broadcast_to(jnp.ceil(topk * allowed_count - _COUNT_SLACK).astype(jnp.int32), (n_rows,))
  count_above = lambda t: (bits > t[:, None]).astype(jnp.int32).sum(axis=1)
  # Both thresholds lie in [smallest, largest + 1] of the row's bit patterns (a Top-p boundary below the
  # smallest entry keeps the same blocks as the smallest itself), so bisection need only span that bracket:
  # ~22 steps instead of 31 for a near-uniform row. Rows past the end get an empty bracket.
  row_max = bits.max(axis=1)
  low = jnp.minimum(jnp.where(valid, bits, _INF_BITS).min(axis=1), row_max + 1)
  high = row_max + 1

  mass_above = lambda t: jnp.where(bits > t[:, None], probs, 0.0).sum(axis=1)

  def top_k_alone():
    n_keep = jnp.minimum(jnp.maximum(n_topk, 1), n_allowed)
    return n_keep, _nth_largest(bits, n_keep, low, high)

  def with_top_p():
    boundary = _smallest(lambda t: mass_above(t) < topp, low, high)
    above = bits > boundary[:, None]
    n_above = above.astype(jnp.int32).sum(axis=1)
    mass = jnp.where(above, probs, 0.0).sum(axis=1)
    ties = (bits == boundary[:, None]).astype(jnp.int32).sum(axis=1)
    value = lax.bitcast_convert_type(boundary, jnp.float32)
    tie_count = jnp.where(value > 0, jnp.ceil((topp - mass) / jnp.where(value > 0, value, 1.0)), ties)
    n_topp = n_above + jnp.clip(tie_count.astype(jnp.int32), 0, ties)
    n_topp = jnp.where(topp >= 1.0, n_allowed, n_topp)
    n_keep = jnp.minimum(jnp.maximum(jnp.maximum(n_topk, n_topp) if mode == "hybrid" else n_topp, 1), n_allowed)
    # The n_keep-th largest probability is the Top-p boundary itself whenever n_keep ends among the
    # boundary's ties (always for Top-p, and for the hybrid when Top-p keeps more than Top-k): skip the
    # second bisection unless some row of this program needs it.
    at_boundary = (n_above < n_keep) & (n_keep <= n_above + ties)
    needs_search = jnp.where(at_boundary, 0, 1).max() > 0
    return n_keep, lax.cond(needs_search, lambda: _nth_largest(bits, n_keep, low, high), lambda: boundary)

  if mode == "topk":
    n_keep, last = top_k_alone()
  elif mode == "topp":
    n_keep, last = with_top_p()
  else:
    # One probe at v = p/n_topk (a hair above) settles most rows where Top-k keeps more than Top-p: if at
    # least n_topk entries exceed v, the n_topk largest hold mass > p; if fewer do but they hold p, Top-p's
    # boundary lies above v. Either way Top-p keeps at most n_topk, the hybrid keeps the Top-k set, and the
    # Top-p search (~20–30 steps) is skipped. (The 2⁻¹⁰ margin covers float rounding of the masses.)
    probe = lax.bitcast_convert_type(topp * (1 + 2.0**-10) / jnp.maximum(n_topk, 1).astype(jnp.float32), jnp.int32)
    top_k_covers = (n_topk >= 1) & (topp < 1.0) & ((count_above(probe) >= n_topk) | (mass_above(probe) >= topp))
    n_keep, last = lax.cond(jnp.where(top_k_covers, 0, 1).max() == 0, top_k_alone, with_top_p)
  tied = bits == last[:, None]
  tie_rank = jnp.cumsum(tied.astype(jnp.int32), axis=1)
  keep = (bits > last[:, None]) | (tied & (tie_rank <= (n_keep - count_above(last))[:, None]))
  keep = keep | has_nan[:, None]
  if has_anchor:
    keep = keep | (cols[None, :] == pltriton.load(anchor_ref, mask=rows < n_q, other=-1)[:, None])
  pltriton.store(keep_ref, keep & valid, mask=in_range)


def _launch(n_kv):
  """(rows per program, warps): a whole row in one warp keeps every reduction of the bisection inside the
  warp (no shared-memory round trip per step); short rows share a warp."""
  n_pad = pl.next_power_of_2(n_kv)
  return max(1, 256 // n_pad), 1


@functools.partial(jax.jit, static_argnames=("mode", "interpret", "rows_per_program", "num_warps"))
def select_blocks_from_logits(
  logits,
  topk,
  topp,
  mode: str,
  *,
  kv_block_limit=None,
  anchor=None,
  interpret: bool = False,
  rows_per_program=None,
  num_warps=None,
):
  """Top-k ∪ Top-p selection on pooled logits (float32 [batch, heads, n_q_blocks, n_kv_blocks], scaled; the
  row softmax is taken here), as `reference.select_blocks_from_probs` on their softmax.

  topk, topp: scalars or [heads] arrays. kv_block_limit, anchor: int32 [batch or 1, n_q_blocks] or None,
  as in `reference.select_blocks_from_probs` (the softmax is over each row's allowed blocks).
  Returns the bool block mask of the logits' shape. rows_per_program, num_warps: launch shape (default:
  `_launch`).
  """
  batch, heads, n_q, n_kv = logits.shape
  n_pad = pl.next_power_of_2(n_kv)
  default_rows, default_warps = _launch(n_kv)
  rows_per_program = rows_per_program or default_rows
  num_warps = num_warps or default_warps
  # A scalar stays one value and a [heads] array is read per head by the index map: no broadcast kernels.
  fractions = [jnp.asarray(a, jnp.float32).reshape(-1, 1) for a in (topk, topp)]
  fraction_specs = [
    pl.BlockSpec((None, 1), (lambda i, bh: (bh % heads, 0)) if a.shape[0] > 1 else (lambda i, bh: (0, 0)))
    for a in fractions
  ]
  # Limits and anchors are per batch and q block (or shared by the batch), read by every head.
  row_inputs = [jnp.asarray(a, jnp.int32) for a in (kv_block_limit, anchor) if a is not None]
  row_specs = [
    pl.BlockSpec(
      (None, rows_per_program), (lambda i, bh: (bh // heads, i)) if a.shape[0] > 1 else (lambda i, bh: (0, i))
    )
    for a in row_inputs
  ]
  rows_spec = pl.BlockSpec((None, rows_per_program, n_pad), lambda i, bh: (bh, i, 0))
  kernel = functools.partial(
    _select_kernel,
    n_q=n_q,
    n_kv=n_kv,
    n_pad=n_pad,
    mode=mode,
    rows_per_program=rows_per_program,
    has_limit=kv_block_limit is not None,
    has_anchor=anchor is not None,
  )
  keep = pl.pallas_call(
    kernel,
    grid=(pl.cdiv(n_q, rows_per_program), batch * heads),
    in_specs=[*fraction_specs, *row_specs, rows_spec],
    out_specs=rows_spec,
    out_shape=shape_dtype((batch * heads, n_q, n_kv), jnp.bool_, varying_axes(logits, fractions, row_inputs)),
    compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
    interpret=interpret,
    name="select_blocks",
  )(*fractions, *row_inputs, logits.reshape(batch * heads, n_q, n_kv))
  return keep.reshape(batch, heads, n_q, n_kv)


def select_blocks(logits, topk, topp, mode: str, **kwargs):
  """Deprecated name of `select_blocks_from_logits` (kept while callers move)."""
  warnings.warn("select_blocks is now select_blocks_from_logits", DeprecationWarning, stacklevel=2)
  return select_blocks_from_logits(logits, topk, topp, mode, **kwargs)
