"""The Mosaic GPU block-sparse attention forward: out and lse of the q rows over their kept kv blocks.

A CTA runs `compute_wgs` compute warpgroups of 64 rows each (one q block of 64·compute_wgs rows) and one
memory warpgroup. The CTAs are persistent: CTA j runs work items (q block, head, batch) j, j + ctas, ...,
q blocks fastest, so the CTAs running at one time share a kv head's K/V in L2 (query head n reads kv
head n // group); or, with causal masking, where rows differ in length by design, the items a
`schedule.balanced_schedule` deals it from the same rounds. The memory warpgroup loads
each item's Q into one of two slots and runs one K/V ring (`KvRing`, two kept kv blocks per 128-key slot)
through all its items, so the next item's loads overlap this item's last steps and epilogue. With two
compute warpgroups they ping-pong on a schedule barrier, so one's softmax runs under the other's wgmma.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention import mosaic_pipeline as mp

KV_BLOCKS_PER_STEP = 2  # kept kv blocks per pipeline step: one [64, 128] score tile


class ForwardInputs(NamedTuple):
  kv_block_index: Any  # int32 [batch, heads, n_q_blocks, n_kv_blocks]
  kv_block_count: Any  # int32 [batch, heads, n_q_blocks]
  schedule: mp.Schedule | None  # of the CTAs; None: items dealt round-robin
  q: Any  # [batch, q_len, heads, head_dim]
  k: Any  # [batch, kv_len, kv_heads, head_dim]
  v: Any
  kv_seq_lengths: Any  # int32 [batch]: valid keys per batch; None: kv_len


class ForwardOutputs(NamedTuple):
  out: Any  # [batch, q_len, heads, head_dim]
  lse: Any  # float32 [batch, heads, n_q_blocks·block_q]: whole tiles


class ForwardScratch(NamedTuple):
  q: Any  # SMEM [2 items, compute_wgs, 64, head_dim]: Q, then the output tile staged for its store
  q_loaded: Any  # barriers [2 items · compute_wgs]
  q_free: Any  # barriers [2 items · compute_wgs]: the item's stores have read its Q slot
  kv: mp.KvRing
  lse: Any  # SMEM float32 [compute_wgs, 64]
  schedule: Any  # ping-pong barrier of two compute warpgroups; None with one
  probs: Any  # interpreter only: SMEM [compute_wgs, 64, 128], P staged for wgmma; None compiled


def smem_bytes(block_q, block_kv, head_dim, stages):
  """Shared memory of the forward's Q slots and K/V ring (16-bit elements)."""
  return (2 * block_q + 2 * stages * KV_BLOCKS_PER_STEP * block_kv) * head_dim * 2


def _forward_kernel(
  inputs: ForwardInputs, outputs: ForwardOutputs, scratch: ForwardScratch, *, scale, block_kv, kv_len, causal, ctas
):
  wg = lax.axis_index("wg")
  q_ref = inputs.q
  dtype = q_ref.dtype
  dim = q_ref.shape[-1]
  batch_size, heads, n_q_blocks = inputs.kv_block_count.shape
  compute_wgs = scratch.q.shape[1]
  num_stages = scratch.kv.k.shape[0]
  block_q = compute_wgs * mp.WG_ROWS
  kv_per_step = KV_BLOCKS_PER_STEP
  step_keys = kv_per_step * block_kv
  group = heads // inputs.k.shape[2]  # query heads per kv head
  score_scale = scale * mp.LOG2E
  ring, schedule = scratch.kv, scratch.schedule
  masks_rows = causal or inputs.kv_seq_lengths is not None  # a row may then have listed keys but none valid
  work = mp.work_items(lax.axis_index("ctas"), ctas, (n_q_blocks, heads, batch_size), inputs.schedule)

  def sync_schedule():
    if schedule is not None:
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

  def row_table(item):
    q_block, head, batch = item
    count = inputs.kv_block_count[batch, head, q_block]
    return inputs.kv_block_index.at[batch, head, q_block], count, mp.ceil_div(count, kv_per_step)

  def q_slot(i):
    return lax.rem(i, 2)

  @pl.when(wg < compute_wgs)
  def _compute():
    mp.rebalance_registers(compute_wgs, compute=True)

    def attend(i, item, done):
      q_block, head, batch = item
      kv_index, count, steps = row_table(item)
      rows = pl.ds(q_block * block_q + wg * mp.WG_ROWS, mp.WG_ROWS)
      q_tile, q_barrier = scratch.q.at[q_slot(i), wg], scratch.q_loaded.at[q_slot(i) * compute_wgs + wg]
      plgpu.barrier_wait(q_barrier)  # the memory warpgroup loaded it ahead of time
      # Compiled at head_dim 64, Q (the same for every step) feeds wgmma from registers. Register A
      # operands loaded this way gave wrong products for square score tiles (K × N = 64 × 64 and
      # 128 × 128) and right ones for 64 × 128, this case (MOSAIC_NOTES.md); at head_dim 128 it gained nothing.
      q_operand = q_tile
      if scratch.probs is None and dim == 64:
        q_operand = plgpu.load(q_tile, (), layout=plgpu.Layout.WGMMA)

      mask_keys = mp.key_mask(
        kv_index,
        count,
        block_kv=block_kv,
        kv_len=kv_len,
        kv_per_step=kv_per_step,
        kv_length=None if inputs.kv_seq_lengths is None else jnp.minimum(inputs.kv_seq_lengths[batch], kv_len),
        first_row=q_block * block_q + wg * mp.WG_ROWS if causal else None,
        diagonal_blocks=pl.cdiv(block_q, block_kv),
      )

      def ring_slot(c):
        return lax.rem(done + c, num_stages)

      @pl.when(steps > 0)
      def _():
        plgpu.barrier_wait(ring.k_loaded.at[ring_slot(0)])

      if schedule is not None:
        pl.when(wg == 1)(sync_schedule)

      def step(c, carry):
        acc, row_max, row_sum = carry
        slot = ring_slot(c)

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_operand, ring.k.at[slot].T)
          sync_schedule()  # let the other warpgroup issue its wgmma while this one waits
          return acc_ref[...]

        scores = pl.run_scoped(qk, plgpu.ACC((mp.WG_ROWS, step_keys), jnp.float32))
        plgpu.barrier_arrive(ring.k_free.at[slot])
        # The running max is of unscaled scores, so the scale folds into exp2's argument: one
        # multiply-add per score instead of a multiply and a subtract.
        scores = mask_keys(scores, c)
        new_max = jnp.maximum(row_max, scores.max(axis=1))
        scaled_max = new_max * score_scale
        correction = jnp.exp2(row_max * score_scale - scaled_max)
        probs = jnp.exp2(scores * score_scale - mp.row_broadcast(scaled_max, scores.shape))
        acc = acc * mp.row_broadcast(correction, acc.shape)
        row_sum = row_sum * correction + probs.sum(axis=1)
        probs = probs.astype(dtype)
        if schedule is not None:
          plgpu.barrier_arrive(schedule)  # softmax done
        plgpu.barrier_wait(ring.v_loaded.at[slot])
        if schedule is not None:
          plgpu.barrier_wait(schedule)  # tensor cores free

        def wait_next_k():
          @pl.when(c + 1 < steps)
          def _():
            plgpu.barrier_wait(ring.k_loaded.at[ring_slot(c + 1)])

        probs_smem = None if scratch.probs is None else scratch.probs.at[wg]
        acc = mp.mma(acc, probs, ring.v.at[slot], a_smem=probs_smem, while_running=wait_next_k)
        plgpu.barrier_arrive(ring.v_free.at[slot])
        return acc, new_max, row_sum

      init = (
        plgpu.layout_cast(jnp.zeros((mp.WG_ROWS, dim), jnp.float32), plgpu.Layout.WGMMA),
        plgpu.layout_cast(jnp.full((mp.WG_ROWS,), -jnp.inf, jnp.float32), mp.ROW),
        plgpu.layout_cast(jnp.zeros((mp.WG_ROWS,), jnp.float32), mp.ROW),
      )
      acc, row_max, row_sum = lax.fori_loop(0, steps, step, init)
      if schedule is not None:
        pl.when(wg == 0)(sync_schedule)

      empty = row_sum == 0.0
      if masks_rows:  # every listed key masked: the scores were all MASKED
        empty = empty | (row_max == mp.MASKED)
      safe_sum = jnp.where(empty, 1.0, row_sum)
      out = acc * mp.row_broadcast(1.0 / safe_sum, acc.shape)
      if masks_rows:  # such a row's probabilities were exp2 of the rounding error of MASKED·scale: not 0
        out = jnp.where(mp.row_broadcast(jnp.where(empty, 1.0, 0.0), acc.shape) > 0.0, 0.0, out)
      q_tile[...] = out.astype(dtype)
      lse_tile = scratch.lse.at[wg]
      lse_tile[...] = jnp.where(empty, -jnp.inf, row_max * scale + jnp.log(safe_sum))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, outputs.out.at[batch, rows, head], commit_group=False)
      plgpu.copy_smem_to_gmem(lse_tile, outputs.lse.at[batch, head, rows], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      # The Q slot and the lse tile are free once the stores have read them.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      plgpu.barrier_arrive(scratch.q_free.at[q_slot(i) * compute_wgs + wg])
      return done + steps

    work.run(attend)
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == compute_wgs)
  def _memory():
    mp.rebalance_registers(compute_wgs, compute=False)

    def stream(i, item, done):
      q_block, head, batch = item
      kv_index, count, steps = row_table(item)
      kv_head = head if group == 1 else lax.div(head, group)
      for w in range(compute_wgs):
        barrier = q_slot(i) * compute_wgs + w
        pl.when(i >= 2)(lambda: plgpu.barrier_wait(scratch.q_free.at[barrier]))  # item i - 2's
        rows = pl.ds(q_block * block_q + w * mp.WG_ROWS, mp.WG_ROWS)
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], scratch.q.at[q_slot(i), w], scratch.q_loaded.at[barrier])
      mp.stream_kv(
        kv_index,
        count,
        inputs.k.at[batch, :, kv_head],
        inputs.v.at[batch, :, kv_head],
        ring,
        block_kv=block_kv,
        num_stages=num_stages,
        kv_per_step=kv_per_step,
        done=done,
      )
      return done + steps

    mp.drain_kv(work.run(stream), num_stages, ring)
    mp.drain(work.count, 2, lambda i: [scratch.q_free.at[q_slot(i) * compute_wgs + w] for w in range(compute_wgs)])


def forward_call(
  q,
  k,
  v,
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
  ctas,
  interpret,
):
  """One launch of the forward kernel on `ctas` CTAs with a ring of `stages` K/V slots.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, ≥ kv_len, kv_heads, head_dim], keys from kv_len on
  (zero padding) masked; schedule: an `mp.Schedule` of the CTAs, or None for round-robin; kv_seq_lengths:
  int32 [batch] or None; causal: query i attends keys j ≤ i.
  Returns (out [batch, q_len, heads, head_dim], lse float32 [batch, heads, q_len]).
  """
  batch, q_len, heads, dim = q.shape
  n_q_blocks = kv_block_index.shape[-2]
  compute_wgs = block_q // mp.WG_ROWS
  step_keys = KV_BLOCKS_PER_STEP * block_kv
  scratch = ForwardScratch(
    q=mp.tiled_smem((2, compute_wgs, mp.WG_ROWS, dim), q.dtype),
    q_loaded=plgpu.Barrier(num_barriers=2 * compute_wgs),
    q_free=plgpu.Barrier(num_barriers=2 * compute_wgs),
    kv=mp.KvRing.scratch(stages, step_keys, dim, k.dtype, blocks_per_step=KV_BLOCKS_PER_STEP, compute_wgs=compute_wgs),
    lse=plgpu.SMEM((compute_wgs, mp.WG_ROWS), jnp.float32),
    schedule=plgpu.Barrier(num_arrivals=2) if compute_wgs == 2 else None,
    probs=mp.tiled_smem((compute_wgs, mp.WG_ROWS, step_keys), q.dtype) if interpret else None,
  )
  out, lse = mp.call_kernel(
    lambda *refs: _forward_kernel(*refs, scale=scale, block_kv=block_kv, kv_len=kv_len, causal=causal, ctas=ctas),
    ForwardInputs(kv_block_index, kv_block_count, schedule, q, k, v, kv_seq_lengths),
    ForwardOutputs(
      out=jax.ShapeDtypeStruct(q.shape, q.dtype),
      lse=jax.ShapeDtypeStruct((batch, heads, n_q_blocks * block_q), jnp.float32),
    ),
    scratch,
    ctas=ctas,
    num_threads=compute_wgs + 1,
    interpret=interpret,
    name="mosaic_block_sparse_forward",
  )
  return out, lse[..., :q_len]  # lse is written whole tiles at a time
