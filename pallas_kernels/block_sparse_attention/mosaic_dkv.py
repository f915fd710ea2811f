"""The Mosaic GPU block-sparse attention dK/dV kernel: per kv block, over the q blocks that keep it.

A CTA holds two (compute, memory) warpgroup pairs, one kv block each (adjacent kv blocks have different q
lists, so the pairs run independently). Each pair is a persistent lane: it runs work items (kv block,
kv head, batch) dealt round-robin or by `schedule.balanced_schedule` (the q lists differ in length; with
causal masking by design, as a kv block's q blocks are those at or after it). Its
memory warpgroup loads each item's K and V into one of `kv_slots` slots (freed once the dK/dV stores,
staged there, have read it) and runs one ring of Q, dO, lse and delta 64-row sub-tiles, from the
transposed table, through all the pair's items. With GQA an item's table lists the q blocks of all the
kv head's query heads (entry member · n_q_blocks + q block, query head kv_head · group + member), so dK
and dV sum over the group in registers and are stored once.

Within a step Sᵀ = K Qᵀ and dPᵀ = V dOᵀ are issued together and Pᵀ is formed under dPᵀ's wgmma, then
dV += Pᵀ dO is issued and dSᵀ formed under it before dK += dSᵀ Q.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention import mosaic_pipeline as mp

PAIRS = 2  # (compute, memory) warpgroup pairs per CTA, one kv block each


class DkvInputs(NamedTuple):
  q_block_index: Any  # int32 [batch, kv_heads, n_kv_blocks, group · n_q_blocks]: entries member · n_q_blocks + q block
  q_block_count: Any  # int32 [batch, kv_heads, n_kv_blocks]
  schedule: mp.Schedule | None  # None: items dealt round-robin
  q: Any  # [batch, q_len, heads, head_dim]; query head kv_head · group + member
  k: Any  # [batch, kv_len, kv_heads, head_dim]
  v: Any
  d_out: Any  # [batch, q_len, heads, head_dim]
  lse: Any  # float32 [batch, heads, n_q_blocks·block_q], zero padded
  delta: Any  # float32 [batch, heads, n_q_blocks·block_q], zero padded
  kv_seq_lengths: Any  # int32 [batch]: valid keys per batch; None: kv_len


class DkvOutputs(NamedTuple):
  dk: Any  # [batch, kv_len, kv_heads, head_dim]
  dv: Any


class DkvScratch(NamedTuple):
  k: Any  # SMEM [PAIRS · kv_slots, 64, head_dim]: K, then the dK tile staged for its store
  v: Any  # SMEM [PAIRS · kv_slots, 64, head_dim]: V, then the dV tile
  q: Any  # SMEM [PAIRS · stages, 64, head_dim]: the Q/dO ring, `stages` sub-tiles per pair
  d_out: Any
  lse: Any  # SMEM float32 [PAIRS · stages, 64]
  delta: Any
  kv_loaded: Any  # barriers [2 · PAIRS · kv_slots]: K and V of each slot
  kv_free: Any  # barriers [PAIRS · kv_slots]: the item's stores have read its slot
  q_loaded: Any  # barriers [PAIRS · stages], one per row copy
  d_out_loaded: Any
  lse_loaded: Any
  delta_loaded: Any
  q_free: Any  # barriers [PAIRS · stages]: the compute warpgroup is done with the sub-tile
  d_scores: Any  # interpreter only: SMEM [PAIRS, 64, 64], Pᵀ and dSᵀ staged for wgmma; None compiled


def smem_bytes(block_kv, head_dim, stages, kv_slots):
  """Shared memory of the dK/dV kernel's K/V slots and Q/dO/lse/delta rings (16-bit elements)."""
  return PAIRS * (
    kv_slots * 2 * block_kv * head_dim * 2 + stages * (2 * mp.WG_ROWS * head_dim * 2 + 2 * mp.WG_ROWS * 4)
  )


def kv_slots_that_fit(block_kv, head_dim, stages):
  """Two K/V slots per pair where they fit in SMEM beside `stages` Q/dO sub-tiles (the next item's K/V
  then lands during this item), else one."""
  return 2 if smem_bytes(block_kv, head_dim, stages, 2) + mp.SMEM_OVERHEAD <= mp.SMEM_BYTES else 1


def _causal_mask(scores_t, first_key, first_row):
  """Sᵀ [keys, queries] of the keys from first_key on and the queries from first_row on, with every key
  after its query at MASKED."""
  keys = plgpu.broadcasted_iota(jnp.int32, scores_t.shape, 0, layout=plgpu.Layout.WGMMA) + first_key
  queries = plgpu.broadcasted_iota(jnp.int32, scores_t.shape, 1, layout=plgpu.Layout.WGMMA) + first_row
  return jnp.where(keys <= queries, scores_t, mp.MASKED)


def _dkv_kernel(
  inputs: DkvInputs, outputs: DkvOutputs, scratch: DkvScratch, *, scale, block_q, block_kv, n_q_blocks, causal, ctas
):
  wg = lax.axis_index("wg")
  pair = lax.rem(wg, PAIRS)  # warpgroups pair and pair + PAIRS serve one kv block
  batch_size, kv_heads, n_kv_blocks = inputs.q_block_count.shape
  group = inputs.q.shape[2] // kv_heads  # query heads per kv head
  kv_slots = scratch.k.shape[0] // PAIRS
  num_stages = scratch.q.shape[0] // PAIRS
  sub_tiles = block_q // mp.WG_ROWS  # q blocks stream as 64-row sub-tiles
  q_ref = inputs.q
  dtype = q_ref.dtype
  dim = q_ref.shape[-1]
  score_scale = scale * mp.LOG2E
  lane = lax.axis_index("ctas") * PAIRS + pair
  counts = (n_kv_blocks, kv_heads, batch_size)
  work = mp.work_items(lane, ctas * PAIRS, counts, inputs.schedule)

  def column(item):
    kv_block, kv_head, batch = item
    return (
      inputs.q_block_index.at[batch, kv_head, kv_block],
      inputs.q_block_count[batch, kv_head, kv_block] * sub_tiles,
      pl.ds(kv_block * block_kv, block_kv),
    )

  def sub_tile(q_index, kv_head, t):
    """(query head, first row) of sub-tile t of a column whose table entries are q_index."""
    entry = q_index[lax.div(t, sub_tiles)]
    if group == 1:
      q_head, q_block = kv_head, entry
    else:
      q_head, q_block = kv_head * group + lax.div(entry, n_q_blocks), lax.rem(entry, n_q_blocks)
    return q_head, q_block * block_q + lax.rem(t, sub_tiles) * mp.WG_ROWS

  def stage(r):  # ring step r (counted over the pair's items) -> its Q/dO slot
    return pair * num_stages + lax.rem(r, num_stages)

  def kv_slot(i):
    return pair * kv_slots + lax.rem(i, kv_slots)

  @pl.when(wg < PAIRS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")  # 2·232 + 2·24 = 4·128 per CTA

    def grad_keys(i, item, done):
      kv_block, kv_head, batch = item
      q_index, steps, keys = column(item)
      slot = kv_slot(i)
      k_tile, v_tile = scratch.k.at[slot], scratch.v.at[slot]
      plgpu.barrier_wait(scratch.kv_loaded.at[2 * slot])  # loaded ahead of time
      plgpu.barrier_wait(scratch.kv_loaded.at[2 * slot + 1])
      ds_tile = None if scratch.d_scores is None else scratch.d_scores.at[pair]

      def step_of(t, carry, first_row=None):
        """One sub-tile step; first_row given: keys after their query (first_row: the sub-tile's first
        row) are masked."""
        dk, dv = carry
        s = stage(done + t)
        q_tile, do_tile = scratch.q.at[s], scratch.d_out.at[s]
        plgpu.barrier_wait(scratch.q_loaded.at[s])

        def probs_of(scores_t):
          if first_row is not None:
            scores_t = _causal_mask(scores_t, kv_block * block_kv, first_row)
          plgpu.barrier_wait(scratch.lse_loaded.at[s])
          lse2 = plgpu.load(scratch.lse.at[s], layout=mp.COL) * mp.LOG2E
          # Keys past kv_len need no mask: their rows of dK and dV are never stored (and rows past
          # kv_seq_lengths are zeroed below).
          return jnp.exp2(scores_t * score_scale - mp.col_broadcast(lse2, scores_t.shape))

        # Sᵀ = K Qᵀ and dPᵀ = V dOᵀ together, Pᵀ formed under dPᵀ's wgmma.
        probs_t, d_probs_t = mp.two_products(
          (k_tile, q_tile.T),
          (v_tile, do_tile.T),
          (block_kv, mp.WG_ROWS),
          before_second=lambda: plgpu.barrier_wait(scratch.d_out_loaded.at[s]),
          while_second=probs_of,
        )

        def d_scores_t():
          plgpu.barrier_wait(scratch.delta_loaded.at[s])
          delta = plgpu.load(scratch.delta.at[s], layout=mp.COL)
          return (probs_t * (d_probs_t - mp.col_broadcast(delta, probs_t.shape))).astype(dtype)

        # dV += Pᵀ dO, then dK += dSᵀ Q with dSᵀ formed under dV's wgmma.
        dv, dk = mp.mma_then(dv, probs_t.astype(dtype), do_tile, dk, d_scores_t, q_tile, a_smem=ds_tile)
        plgpu.barrier_arrive(scratch.q_free.at[s])
        return dk, dv

      def step(t, carry):
        if not causal:
          return step_of(t, carry)
        # Only sub-tiles crossing the diagonal pay for the mask. The branch holds the whole step, so that
        # no branch sits inside a product's flight.
        first_row = sub_tile(q_index, kv_head, t)[1]
        return lax.cond(
          kv_block * block_kv + block_kv - 1 > first_row,
          lambda carry: step_of(t, carry, first_row),
          lambda carry: step_of(t, carry),
          carry,
        )

      zeros = plgpu.layout_cast(jnp.zeros((block_kv, dim), jnp.float32), plgpu.Layout.WGMMA)
      dk, dv = lax.fori_loop(0, steps, step, (zeros, zeros))
      if inputs.kv_seq_lengths is not None:  # keys past the batch's length take no part: zero gradients
        key = plgpu.broadcasted_iota(jnp.int32, dk.shape, 0, layout=plgpu.Layout.WGMMA) + kv_block * block_kv
        valid = key < inputs.kv_seq_lengths[batch]
        dk, dv = jnp.where(valid, dk, 0.0), jnp.where(valid, dv, 0.0)
      k_tile[...] = (dk * scale).astype(dtype)
      v_tile[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_tile, outputs.dk.at[batch, keys, kv_head], commit_group=False)
      plgpu.copy_smem_to_gmem(v_tile, outputs.dv.at[batch, keys, kv_head], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      # The K/V slot is free once the stores have read it.
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      plgpu.barrier_arrive(scratch.kv_free.at[slot])
      return done + steps

    work.run(grad_keys)
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg >= PAIRS)
  def _memory():
    plgpu.set_max_registers(24, action="decrease")

    def stream(i, item, done):
      _, kv_head, batch = item
      q_index, steps, keys = column(item)

      def load(t, wait_free):
        s = stage(done + t)
        q_head, first_row = sub_tile(q_index, kv_head, t)
        rows = pl.ds(first_row, mp.WG_ROWS)
        wait_free(scratch.q_free.at[s])
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, q_head], scratch.q.at[s], scratch.q_loaded.at[s])
        plgpu.copy_gmem_to_smem(inputs.lse.at[batch, q_head, rows], scratch.lse.at[s], scratch.lse_loaded.at[s])
        plgpu.copy_gmem_to_smem(inputs.d_out.at[batch, rows, q_head], scratch.d_out.at[s], scratch.d_out_loaded.at[s])
        plgpu.copy_gmem_to_smem(inputs.delta.at[batch, q_head, rows], scratch.delta.at[s], scratch.delta_loaded.at[s])

      def load_kv():
        slot = kv_slot(i)
        pl.when(i >= kv_slots)(lambda: plgpu.barrier_wait(scratch.kv_free.at[slot]))  # item i - kv_slots's
        plgpu.copy_gmem_to_smem(inputs.k.at[batch, keys, kv_head], scratch.k.at[slot], scratch.kv_loaded.at[2 * slot])
        plgpu.copy_gmem_to_smem(
          inputs.v.at[batch, keys, kv_head], scratch.v.at[slot], scratch.kv_loaded.at[2 * slot + 1]
        )

      def load_ring(t):
        load(t, lambda barrier: pl.when(done + t >= num_stages)(lambda: plgpu.barrier_wait(barrier)))

      # One K/V slot: it is free only after this item's predecessor has stored its dK/dV, so
      # first fill the ring with this item's first sub-tiles (their slots are freed earlier).
      first = jnp.minimum(steps, num_stages)
      if kv_slots > 1:
        load_kv()
      pl.loop(0, first)(load_ring)
      if kv_slots == 1:
        load_kv()
      pl.loop(first, steps)(load_ring)
      return done + steps

    mp.drain(work.run(stream), num_stages, lambda r: (scratch.q_free.at[stage(r)],))
    mp.drain(work.count, kv_slots, lambda i: (scratch.kv_free.at[kv_slot(i)],))


def dkv_call(
  q,
  k,
  v,
  d_out,
  lse,
  delta,
  q_block_index,
  q_block_count,
  schedule,
  kv_seq_lengths,
  *,
  block_q,
  block_kv,
  scale,
  n_q_blocks,
  causal,
  stages,
  kv_slots,
  ctas,
  interpret,
):
  """One launch of the dK/dV kernel on `ctas` CTAs of PAIRS lanes each.

  lse, delta: float32 [batch, heads, n_q_blocks·block_q], zero padded (padded rows, with zero q and dO,
  then add exactly zero). schedule: an `mp.Schedule` of the (CTA, pair) lanes, or None for round-robin; kv_seq_lengths: int32
  [batch] or None; causal: query i attends keys j ≤ i.
  Returns (dk, dv), [batch, kv_len, kv_heads, head_dim] each, summed over each kv head's query heads.
  """
  dim = q.shape[-1]
  ring = PAIRS * stages
  scratch = DkvScratch(
    k=mp.tiled_smem((PAIRS * kv_slots, block_kv, dim), k.dtype),
    v=mp.tiled_smem((PAIRS * kv_slots, block_kv, dim), v.dtype),
    q=mp.tiled_smem((ring, mp.WG_ROWS, dim), q.dtype),
    d_out=mp.tiled_smem((ring, mp.WG_ROWS, dim), d_out.dtype),
    lse=plgpu.SMEM((ring, mp.WG_ROWS), jnp.float32),
    delta=plgpu.SMEM((ring, mp.WG_ROWS), jnp.float32),
    kv_loaded=plgpu.Barrier(num_barriers=2 * PAIRS * kv_slots),
    kv_free=plgpu.Barrier(num_barriers=PAIRS * kv_slots),
    q_loaded=plgpu.Barrier(num_barriers=ring),
    d_out_loaded=plgpu.Barrier(num_barriers=ring),
    lse_loaded=plgpu.Barrier(num_barriers=ring),
    delta_loaded=plgpu.Barrier(num_barriers=ring),
    q_free=plgpu.Barrier(num_barriers=ring),
    d_scores=mp.tiled_smem((PAIRS, block_kv, mp.WG_ROWS), q.dtype) if interpret else None,
  )
  return mp.call_kernel(
    lambda *refs: _dkv_kernel(
      *refs, scale=scale, block_q=block_q, block_kv=block_kv, n_q_blocks=n_q_blocks, causal=causal, ctas=ctas
    ),
    DkvInputs(q_block_index, q_block_count, schedule, q, k, v, d_out, lse, delta, kv_seq_lengths),
    DkvOutputs(dk=jax.ShapeDtypeStruct(k.shape, k.dtype), dv=jax.ShapeDtypeStruct(v.shape, v.dtype)),
    scratch,
    ctas=ctas,
    num_threads=2 * PAIRS,
    interpret=interpret,
    name="mosaic_block_sparse_dkv",
  )
