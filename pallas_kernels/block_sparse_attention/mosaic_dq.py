"""The Mosaic GPU block-sparse attention dQ kernel, which also forms delta = rowsum(dO·O) for dK/dV.

Work items are (q block, head, batch), dealt as in the forward, on persistent CTAs of `compute_wgs` compute
warpgroups (64 q rows each) and one memory warpgroup. The memory warpgroup loads each item's Q, dO and
lse rows into one of `row_slots` slots (freed once the dQ store, staged in the Q slot, has read it) and
runs one K/V ring (one kv block per 64-key slot) through all the CTA's items, so the next item's rows and
first K/V tiles land during this item's last steps and epilogue.

Each compute warpgroup forms its rows' delta from O itself, 64 columns at a time through one O tile (a
whole O tile does not fit beside the double-buffered rows at head_dim 128), and writes it out for the
dK/dV kernel. It issues those O loads itself: the first part of its next item's rows as soon as this
item's delta is formed, so only the later parts' loads wait.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention import mosaic_pipeline as mp

O_PART = 64  # columns of O per load (128 bytes: one swizzle row)


class DqInputs(NamedTuple):
  kv_block_index: Any  # int32 [batch, heads, n_q_blocks, n_kv_blocks]
  kv_block_count: Any  # int32 [batch, heads, n_q_blocks]
  schedule: mp.Schedule | None  # of the CTAs; None: items dealt round-robin
  q: Any  # [batch, q_len, heads, head_dim]
  k: Any  # [batch, kv_len, kv_heads, head_dim]
  v: Any
  d_out: Any  # [batch, q_len, heads, head_dim]
  lse: Any  # float32 [batch, heads, n_q_blocks·block_q], zero padded
  out: Any  # [batch, q_len, heads, head_dim]
  d_lse: Any  # float32 [batch, heads, n_q_blocks·block_q], zero padded: the cotangent of lse; None: zero
  kv_seq_lengths: Any  # int32 [batch]: valid keys per batch; None: kv_len


class DqOutputs(NamedTuple):
  dq: Any  # [batch, q_len, heads, head_dim]
  delta: Any  # float32 [batch, heads, n_q_blocks·block_q]: rowsum(dO·O), zero past q_len


class DqScratch(NamedTuple):
  q: Any  # SMEM [row_slots, compute_wgs, 64, head_dim]: Q, then the dQ tile staged for its store
  d_out: Any  # SMEM [row_slots, compute_wgs, 64, head_dim]
  lse: Any  # SMEM float32 [row_slots, compute_wgs, 64]
  delta: Any  # SMEM float32 [row_slots, compute_wgs, 64]: d_lse's rows, then delta staged for its store
  rows_loaded: Any  # barriers [row_slots · compute_wgs], one arrival per row copy (Q, dO, lse, d_lse)
  rows_free: Any  # barriers [row_slots · compute_wgs]: the item's dQ store has read its Q slot
  kv: mp.KvRing
  d_scores: Any  # interpreter only: SMEM [compute_wgs, 64, 64], dS staged for wgmma; None compiled
  out: Any  # SMEM [compute_wgs, 64, O_PART]: one column part of a warpgroup's O rows
  out_loaded: Any  # barriers [compute_wgs]


def smem_bytes(block_q, block_kv, head_dim, stages, row_slots):
  """Shared memory of the dQ kernel's row slots, K/V ring and O part (16-bit elements)."""
  return (2 * row_slots * block_q + 2 * stages * block_kv) * head_dim * 2 + block_q * O_PART * 2


def _dq_kernel(inputs: DqInputs, outputs: DqOutputs, scratch: DqScratch, *, scale, block_kv, kv_len, causal, ctas):
  wg = lax.axis_index("wg")
  q_ref = inputs.q
  batch_size, heads, n_q_blocks = inputs.kv_block_count.shape
  row_slots, compute_wgs = scratch.q.shape[:2]
  num_stages = scratch.kv.k.shape[0]
  group = heads // inputs.k.shape[2]  # query heads per kv head
  dtype = q_ref.dtype
  dim = q_ref.shape[-1]
  score_scale = scale * mp.LOG2E
  ring = scratch.kv
  work = mp.work_items(lax.axis_index("ctas"), ctas, (n_q_blocks, heads, batch_size), inputs.schedule)

  def row_table(item):
    q_block, head, batch = item
    count = inputs.kv_block_count[batch, head, q_block]
    return inputs.kv_block_index.at[batch, head, q_block], count, count

  def row_slot(i):
    return lax.rem(i, row_slots)

  def wg_rows(item, w):
    return pl.ds(item[0] * (compute_wgs * mp.WG_ROWS) + w * mp.WG_ROWS, mp.WG_ROWS)

  def row_copies(item, slot, w):
    """(source, destination) of warpgroup w's Q, dO, lse (and d_lse) rows; all arrive on one barrier."""
    _, head, batch = item
    rows = wg_rows(item, w)
    copies = (
      (q_ref.at[batch, rows, head], scratch.q.at[slot, w]),
      (inputs.d_out.at[batch, rows, head], scratch.d_out.at[slot, w]),
      (inputs.lse.at[batch, head, rows], scratch.lse.at[slot, w]),
    )
    if inputs.d_lse is None:
      return copies
    return copies + ((inputs.d_lse.at[batch, head, rows], scratch.delta.at[slot, w]),)

  def load_out_part(item, h):
    """TMA of columns [64·h, 64·h + 64) of this warpgroup's O rows of `item` into scratch.out."""
    _, head, batch = item
    plgpu.copy_gmem_to_smem(
      inputs.out.at[batch, wg_rows(item, wg), head, pl.ds(h * O_PART, O_PART)],
      scratch.out.at[wg],
      scratch.out_loaded.at[wg],
    )

  def row_delta(i, item, slot, d_lse):
    """rowsum(dO·O) - d_lse (d_lse None: zero) of this warpgroup's rows of `item` (its first O part
    already requested), stored to outputs.delta; then requests the first O part of the next item."""
    delta = None
    for h in range(dim // O_PART):
      if h > 0:
        load_out_part(item, h)
      plgpu.barrier_wait(scratch.out_loaded.at[wg])
      o = plgpu.load(scratch.out.at[wg], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
      d_o = plgpu.load(scratch.d_out.at[slot, wg, :, pl.ds(h * O_PART, O_PART)], layout=plgpu.Layout.WGMMA)
      part = jnp.sum(o * d_o.astype(jnp.float32), axis=1)
      delta = part if delta is None else delta + part
      plgpu.commit_smem()  # every thread has read the O tile before the next TMA overwrites it
    pl.when(i + 1 < work.count)(lambda: load_out_part(work.item_at(i + 1), 0))
    if d_lse is not None:
      delta = delta - d_lse
    _, head, batch = item
    delta_tile = scratch.delta.at[slot, wg]
    delta_tile[...] = delta
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(delta_tile, outputs.delta.at[batch, head, wg_rows(item, wg)])
    return delta

  @pl.when(wg < compute_wgs)
  def _compute():
    mp.rebalance_registers(compute_wgs, compute=True)

    def grad_rows(i, item, done):
      q_block, head, batch = item
      kv_index, count, steps = row_table(item)
      slot = row_slot(i)
      plgpu.barrier_wait(scratch.rows_loaded.at[slot * compute_wgs + wg])  # loaded ahead of time
      q_tile, do_tile = scratch.q.at[slot, wg], scratch.d_out.at[slot, wg]
      lse2 = plgpu.load(scratch.lse.at[slot, wg], layout=mp.ROW) * mp.LOG2E
      # d_lse's rows share the delta slot, which row_delta overwrites (after warpgroup barriers).
      d_lse = None if inputs.d_lse is None else plgpu.load(scratch.delta.at[slot, wg], layout=mp.ROW)
      pl.when(i == 0)(lambda: load_out_part(item, 0))  # later items': requested by the previous one
      delta = row_delta(i, item, slot, d_lse)

      mask_keys = mp.key_mask(
        kv_index,
        count,
        block_kv=block_kv,
        kv_len=kv_len,
        kv_per_step=1,
        kv_length=None if inputs.kv_seq_lengths is None else jnp.minimum(inputs.kv_seq_lengths[batch], kv_len),
        first_row=q_block * (compute_wgs * mp.WG_ROWS) + wg * mp.WG_ROWS if causal else None,
        diagonal_blocks=pl.cdiv(compute_wgs * mp.WG_ROWS, block_kv),
      )

      def ring_slot(c):
        return lax.rem(done + c, num_stages)

      @pl.when(steps > 0)
      def _():
        plgpu.barrier_wait(ring.k_loaded.at[ring_slot(0)])

      def step(c, dq):
        kv_slot = ring_slot(c)

        # One product at a time: issuing S = Q Kᵀ and dP = dO Vᵀ together, with P formed under dP's
        # wgmma as in the dK/dV kernel, was slower here (MOSAIC_NOTES.md).
        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_tile, ring.k.at[kv_slot].T)
          return acc_ref[...]

        scores = pl.run_scoped(qk, plgpu.ACC((mp.WG_ROWS, block_kv), jnp.float32))
        scores = mask_keys(scores, c)
        probs = jnp.exp2(scores * score_scale - mp.row_broadcast(lse2, scores.shape))
        plgpu.barrier_wait(ring.v_loaded.at[kv_slot])

        def dov(acc_ref):
          plgpu.wgmma(acc_ref, do_tile, ring.v.at[kv_slot].T)
          return acc_ref[...]

        d_probs = pl.run_scoped(dov, plgpu.ACC((mp.WG_ROWS, block_kv), jnp.float32))
        plgpu.barrier_arrive(ring.v_free.at[kv_slot])
        d_scores = probs * (d_probs - mp.row_broadcast(delta, probs.shape))

        def wait_next_k():
          @pl.when(c + 1 < steps)
          def _():
            plgpu.barrier_wait(ring.k_loaded.at[ring_slot(c + 1)])

        dq = mp.mma(
          dq,
          d_scores.astype(dtype),
          ring.k.at[kv_slot],
          a_smem=None if scratch.d_scores is None else scratch.d_scores.at[wg],
          while_running=wait_next_k,
        )
        plgpu.barrier_arrive(ring.k_free.at[kv_slot])
        return dq

      dq = lax.fori_loop(
        0, steps, step, plgpu.layout_cast(jnp.zeros((mp.WG_ROWS, dim), jnp.float32), plgpu.Layout.WGMMA)
      )
      q_tile[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, outputs.dq.at[batch, wg_rows(item, wg), head])
      # The row slot is free once the store has read the Q slot.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      plgpu.barrier_arrive(scratch.rows_free.at[slot * compute_wgs + wg])
      return done + steps

    work.run(grad_rows)
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == compute_wgs)
  def _memory():
    mp.rebalance_registers(compute_wgs, compute=False)

    def stream(i, item, done):
      q_block, head, batch = item
      kv_index, count, steps = row_table(item)
      kv_head = head if group == 1 else lax.div(head, group)
      slot = row_slot(i)
      for w in range(compute_wgs):
        barrier = slot * compute_wgs + w
        pl.when(i >= row_slots)(lambda: plgpu.barrier_wait(scratch.rows_free.at[barrier]))  # item i - row_slots's
        for src, dst in row_copies(item, slot, w):
          plgpu.copy_gmem_to_smem(src, dst, scratch.rows_loaded.at[barrier])
      mp.stream_kv(
        kv_index,
        count,
        inputs.k.at[batch, :, kv_head],
        inputs.v.at[batch, :, kv_head],
        ring,
        block_kv=block_kv,
        num_stages=num_stages,
        kv_per_step=1,
        done=done,
      )
      return done + steps

    mp.drain_kv(work.run(stream), num_stages, ring)
    mp.drain(
      work.count, row_slots, lambda i: [scratch.rows_free.at[row_slot(i) * compute_wgs + w] for w in range(compute_wgs)]
    )


def dq_call(
  q,
  k,
  v,
  out,
  d_out,
  lse,
  d_lse,
  kv_block_index,
  kv_block_count,
  schedule,
  kv_seq_lengths,
  *,
  block_q,
  block_kv,
  scale,
  kv_len,
  causal,
  stages,
  row_slots,
  ctas,
  interpret,
):
  """One launch of the dQ kernel; arguments as `mosaic_forward.forward_call`'s, and
  lse, d_lse (or None): float32 [batch, heads, n_q_blocks·block_q], zero padded.

  Returns (dq [batch, q_len, heads, head_dim], delta float32 [batch, heads, n_q_blocks·block_q]).
  """
  batch, _, heads, dim = q.shape
  padded_len = lse.shape[-1]
  compute_wgs = block_q // mp.WG_ROWS
  rows = (row_slots, compute_wgs, mp.WG_ROWS)
  scratch = DqScratch(
    q=mp.tiled_smem((*rows, dim), q.dtype),
    d_out=mp.tiled_smem((*rows, dim), d_out.dtype),
    lse=plgpu.SMEM(rows, jnp.float32),
    delta=plgpu.SMEM(rows, jnp.float32),
    rows_loaded=plgpu.Barrier(num_arrivals=3 if d_lse is None else 4, num_barriers=row_slots * compute_wgs),
    rows_free=plgpu.Barrier(num_barriers=row_slots * compute_wgs),
    kv=mp.KvRing.scratch(stages, block_kv, dim, k.dtype, blocks_per_step=1, compute_wgs=compute_wgs),
    d_scores=mp.tiled_smem((compute_wgs, mp.WG_ROWS, block_kv), q.dtype) if interpret else None,
    out=mp.tiled_smem((compute_wgs, mp.WG_ROWS, O_PART), out.dtype),
    out_loaded=plgpu.Barrier(num_barriers=compute_wgs),
  )
  return mp.call_kernel(
    lambda *refs: _dq_kernel(*refs, scale=scale, block_kv=block_kv, kv_len=kv_len, causal=causal, ctas=ctas),
    DqInputs(kv_block_index, kv_block_count, schedule, q, k, v, d_out, lse, out, d_lse, kv_seq_lengths),
    DqOutputs(
      dq=jax.ShapeDtypeStruct(q.shape, q.dtype), delta=jax.ShapeDtypeStruct((batch, heads, padded_len), jnp.float32)
    ),
    scratch,
    ctas=ctas,
    num_threads=compute_wgs + 1,
    interpret=interpret,
    name="mosaic_block_sparse_dq",
  )
