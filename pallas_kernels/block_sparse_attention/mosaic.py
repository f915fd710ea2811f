"""Block-sparse flash attention as Pallas Mosaic GPU kernels (Hopper: wgmma + TMA): forward, dQ, dK/dV.

The same algorithm, index tables and conventions as `pallas_kernels.triton_block_sparse` (the
specification): every CTA owns one tile and loops only over the blocks its table row lists, so skipped
blocks cost nothing and no two CTAs write the same output (no atomics). Softmax runs in base 2 in
float32; `lse` is the natural-log log-sum-exp [batch, heads, q_len]; a row with no kept block outputs 0
and has lse = -inf.

Hopper specifics (the design follows jax's `attention_mgpu.py`, FlashAttention-3 style):
- Warp specialisation. A CTA runs compute warpgroups plus one memory warpgroup that only issues TMA
  copies. The memory warpgroup reads the index table and streams the gathered tiles (K/V for forward
  and dQ; Q, dO, lse, delta for dK/dV) into a ring of `num_stages` shared-memory slots, each with a
  "loaded" barrier (TMA transaction count) and a "free" barrier (consumers arrive when done with it).
- Forward and dQ: a CTA is one q block of `block_q` = 64·W rows, W compute warpgroups of 64 rows each
  sharing one K/V stream (the rows of a q block share their kv list). With W = 2 the forward also
  ping-pongs the two warpgroups on a schedule barrier, so one's softmax overlaps the other's wgmma.
- dK/dV: a CTA holds two kv blocks (adjacent blocks have different q lists), one per (compute,
  memory) warpgroup pair; each pair streams its own q blocks, as 64-row sub-tiles, from the
  transposed table. Persistent pairs take kv blocks as `schedule.balanced_schedule` deals them by q
  count (at head_dim 128, `dkv_balanced`), since the q lists differ in length.
- Tuning variants (keyword arguments; the defaults are the fastest measured on an H100):
  `kv_blocks_per_step=2` puts two kept kv blocks in one 128-row slot (forward; `dq_kv_blocks_per_step`
  for dQ), `persistent=True` runs one forward CTA per SM over all work items (`dq_persistent`,
  `dkv_persistent` for the backward kernels), `delta_in_dq` forms rowsum(dO·O) inside the dQ kernel.
  pallas_kernels/MOSAIC_NOTES.md and benchmarks/NOTES.md have the measurements.
- dK/dV overlaps within a step: Sᵀ and dPᵀ are issued together and Pᵀ is formed under dPᵀ's wgmma, dSᵀ
  under dV's (`_two_products`).
- Ragged lengths cost nothing extra: TMA loads fill out-of-range rows with zeros and TMA stores drop
  them. Out-of-range keys of the last kv block get a large finite negative score (never -inf
  arithmetic); zero-filled padded q rows add exactly zero to dK/dV (their dO and delta are zero).

Only 16-bit inputs (bf16, fp16): wgmma wants 16-bit operands; float32 callers use the triton backend.
`interpret=True` runs the kernels on CPU with the Mosaic GPU interpreter (`plgpu.InterpretGPUParams`);
an `InterpretGPUParams` instance may be passed instead, e.g. with `detect_races=True`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention.schedule import balanced_schedule

LOG2E = math.log2(math.e)
_MASKED = -1e30
_WG_ROWS = 64  # rows of one warpgroup's wgmma tile
_O_PART = 64  # columns of O per load when the dQ kernel forms delta (128 bytes: one swizzle row)
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column of a wgmma tile


def _tiled_smem(shape, dtype):
  """Shared memory laid out for TMA and wgmma: (8, 64)-element tiles, 128-byte swizzle."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _interpret_params(interpret):
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else None


def supported(dtype, head_dim, block_q, block_kv) -> bool:
  """Whether these kernels handle the case (else use the triton kernels)."""
  return dtype in (jnp.bfloat16, jnp.float16) and head_dim in (64, 128) and block_q in (64, 128) and block_kv == 64


def _check_inputs(q, k, v, block_q, block_kv):
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(
      f"q, k, v: the mosaic backend needs bf16 or fp16 inputs (wgmma takes 16-bit "
      f"operands), got {q.dtype}, {k.dtype}, {v.dtype}; use backend='triton' for float32"
    )
  if q.shape[-1] not in (64, 128) or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
    raise ValueError(
      f"q, k, v: the mosaic backend needs head_dim 64 or 128, got {q.shape}, {k.shape}, {v.shape}; use backend='triton'"
    )
  if block_q not in (64, 128):
    raise ValueError(f"block_q: the mosaic backend needs 64 or 128, got {block_q}")
  if block_kv != 64:
    raise ValueError(f"block_kv: the mosaic backend needs 64, got {block_kv}")


def _row_broadcast(x, shape):
  return lax.broadcast_in_dim(x, shape, [0])


def _col_broadcast(x, shape):
  return lax.broadcast_in_dim(x, shape, [1])


def _mma(acc, a, b, *, a_smem=None, while_running=None):
  """acc + a @ b on the tensor cores, float32 accumulation. a: a value in registers; b: an SMEM ref.

  Compiled (a_smem None): wgmma accumulates in place in acc's registers with a read from registers,
  and `while_running` runs while it is in flight. Interpreted: the Mosaic GPU interpreter has neither
  `pl.run_state` nor register operands, so a is staged through the SMEM scratch a_smem and the
  product of a fresh accumulator is added; the result is the same.
  """
  if a_smem is None:

    def accumulate(acc_ref):
      plgpu.wgmma(acc_ref, a, b)
      if while_running is not None:
        while_running()

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))

  a_smem[...] = a
  plgpu.commit_smem()

  def product(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b)
    return acc_ref[...]

  acc = acc + pl.run_scoped(product, plgpu.ACC(acc.shape, jnp.float32))
  if while_running is not None:
    while_running()
  return acc


def _two_products(first, second, shape, *, before_second, while_second):
  """(while_second(a1 @ b1), a2 @ b2) with float32 accumulation; first = (a1, b1), second = (a2, b2),
  all SMEM operands. Both products are issued back to back and while_second runs on the first while
  the second is still on the tensor cores (the softmax's exp under dP's wgmma, as FlashAttention-3
  does); before_second runs between the two issues (a wait for the second's operands)."""

  def products(first_ref, second_ref):
    plgpu.wgmma(first_ref, *first)
    before_second()
    plgpu.wgmma(second_ref, *second)
    result = while_second(plgpu.wgmma_accumulator_load(first_ref, wait_n=1))
    return result, second_ref[...]

  return pl.run_scoped(products, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))


def _mma_then(acc, a, b, acc2, make_a2, b2, *, a_smem=None):
  """(acc + a @ b, acc2 + make_a2() @ b2): a and make_a2()'s result in registers, b and b2 in SMEM.

  Compiled, make_a2 runs while the first product is on the tensor cores (dSᵀ formed under dV's
  wgmma). Interpreted, both go through a_smem one after the other, as `_mma`.
  """
  if a_smem is not None:
    acc = _mma(acc, a, b, a_smem=a_smem)
    return acc, _mma(acc2, make_a2(), b2, a_smem=a_smem)

  def accumulate(refs):
    ref, ref2 = refs
    plgpu.wgmma(ref, a, b)
    plgpu.wgmma(ref2, make_a2(), b2)

  return pl.run_state(accumulate)((plgpu.ACC.init(acc), plgpu.ACC.init(acc2)))


def _rebalance_registers(compute_wgs, *, compute):
  """Move registers from the memory warpgroup to two compute warpgroups (2·232 + 40 = 3·168).

  With one compute warpgroup each of the two already has the most a thread can hold.
  """
  if compute_wgs == 2:
    plgpu.set_max_registers(232 if compute else 40, action="increase" if compute else "decrease")


def _drain(count, num_stages, free_barriers):
  """Memory warpgroup epilogue: observe the releases of the last `num_stages` steps.

  The loads only waited for the releases of steps before count - num_stages. Observing every phase
  of a barrier one waits on keeps its parity in step (and the interpreter checks it).
  """

  @pl.loop(jnp.maximum(count - num_stages, 0), count)
  def _(c):
    for barrier in free_barriers(c):
      plgpu.barrier_wait(barrier)


def _ceil_div(a, b):
  return lax.div(a + b - 1, b)


def _stream_kv(
  kv_index,
  count,
  k_src,
  v_src,
  k_smem,
  v_smem,
  k_loaded,
  v_loaded,
  k_free,
  v_free,
  *,
  block_kv,
  num_stages,
  kv_per_step=1,
  done=0,
):
  """Memory warpgroup of forward and dQ: TMA one row's kept K and V tiles into the ring of slots.

  k_src, v_src: [kv_len, dim] GMEM views. A step loads `kv_per_step` kept blocks into one slot of
  kv_per_step·block_kv rows; the ring's step `done + c` (`done`: steps of earlier work items of a
  persistent CTA) uses slot (done + c) % num_stages, refilled once the compute warpgroups release it
  (K and V separately, so the next K can land while V is still in use). An odd count's last step
  loads its last block twice: the second copy is finite data that the compute side masks out.
  The caller drains the releases (`_drain`) after its last row.
  """

  def load(c, slot, wait_free):
    if kv_per_step == 1:
      blocks = [kv_index[c]]
    else:
      blocks = [kv_index[jnp.minimum(kv_per_step * c + h, count - 1)] for h in range(kv_per_step)]
    for free, loaded, src, smem in ((k_free, k_loaded, k_src, k_smem), (v_free, v_loaded, v_src, v_smem)):
      wait_free(free.at[slot])
      for h, block in enumerate(blocks):
        dst = smem.at[slot] if kv_per_step == 1 else smem.at[slot, pl.ds(h * block_kv, block_kv)]
        plgpu.copy_gmem_to_smem(src.at[pl.ds(block * block_kv, block_kv)], dst, loaded.at[slot])

  steps = _ceil_div(count, kv_per_step)
  if isinstance(done, int) and done == 0:  # the first row of a CTA: the first slots are all free
    for c in range(num_stages):
      pl.when(c < steps)(functools.partial(load, c, c, lambda barrier: None))

    @pl.loop(num_stages, steps)
    def _(c):
      load(c, lax.rem(c, num_stages), plgpu.barrier_wait)
  else:

    @pl.loop(0, steps)
    def _(c):
      ring_step = done + c
      load(
        c,
        lax.rem(ring_step, num_stages),
        lambda barrier: pl.when(ring_step >= num_stages)(lambda: plgpu.barrier_wait(barrier)),
      )


def _drain_kv(steps, num_stages, k_free, v_free):
  _drain(steps, num_stages, lambda c: (k_free.at[lax.rem(c, num_stages)], v_free.at[lax.rem(c, num_stages)]))


def _key_mask(kv_index, count, *, block_kv, kv_len, kv_per_step=1):
  """(scores [rows, kv_per_step·block_kv], step) -> scores with keys that do not exist at a large
  finite negative: keys past kv_len and, at an odd count's last step, the repeated block.

  Only a row's last step can hold either (rows list their kv blocks ascending, so the partial last
  block comes last), so only that step pays for the compare and select: on every other step they
  were two of the softmax's ~6 instructions per score. Never -inf arithmetic, which can make NaN.
  """
  if kv_per_step == 1 and kv_len % block_kv == 0:
    return lambda scores, c: scores
  steps = _ceil_div(count, kv_per_step)
  last = jnp.maximum(count - 1, 0)
  last_valid = (last - (steps - 1) * kv_per_step) * block_kv + jnp.minimum(kv_len - kv_index[last] * block_kv, block_kv)

  def mask_last(scores):
    cols = plgpu.broadcasted_iota(jnp.int32, scores.shape, 1, layout=plgpu.Layout.WGMMA)
    return jnp.where(cols < last_valid, scores, _MASKED)

  return lambda scores, c: lax.cond(c == steps - 1, mask_last, lambda scores: scores, scores)


# ----------------------------------------------------------------------------------------- forward


def _forward_kernel(
  kv_index_ref,
  kv_count_ref,
  q_ref,
  k_ref,
  v_ref,
  out_ref,
  lse_ref,
  q_smem,
  k_smem,
  v_smem,
  lse_smem,
  q_loaded,
  q_free,
  k_loaded,
  v_loaded,
  k_free,
  v_free,
  schedule,
  p_smem,
  *,
  scale,
  block_kv,
  kv_per_step,
  num_stages,
  compute_wgs,
  kv_len,
  ctas,
):
  """One work item is one (q block, head, batch). ctas None: the grid has one CTA per item.
  ctas an int: the grid has `ctas` persistent CTAs; CTA j runs items j, j + ctas, ... (q blocks
  fastest, so the CTAs running at one time share a head's K/V in L2); its memory warpgroup loads each
  item's Q into one of two slots and runs one ring of K/V steps through all its items, so the next
  item's loads overlap this item's last steps and epilogue.
  """
  wg = lax.axis_index("wg")
  dtype = q_ref.dtype
  dim = q_ref.shape[-1]
  batch_size, heads, n_q_blocks = kv_count_ref.shape
  block_q = compute_wgs * _WG_ROWS
  step_keys = kv_per_step * block_kv
  score_scale = scale * LOG2E
  persistent = ctas is not None

  if persistent:
    cta = lax.axis_index("ctas")
    n_items = lax.div(batch_size * heads * n_q_blocks - 1 - cta, ctas) + 1  # ctas <= items

    def work_items(body):
      def item(i, done):
        w = i * ctas + cta
        rest = lax.div(w, n_q_blocks)
        return body(i, (lax.rem(w, n_q_blocks), lax.rem(rest, heads), lax.div(rest, heads)), done)

      return lax.fori_loop(0, n_items, item, 0)
  else:

    def work_items(body):
      return body(0, tuple(lax.axis_index(a) for a in ("q_blocks", "heads", "batch")), 0)

  def sync_schedule():
    if schedule is not None:
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

  def row_table(item):
    q_block, head, batch = item
    count = kv_count_ref[batch, head, q_block]
    return kv_index_ref.at[batch, head, q_block], count, _ceil_div(count, kv_per_step)

  def q_slot(i):
    return lax.rem(i, 2) if persistent else 0

  @pl.when(wg < compute_wgs)
  def _compute():
    _rebalance_registers(compute_wgs, compute=True)

    def attend(i, item, done):
      q_block, head, batch = item
      kv_index, count, steps = row_table(item)
      rows = pl.ds(q_block * block_q + wg * _WG_ROWS, _WG_ROWS)
      q_tile, q_barrier = q_smem.at[q_slot(i), wg], q_loaded.at[q_slot(i) * compute_wgs + wg]
      if not persistent:  # persistent: the memory warpgroup loaded it ahead of time
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_tile, q_barrier)
      plgpu.barrier_wait(q_barrier)
      # Compiled at head_dim 64 with two kv blocks per step (the default), Q (the same for every
      # step) feeds wgmma from registers: -2.5% time. Register A operands loaded this way gave wrong
      # products for 64 × 64 and 128 × 128 (K × N) score tiles, right ones for 64 × 128 and 128 × 64
      # (benchmarks/NOTES.md); only the checked case uses it, and at head_dim 128 it gained nothing.
      q_operand = q_tile
      if p_smem is None and dim == 64 and step_keys == 128:
        q_operand = plgpu.load(q_tile, (), layout=plgpu.Layout.WGMMA)

      mask_keys = _key_mask(kv_index, count, block_kv=block_kv, kv_len=kv_len, kv_per_step=kv_per_step)

      def ring_slot(c):
        return lax.rem(done + c, num_stages)

      @pl.when(steps > 0)
      def _():
        plgpu.barrier_wait(k_loaded.at[ring_slot(0)])

      if schedule is not None:
        pl.when(wg == 1)(sync_schedule)

      def step(c, carry):
        acc, row_max, row_sum = carry
        slot = ring_slot(c)

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_operand, k_smem.at[slot].T)
          sync_schedule()  # let the other warpgroup issue its wgmma while this one waits
          return acc_ref[...]

        scores = pl.run_scoped(qk, plgpu.ACC((_WG_ROWS, step_keys), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        # The running max is of unscaled scores, so the scale folds into exp2's argument: one
        # multiply-add per score instead of a multiply and a subtract.
        scores = mask_keys(scores, c)
        new_max = jnp.maximum(row_max, scores.max(axis=1))
        scaled_max = new_max * score_scale
        correction = jnp.exp2(row_max * score_scale - scaled_max)
        probs = jnp.exp2(scores * score_scale - _row_broadcast(scaled_max, scores.shape))
        acc = acc * _row_broadcast(correction, acc.shape)
        row_sum = row_sum * correction + probs.sum(axis=1)
        probs = probs.astype(dtype)
        if schedule is not None:
          plgpu.barrier_arrive(schedule)  # softmax done
        plgpu.barrier_wait(v_loaded.at[slot])
        if schedule is not None:
          plgpu.barrier_wait(schedule)  # tensor cores free

        def wait_next_k():
          @pl.when(c + 1 < steps)
          def _():
            plgpu.barrier_wait(k_loaded.at[ring_slot(c + 1)])

        acc = _mma(
          acc, probs, v_smem.at[slot], a_smem=None if p_smem is None else p_smem.at[wg], while_running=wait_next_k
        )
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, new_max, row_sum

      init = (
        plgpu.layout_cast(jnp.zeros((_WG_ROWS, dim), jnp.float32), plgpu.Layout.WGMMA),
        plgpu.layout_cast(jnp.full((_WG_ROWS,), -jnp.inf, jnp.float32), _ROW),
        plgpu.layout_cast(jnp.zeros((_WG_ROWS,), jnp.float32), _ROW),
      )
      acc, row_max, row_sum = lax.fori_loop(0, steps, step, init)
      if schedule is not None:
        pl.when(wg == 0)(sync_schedule)

      empty = row_sum == 0.0
      safe_sum = jnp.where(empty, 1.0, row_sum)
      q_tile[...] = (acc * _row_broadcast(1.0 / safe_sum, acc.shape)).astype(dtype)
      lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, row_max * scale + jnp.log(safe_sum))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, out_ref.at[batch, rows, head], commit_group=False)
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, rows], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      if persistent:  # the Q slot and lse_smem are free once the stores have read them
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.barrier_arrive(q_free.at[q_slot(i) * compute_wgs + wg])
      else:
        plgpu.wait_smem_to_gmem(0)
      return done + steps

    work_items(attend)
    if persistent:
      plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == compute_wgs)
  def _memory():
    _rebalance_registers(compute_wgs, compute=False)

    def stream(i, item, done):
      q_block, head, batch = item
      kv_index, count, steps = row_table(item)
      if persistent:
        for w in range(compute_wgs):
          barrier = q_slot(i) * compute_wgs + w
          pl.when(i >= 2)(lambda: plgpu.barrier_wait(q_free.at[barrier]))  # item i - 2's
          rows = pl.ds(q_block * block_q + w * _WG_ROWS, _WG_ROWS)
          plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[q_slot(i), w], q_loaded.at[barrier])
      _stream_kv(
        kv_index,
        count,
        k_ref.at[batch, :, head],
        v_ref.at[batch, :, head],
        k_smem,
        v_smem,
        k_loaded,
        v_loaded,
        k_free,
        v_free,
        block_kv=block_kv,
        num_stages=num_stages,
        kv_per_step=kv_per_step,
        done=done,
      )
      return done + steps

    _drain_kv(work_items(stream), num_stages, k_free, v_free)
    if persistent:
      _drain(n_items, 2, lambda i: [q_free.at[q_slot(i) * compute_wgs + w] for w in range(compute_wgs)])


_SMEM_BYTES = 227 * 1024  # Hopper's shared memory per CTA
_SMEM_OVERHEAD = 4 * 1024  # lse tile, barriers, alignment of the swizzled buffers


def _num_sms():
  return getattr(jax.devices()[0], "core_count", None) or 132  # H100 SXM when not on a GPU


def _persistent_ctas(persistent, name, max_ctas):
  """persistent (False, True or a number of CTAs) -> None (one CTA per work item) or the CTA count."""
  if isinstance(persistent, bool) or persistent is None:
    ctas = _num_sms() if persistent else None
  elif isinstance(persistent, int) and persistent > 0:
    ctas = persistent
  else:
    raise ValueError(f"{name}: a bool or a positive number of CTAs, got {persistent!r}")
  return None if ctas is None else min(ctas, max_ctas)


def forward(
  q,
  k,
  v,
  kv_block_index,
  kv_block_count,
  *,
  block_q,
  block_kv,
  scale,
  num_stages=2,
  kv_blocks_per_step=2,
  persistent=True,
  interpret=False,
):
  """Block-sparse attention forward.

  q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, heads, dim]; bf16 or fp16, dim 64 or 128.
  kv_block_index: int32 [batch, heads, n_q_blocks, n_kv_blocks]; kv_block_count: int32 [batch, heads, n_q_blocks].
  block_q 64 or 128 (one or two compute warpgroups), block_kv 64; num_stages: K/V slots in flight.
  kv_blocks_per_step 1 or 2: kept kv blocks per pipeline step (2: one [64, 128] score tile per step,
  half the steps, barriers and softmax rescales). persistent: False, one CTA per (q block, head,
  batch); True, one CTA per SM looping over them; an int, that many CTAs.
  Returns (out [batch, q_len, heads, dim], lse float32 [batch, heads, q_len]).
  Defaults: the fastest variant of `python -m benchmarks.mosaic_smoke --sweep` on an H100 (MOSAIC_NOTES.md).
  """
  _check_inputs(q, k, v, block_q, block_kv)
  if kv_blocks_per_step not in (1, 2):
    raise ValueError(f"kv_blocks_per_step: 1 or 2, got {kv_blocks_per_step}")
  ctas = _persistent_ctas(persistent, "persistent", math.prod(kv_block_count.shape))
  q_slots = 1 if ctas is None else 2
  smem = (q_slots * block_q + 2 * num_stages * kv_blocks_per_step * block_kv) * q.shape[-1] * 2
  if not 1 <= num_stages or smem + _SMEM_OVERHEAD > _SMEM_BYTES:
    raise ValueError(
      f"num_stages: {num_stages} with kv_blocks_per_step={kv_blocks_per_step}, "
      f"persistent={persistent}, head_dim {q.shape[-1]} needs {smem // 1024} KB of "
      f"shared memory; Hopper has {_SMEM_BYTES // 1024} KB"
    )
  return _forward(
    q,
    k,
    v,
    kv_block_index,
    kv_block_count,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    num_stages=num_stages,
    kv_per_step=kv_blocks_per_step,
    ctas=ctas,
    interpret=interpret,
  )


@functools.partial(
  jax.jit, static_argnames=("block_q", "block_kv", "scale", "num_stages", "kv_per_step", "ctas", "interpret")
)
def _forward(
  q, k, v, kv_block_index, kv_block_count, *, block_q, block_kv, scale, num_stages, kv_per_step, ctas, interpret
):
  batch, q_len, heads, dim = q.shape
  kv_len = k.shape[1]
  n_q_blocks = kv_block_index.shape[-2]
  compute_wgs = block_q // _WG_ROWS
  q_slots = 1 if ctas is None else 2
  step_keys = kv_per_step * block_kv
  kernel = functools.partial(
    _forward_kernel,
    scale=scale,
    block_kv=block_kv,
    kv_per_step=kv_per_step,
    num_stages=num_stages,
    compute_wgs=compute_wgs,
    kv_len=kv_len,
    ctas=ctas,
  )
  scratch = [
    _tiled_smem((q_slots, compute_wgs, _WG_ROWS, dim), q.dtype),
    _tiled_smem((num_stages, step_keys, dim), k.dtype),
    _tiled_smem((num_stages, step_keys, dim), v.dtype),
    plgpu.SMEM((compute_wgs, _WG_ROWS), jnp.float32),
    plgpu.Barrier(num_barriers=q_slots * compute_wgs),
    plgpu.Barrier(num_barriers=q_slots * compute_wgs) if ctas is not None else None,
    plgpu.Barrier(num_arrivals=kv_per_step, num_barriers=num_stages),
    plgpu.Barrier(num_arrivals=kv_per_step, num_barriers=num_stages),
    plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=num_stages),
    plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=num_stages),
    plgpu.Barrier(num_arrivals=2) if compute_wgs == 2 else None,
    _tiled_smem((compute_wgs, _WG_ROWS, step_keys), q.dtype) if interpret else None,
  ]
  if ctas is None:
    grid, grid_names = (n_q_blocks, heads, batch), ("q_blocks", "heads", "batch")  # q blocks fastest:
  else:  # co-resident CTAs share a head's K/V in L2
    grid, grid_names = (ctas,), ("ctas",)
  # lse is written whole tiles at a time; the padded tail is sliced off below.
  out, lse = plgpu.kernel(
    kernel,
    out_type=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((batch, heads, n_q_blocks * block_q), jnp.float32),
    ],
    scratch_types=scratch,
    grid=grid,
    grid_names=grid_names,
    num_threads=compute_wgs + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=_interpret_params(interpret),
    kernel_name="mosaic_block_sparse_forward",
  )(kv_block_index, kv_block_count, q, k, v)
  return out, lse[..., :q_len]


# ---------------------------------------------------------------------------------------- backward


def _work_items(lane, lanes, counts):
  """Persistent schedule: `lane` of `lanes` runs items lane, lane + lanes, ... of the
  counts = (blocks, heads, batch) work items, blocks fastest (lanes running at one time share a head).

  Returns (n_items, run, item_at): run(body) folds body(i, (block, head, batch), done) over the lane's
  items from done = 0 (body returns the new done, e.g. pipeline steps so far) and returns the final done;
  item_at(i) is the lane's i-th (block, head, batch).
  """
  blocks, heads, batch = counts
  total = blocks * heads * batch
  n_items = jnp.where(lane < total, lax.div(total - 1 - lane, lanes) + 1, 0)

  def item_at(i):
    w = i * lanes + lane
    rest = lax.div(w, blocks)
    return lax.rem(w, blocks), lax.rem(rest, heads), lax.div(rest, heads)

  def run(body):
    return lax.fori_loop(0, n_items, lambda i, done: body(i, item_at(i), done), 0)

  return n_items, run, item_at


def _scheduled_work_items(lane, items_ref, count_ref, counts):
  """As `_work_items`, but `lane` runs the items its row of a `schedule.balanced_schedule` lists:
  items_ref int32 [lanes, rounds] (item w = block + blocks·(head + heads·batch)), count_ref int32 [lanes]."""
  blocks, heads, _ = counts
  n_items = count_ref[lane]

  def item_at(i):
    w = items_ref[lane, i]
    rest = lax.div(w, blocks)
    return lax.rem(w, blocks), lax.rem(rest, heads), lax.div(rest, heads)

  def run(body):
    return lax.fori_loop(0, n_items, lambda i, done: body(i, item_at(i), done), 0)

  return n_items, run, item_at


def _dq_kernel(
  kv_index_ref,
  kv_count_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dq_ref,
  delta_out_ref,
  q_smem,
  do_smem,
  lse_smem,
  delta_smem,
  k_smem,
  v_smem,
  row_loaded,
  row_free,
  k_loaded,
  v_loaded,
  k_free,
  v_free,
  ds_smem,
  o_smem,
  o_loaded,
  *,
  scale,
  block_kv,
  kv_per_step,
  num_stages,
  compute_wgs,
  kv_len,
  ctas,
  row_slots,
):
  """One work item is one (q block, head, batch), as in the forward. ctas None: one CTA per item,
  whose compute warpgroups load their own Q, dO, lse and delta rows. ctas an int: `ctas` persistent
  CTAs; the memory warpgroup loads each item's rows into one of two slots (freed once the dQ store,
  staged in the Q slot, has read it) and runs one K/V ring through all the CTA's items, so the next
  item's rows and first K/V tiles land during this item's last steps and epilogue.

  delta_out_ref None: delta_ref is delta = rowsum(dO·O), precomputed. Else delta_ref is O, and each
  compute warpgroup forms its rows' delta itself from O, 64 columns at a time through o_smem (a whole
  O tile does not fit beside the double-buffered rows at head_dim 128), and writes it to delta_out_ref
  for the dK/dV kernel. The warpgroup issues those O loads itself: the first part of its next item's
  rows as soon as this item's delta is formed, so only the later parts' loads wait.
  """
  wg = lax.axis_index("wg")
  batch_size, heads, n_q_blocks = kv_count_ref.shape
  delta_in_dq = delta_out_ref is not None
  step_keys = kv_per_step * block_kv
  dtype = q_ref.dtype
  dim = q_ref.shape[-1]
  score_scale = scale * LOG2E
  persistent = ctas is not None
  if persistent:
    n_items, work_items, item_at = _work_items(lax.axis_index("ctas"), ctas, (n_q_blocks, heads, batch_size))
  else:

    def work_items(body):
      return body(0, tuple(lax.axis_index(a) for a in ("q_blocks", "heads", "batch")), 0)

  def row_table(item):
    q_block, head, batch = item
    count = kv_count_ref[batch, head, q_block]
    return kv_index_ref.at[batch, head, q_block], count, _ceil_div(count, kv_per_step)

  def row_slot(i):
    return lax.rem(i, row_slots)

  def wg_rows(item, w):
    return pl.ds(item[0] * (compute_wgs * _WG_ROWS) + w * _WG_ROWS, _WG_ROWS)

  def row_copies(item, slot, w):
    """(source, destination) of warpgroup w's Q, dO, lse (and delta) rows; all arrive on one barrier."""
    _, head, batch = item
    rows = wg_rows(item, w)
    copies = (
      (q_ref.at[batch, rows, head], q_smem.at[slot, w]),
      (do_ref.at[batch, rows, head], do_smem.at[slot, w]),
      (lse_ref.at[batch, head, rows], lse_smem.at[slot, w]),
    )
    return copies if delta_in_dq else copies + ((delta_ref.at[batch, head, rows], delta_smem.at[slot, w]),)

  def load_o_part(item, h):
    """TMA of columns [64·h, 64·h + 64) of this warpgroup's O rows of `item` into o_smem."""
    _, head, batch = item
    plgpu.copy_gmem_to_smem(
      delta_ref.at[batch, wg_rows(item, wg), head, pl.ds(h * _O_PART, _O_PART)], o_smem.at[wg], o_loaded.at[wg]
    )

  def row_delta(i, item, slot):
    """rowsum(dO·O) of this warpgroup's rows of `item` (its first O part already requested), stored
    to delta_out_ref; then requests the first O part of the next item."""
    delta = None
    for h in range(q_ref.shape[-1] // _O_PART):
      if h > 0:
        load_o_part(item, h)
      plgpu.barrier_wait(o_loaded.at[wg])
      o = plgpu.load(o_smem.at[wg], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
      d_o = plgpu.load(do_smem.at[slot, wg, :, pl.ds(h * _O_PART, _O_PART)], layout=plgpu.Layout.WGMMA)
      part = jnp.sum(o * d_o.astype(jnp.float32), axis=1)
      delta = part if delta is None else delta + part
      plgpu.commit_smem()  # every thread has read o_smem before the next TMA overwrites it
    if persistent:
      pl.when(i + 1 < n_items)(lambda: load_o_part(item_at(i + 1), 0))
    _, head, batch = item
    delta_smem.at[slot, wg][...] = delta
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(delta_smem.at[slot, wg], delta_out_ref.at[batch, head, wg_rows(item, wg)])
    return delta

  @pl.when(wg < compute_wgs)
  def _compute():
    _rebalance_registers(compute_wgs, compute=True)

    def grad_rows(i, item, done):
      q_block, head, batch = item
      kv_index, count, steps = row_table(item)
      slot = row_slot(i)
      barrier = row_loaded.at[slot * compute_wgs + wg]
      if not persistent:  # persistent: the memory warpgroup loaded them ahead of time
        for src, dst in row_copies(item, slot, wg):
          plgpu.copy_gmem_to_smem(src, dst, barrier)
      plgpu.barrier_wait(barrier)
      q_tile, do_tile = q_smem.at[slot, wg], do_smem.at[slot, wg]
      lse2 = plgpu.load(lse_smem.at[slot, wg], layout=_ROW) * LOG2E
      if delta_in_dq:
        if persistent:
          pl.when(i == 0)(lambda: load_o_part(item, 0))  # later items': requested by the previous one
        else:
          load_o_part(item, 0)
        delta = row_delta(i, item, slot)
      else:
        delta = plgpu.load(delta_smem.at[slot, wg], layout=_ROW)

      mask_keys = _key_mask(kv_index, count, block_kv=block_kv, kv_len=kv_len, kv_per_step=kv_per_step)

      def ring_slot(c):
        return lax.rem(done + c, num_stages)

      @pl.when(steps > 0)
      def _():
        plgpu.barrier_wait(k_loaded.at[ring_slot(0)])

      def step(c, dq):
        kv_slot = ring_slot(c)

        # One product at a time: issuing S = Q Kᵀ and dP = dO Vᵀ together, with P formed under dP's
        # wgmma as in the dK/dV kernel, was slower here (benchmarks/NOTES.md).
        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_tile, k_smem.at[kv_slot].T)
          return acc_ref[...]

        scores = pl.run_scoped(qk, plgpu.ACC((_WG_ROWS, step_keys), jnp.float32))
        scores = mask_keys(scores, c)
        probs = jnp.exp2(scores * score_scale - _row_broadcast(lse2, scores.shape))
        plgpu.barrier_wait(v_loaded.at[kv_slot])

        def dov(acc_ref):
          plgpu.wgmma(acc_ref, do_tile, v_smem.at[kv_slot].T)
          return acc_ref[...]

        d_probs = pl.run_scoped(dov, plgpu.ACC((_WG_ROWS, step_keys), jnp.float32))
        plgpu.barrier_arrive(v_free.at[kv_slot])
        d_scores = probs * (d_probs - _row_broadcast(delta, probs.shape))

        def wait_next_k():
          @pl.when(c + 1 < steps)
          def _():
            plgpu.barrier_wait(k_loaded.at[ring_slot(c + 1)])

        dq = _mma(
          dq,
          d_scores.astype(dtype),
          k_smem.at[kv_slot],
          a_smem=None if ds_smem is None else ds_smem.at[wg],
          while_running=wait_next_k,
        )
        plgpu.barrier_arrive(k_free.at[kv_slot])
        return dq

      dq = lax.fori_loop(0, steps, step, plgpu.layout_cast(jnp.zeros((_WG_ROWS, dim), jnp.float32), plgpu.Layout.WGMMA))
      q_tile[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      rows = pl.ds(q_block * (compute_wgs * _WG_ROWS) + wg * _WG_ROWS, _WG_ROWS)
      plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[batch, rows, head])
      if persistent:  # the row slot is free once the store has read the Q slot
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.barrier_arrive(row_free.at[slot * compute_wgs + wg])
      else:
        plgpu.wait_smem_to_gmem(0)
      return done + steps

    work_items(grad_rows)
    if persistent:
      plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == compute_wgs)
  def _memory():
    _rebalance_registers(compute_wgs, compute=False)

    def stream(i, item, done):
      q_block, head, batch = item
      kv_index, count, steps = row_table(item)
      if persistent:
        slot = row_slot(i)
        for w in range(compute_wgs):
          barrier = slot * compute_wgs + w
          pl.when(i >= row_slots)(lambda: plgpu.barrier_wait(row_free.at[barrier]))  # item i - row_slots's
          for src, dst in row_copies(item, slot, w):
            plgpu.copy_gmem_to_smem(src, dst, row_loaded.at[barrier])
      _stream_kv(
        kv_index,
        count,
        k_ref.at[batch, :, head],
        v_ref.at[batch, :, head],
        k_smem,
        v_smem,
        k_loaded,
        v_loaded,
        k_free,
        v_free,
        block_kv=block_kv,
        num_stages=num_stages,
        kv_per_step=kv_per_step,
        done=done,
      )
      return done + steps

    _drain_kv(work_items(stream), num_stages, k_free, v_free)
    if persistent:
      _drain(n_items, row_slots, lambda i: [row_free.at[row_slot(i) * compute_wgs + w] for w in range(compute_wgs)])


def _dkv_kernel(
  q_index_ref,
  q_count_ref,
  lane_items_ref,
  lane_count_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  k_smem,
  v_smem,
  q_smem,
  do_smem,
  lse_smem,
  delta_smem,
  kv_loaded,
  kv_free,
  q_loaded,
  do_loaded,
  lse_loaded,
  delta_loaded,
  q_free,
  ds_smem,
  *,
  scale,
  block_q,
  block_kv,
  num_stages,
  pairs,
  kv_slots,
  ctas,
):
  """One work item is one (kv block, head, batch), run by one (compute, memory) warpgroup pair.

  ctas None: the grid is (kv tiles of `pairs` blocks, heads, batch), one block per pair, and the
  compute warpgroup loads its own K/V. ctas an int: `ctas` persistent CTAs; pair p of CTA j runs items
  j·pairs + p, j·pairs + p + ctas·pairs, ... on its own (so the pairs' uneven q counts average out over
  items instead of the CTA waiting for its slower pair). Its memory warpgroup loads each item's K/V into
  one of `kv_slots` slots (freed once the dK/dV store, staged there, has read it) and runs one ring of
  Q/dO sub-tiles through all its items: the next item's first sub-tiles, and with two K/V slots its
  K/V, land during this item's last steps and epilogue.
  """
  wg = lax.axis_index("wg")
  pair = lax.rem(wg, pairs)  # warpgroups pair and pair + `pairs` serve one kv block
  batch_size, heads, n_kv_blocks = q_count_ref.shape
  sub_tiles = block_q // _WG_ROWS  # q blocks stream as 64-row sub-tiles
  dtype = q_ref.dtype
  dim = q_ref.shape[-1]
  score_scale = scale * LOG2E
  persistent = ctas is not None
  if persistent:
    lane = lax.axis_index("ctas") * pairs + pair
    if lane_items_ref is None:
      n_items, work_items, _ = _work_items(lane, ctas * pairs, (n_kv_blocks, heads, batch_size))
    else:
      n_items, work_items, _ = _scheduled_work_items(
        lane, lane_items_ref, lane_count_ref, (n_kv_blocks, heads, batch_size)
      )
    active = True
  else:
    kv_tile, head, batch = (lax.axis_index(a) for a in ("kv_tiles", "heads", "batch"))
    kv_block = kv_tile * pairs + pair
    active = kv_block < n_kv_blocks

    def work_items(body):
      return body(0, (kv_block, head, batch), 0)

  def column(item):
    kv_block, head, batch = item
    return (
      q_index_ref.at[batch, head, kv_block],
      q_count_ref[batch, head, kv_block] * sub_tiles,
      pl.ds(kv_block * block_kv, block_kv),
    )

  def stage(r):  # ring step r (counted over the pair's items) -> its Q/dO slot
    return pair * num_stages + lax.rem(r, num_stages)

  def kv_slot(i):
    return pair * kv_slots + lax.rem(i, kv_slots)

  @pl.when((wg < pairs) & active)
  def _compute():
    plgpu.set_max_registers(232, action="increase")  # 2·232 + 2·24 = 4·128 per CTA

    def grad_keys(i, item, done):
      _, head, batch = item
      _, steps, keys = column(item)
      slot = kv_slot(i)
      k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
      if not persistent:  # persistent: the memory warpgroup loaded them ahead of time
        plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, head], k_tile, kv_loaded.at[2 * slot])
        plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, head], v_tile, kv_loaded.at[2 * slot + 1])
      plgpu.barrier_wait(kv_loaded.at[2 * slot])
      plgpu.barrier_wait(kv_loaded.at[2 * slot + 1])
      ds_tile = None if ds_smem is None else ds_smem.at[pair]

      def step(t, carry):
        dk, dv = carry
        s = stage(done + t)
        q_tile, do_tile = q_smem.at[s], do_smem.at[s]
        plgpu.barrier_wait(q_loaded.at[s])

        def probs_of(scores_t):
          plgpu.barrier_wait(lse_loaded.at[s])
          lse2 = plgpu.load(lse_smem.at[s], layout=_COL) * LOG2E
          # Keys past kv_len need no mask: their rows of dK and dV are never stored.
          return jnp.exp2(scores_t * score_scale - _col_broadcast(lse2, scores_t.shape))

        # Sᵀ = K Qᵀ and dPᵀ = V dOᵀ together, Pᵀ formed under dPᵀ's wgmma.
        probs_t, d_probs_t = _two_products(
          (k_tile, q_tile.T),
          (v_tile, do_tile.T),
          (block_kv, _WG_ROWS),
          before_second=lambda: plgpu.barrier_wait(do_loaded.at[s]),
          while_second=probs_of,
        )

        def d_scores_t():
          plgpu.barrier_wait(delta_loaded.at[s])
          delta = plgpu.load(delta_smem.at[s], layout=_COL)
          return (probs_t * (d_probs_t - _col_broadcast(delta, probs_t.shape))).astype(dtype)

        # dV += Pᵀ dO, then dK += dSᵀ Q with dSᵀ formed under dV's wgmma.
        dv, dk = _mma_then(dv, probs_t.astype(dtype), do_tile, dk, d_scores_t, q_tile, a_smem=ds_tile)
        plgpu.barrier_arrive(q_free.at[s])
        return dk, dv

      zeros = plgpu.layout_cast(jnp.zeros((block_kv, dim), jnp.float32), plgpu.Layout.WGMMA)
      dk, dv = lax.fori_loop(0, steps, step, (zeros, zeros))
      k_tile[...] = (dk * scale).astype(dtype)
      v_tile[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[batch, keys, head], commit_group=False)
      plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[batch, keys, head], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      if persistent:  # the K/V slot is free once the stores have read it
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.barrier_arrive(kv_free.at[slot])
      else:
        plgpu.wait_smem_to_gmem(0)
      return done + steps

    work_items(grad_keys)
    if persistent:
      plgpu.wait_smem_to_gmem(0)

  @pl.when((wg >= pairs) & active)
  def _memory():
    plgpu.set_max_registers(24, action="decrease")

    def stream(i, item, done):
      _, head, batch = item
      q_index, steps, keys = column(item)

      def load(t, wait_free):
        s = stage(done + t)
        rows = pl.ds(q_index[lax.div(t, sub_tiles)] * block_q + lax.rem(t, sub_tiles) * _WG_ROWS, _WG_ROWS)
        wait_free(q_free.at[s])
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[s], q_loaded.at[s])
        plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[s], lse_loaded.at[s])
        plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[s], do_loaded.at[s])
        plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[s], delta_loaded.at[s])

      if not persistent:  # the first slots are all free
        for t in range(num_stages):
          pl.when(t < steps)(functools.partial(load, t, lambda barrier: None))

        @pl.loop(num_stages, steps)
        def _(t):
          load(t, plgpu.barrier_wait)

        return steps

      def load_kv():
        slot = kv_slot(i)
        pl.when(i >= kv_slots)(lambda: plgpu.barrier_wait(kv_free.at[slot]))  # item i - kv_slots's
        plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, head], k_smem.at[slot], kv_loaded.at[2 * slot])
        plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, head], v_smem.at[slot], kv_loaded.at[2 * slot + 1])

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

    _drain(work_items(stream), num_stages, lambda r: (q_free.at[stage(r)],))
    if persistent:
      _drain(n_items, kv_slots, lambda i: (kv_free.at[kv_slot(i)],))


def _pad_rows(x, length):
  """[batch, heads, q_len] -> [batch, heads, length], zero padded: whole tiles for the TMA."""
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[-1])))


def _dkv_kv_slots(dkv_stages, persistent, dim, block_kv, pairs):
  """K/V slots per pair of the dK/dV kernel: two when persistent and they fit in SMEM with
  dkv_stages Q/dO sub-tiles, else one; ValueError (naming dkv_stages) if not even one fits."""

  def smem(kv_slots):
    return pairs * (kv_slots * 2 * block_kv * dim * 2 + dkv_stages * (2 * _WG_ROWS * dim * 2 + 2 * _WG_ROWS * 4))

  if persistent and smem(2) + _SMEM_OVERHEAD <= _SMEM_BYTES:
    return 2
  if dkv_stages < 1 or smem(1) + _SMEM_OVERHEAD > _SMEM_BYTES:
    raise ValueError(
      f"dkv_stages: {dkv_stages} at head_dim {dim} needs {smem(1) // 1024} KB of shared "
      f"memory; Hopper has {_SMEM_BYTES // 1024} KB"
    )
  return 1


@functools.partial(
  jax.jit,
  static_argnames=(
    "block_q",
    "block_kv",
    "scale",
    "dq_stages",
    "dkv_stages",
    "dq_kv_blocks_per_step",
    "dq_persistent",
    "dkv_persistent",
    "delta_in_dq",
    "dkv_balanced",
    "interpret",
  ),
)
def backward(
  q,
  k,
  v,
  out,
  lse,
  d_out,
  kv_block_index,
  kv_block_count,
  q_block_index,
  q_block_count,
  *,
  block_q,
  block_kv,
  scale,
  dq_stages=2,
  dkv_stages=2,
  dq_kv_blocks_per_step=1,
  dq_persistent=True,
  dkv_persistent=True,
  delta_in_dq=True,
  dkv_balanced=None,
  interpret=False,
):
  """Gradients (dq, dk, dv) of `forward`: dQ over the forward table, dK/dV over the transposed one.

  q_block_index: int32 [batch, heads, n_kv_blocks, n_q_blocks]; q_block_count: int32 [batch, heads, n_kv_blocks].
  dq_stages: K/V slots in flight for dQ; dkv_stages: Q/dO sub-tiles in flight per kv block for dK/dV.
  dq_kv_blocks_per_step 1 or 2: kept kv blocks per dQ step, as the forward's kv_blocks_per_step.
  dq_persistent, dkv_persistent: as the forward's `persistent` (False, True: one CTA per SM, or a
  number of CTAs), for the dQ kernel (Q/dO rows double-buffered where SMEM allows, else one row slot:
  at head_dim 128 two slots take dq_stages ≤ 2 with one kv block per step, two per step get one) and
  the dK/dV kernel (K/V double-buffered where SMEM allows: dkv_stages=1 at head_dim 128).
  delta_in_dq: the dQ kernel forms delta = rowsum(dO·O) from O itself and hands it to dK/dV, instead of
  an XLA reduce over O and dO before both kernels (MOSAIC_NOTES.md, "delta inside the dQ kernel").
  dkv_balanced: persistent dK/dV pairs take their kv blocks by `schedule.balanced_schedule` (each
  round of adjacent blocks dealt by q count, alternating directions) instead of round-robin; None: at
  head_dim 128, where it measured faster (benchmarks/NOTES.md).
  """
  _check_inputs(q, k, v, block_q, block_kv)
  if dq_kv_blocks_per_step not in (1, 2):
    raise ValueError(f"dq_kv_blocks_per_step: 1 or 2, got {dq_kv_blocks_per_step}")
  batch, q_len, heads, dim = q.shape
  kv_len = k.shape[1]
  n_q_blocks, n_kv_blocks = kv_block_index.shape[-2:]
  pairs = 2  # dK/dV: two kv blocks per CTA, each with its own compute and memory warpgroup
  dq_ctas = _persistent_ctas(dq_persistent, "dq_persistent", batch * heads * n_q_blocks)
  dkv_ctas = _persistent_ctas(dkv_persistent, "dkv_persistent", pl.cdiv(batch * heads * n_kv_blocks, pairs))

  def dq_smem(row_slots):
    smem = (2 * row_slots * block_q + 2 * dq_stages * dq_kv_blocks_per_step * block_kv) * dim * 2
    return smem + (block_q * _O_PART * 2 if delta_in_dq else 0)  # one O column part per warpgroup

  # Persistent: two Q/dO row slots (the next item's rows land during this item) where SMEM allows.
  row_slots = 2 if dq_ctas is not None and dq_smem(2) + _SMEM_OVERHEAD <= _SMEM_BYTES else 1
  if not 1 <= dq_stages or dq_smem(row_slots) + _SMEM_OVERHEAD > _SMEM_BYTES:
    raise ValueError(
      f"dq_stages: {dq_stages} with dq_kv_blocks_per_step={dq_kv_blocks_per_step}, "
      f"dq_persistent={dq_persistent}, head_dim {dim} needs {dq_smem(row_slots) // 1024} KB of "
      f"shared memory; Hopper has {_SMEM_BYTES // 1024} KB"
    )
  kv_slots = _dkv_kv_slots(dkv_stages, dkv_ctas is not None, dim, block_kv, pairs)
  padded_len = n_q_blocks * block_q
  # delta_i = Σ_d dO_i·O_i = Σ_j P_ij dP_ij, the softmax-backward correction per query row. lse and
  # delta are zero padded: padded rows (zero q and dO) then add exactly zero to dK and dV.
  lse = _pad_rows(lse, padded_len)
  if delta_in_dq:
    delta_or_out = out  # the dQ kernel forms delta (zero for padded rows: TMA zero-fills their O)
  else:
    delta_or_out = _pad_rows(
      jnp.einsum("bnhd,bnhd->bhn", d_out.astype(jnp.float32), out.astype(jnp.float32)), padded_len
    )
  interpret_params = _interpret_params(interpret)
  compiler_params = plgpu.CompilerParams(approx_math=True)

  compute_wgs = block_q // _WG_ROWS
  if dq_ctas is None:
    dq_grid, dq_grid_names = (n_q_blocks, heads, batch), ("q_blocks", "heads", "batch")
  else:
    dq_grid, dq_grid_names = (dq_ctas,), ("ctas",)
  dq_body = functools.partial(
    _dq_kernel,
    scale=scale,
    block_kv=block_kv,
    kv_per_step=dq_kv_blocks_per_step,
    num_stages=dq_stages,
    compute_wgs=compute_wgs,
    kv_len=kv_len,
    ctas=dq_ctas,
    row_slots=row_slots,
  )
  if delta_in_dq:
    dq_out_type = [
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((batch, heads, padded_len), jnp.float32),
    ]
  else:  # no delta output: the kernel's delta_out_ref is None
    dq_body = functools.partial(lambda body, *refs: body(*refs[:9], None, *refs[9:]), dq_body)
    dq_out_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
  dq = plgpu.kernel(
    dq_body,
    out_type=dq_out_type,
    scratch_types=[
      _tiled_smem((row_slots, compute_wgs, _WG_ROWS, dim), q.dtype),
      _tiled_smem((row_slots, compute_wgs, _WG_ROWS, dim), d_out.dtype),
      plgpu.SMEM((row_slots, compute_wgs, _WG_ROWS), jnp.float32),
      plgpu.SMEM((row_slots, compute_wgs, _WG_ROWS), jnp.float32),
      _tiled_smem((dq_stages, dq_kv_blocks_per_step * block_kv, dim), k.dtype),
      _tiled_smem((dq_stages, dq_kv_blocks_per_step * block_kv, dim), v.dtype),
      plgpu.Barrier(
        num_arrivals=3 if delta_in_dq else 4,  # Q, dO, lse (, delta)
        num_barriers=row_slots * compute_wgs,
      ),
      plgpu.Barrier(num_barriers=row_slots * compute_wgs) if dq_ctas is not None else None,
      plgpu.Barrier(num_arrivals=dq_kv_blocks_per_step, num_barriers=dq_stages),
      plgpu.Barrier(num_arrivals=dq_kv_blocks_per_step, num_barriers=dq_stages),
      plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=dq_stages),
      plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=dq_stages),
      _tiled_smem((compute_wgs, _WG_ROWS, dq_kv_blocks_per_step * block_kv), q.dtype) if interpret_params else None,
      _tiled_smem((compute_wgs, _WG_ROWS, _O_PART), out.dtype) if delta_in_dq else None,
      plgpu.Barrier(num_barriers=compute_wgs) if delta_in_dq else None,
    ],
    grid=dq_grid,
    grid_names=dq_grid_names,
    num_threads=compute_wgs + 1,
    thread_name="wg",
    compiler_params=compiler_params,
    interpret=interpret_params,
    kernel_name="mosaic_block_sparse_dq",
  )(kv_block_index, kv_block_count, q, k, v, d_out, lse, delta_or_out)
  if delta_in_dq:
    dq, delta = dq
  else:
    delta = delta_or_out

  stages = pairs * dkv_stages
  if dkv_ctas is None:
    dkv_grid, dkv_grid_names = (pl.cdiv(n_kv_blocks, pairs), heads, batch), ("kv_tiles", "heads", "batch")
  else:
    dkv_grid, dkv_grid_names = (dkv_ctas,), ("ctas",)
  dkv_body = functools.partial(
    _dkv_kernel,
    scale=scale,
    block_q=block_q,
    block_kv=block_kv,
    num_stages=dkv_stages,
    pairs=pairs,
    kv_slots=kv_slots,
    ctas=dkv_ctas,
  )
  if dkv_balanced is None:
    dkv_balanced = dim == 128
  if dkv_ctas is not None and dkv_balanced:
    # kv blocks differ in how many q blocks they serve: deal them so every pair does about as much.
    schedule = balanced_schedule(q_block_count.reshape(-1), dkv_ctas * pairs)
  else:  # no schedule: the kernel's lane_items_ref and lane_count_ref are None
    dkv_body = functools.partial(lambda body, *refs: body(*refs[:2], None, None, *refs[2:]), dkv_body)
    schedule = ()
  dk, dv = plgpu.kernel(
    dkv_body,
    out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    scratch_types=[
      _tiled_smem((pairs * kv_slots, block_kv, dim), k.dtype),
      _tiled_smem((pairs * kv_slots, block_kv, dim), v.dtype),
      _tiled_smem((stages, _WG_ROWS, dim), q.dtype),
      _tiled_smem((stages, _WG_ROWS, dim), d_out.dtype),
      plgpu.SMEM((stages, _WG_ROWS), jnp.float32),
      plgpu.SMEM((stages, _WG_ROWS), jnp.float32),
      plgpu.Barrier(num_barriers=2 * pairs * kv_slots),
      plgpu.Barrier(num_barriers=pairs * kv_slots) if dkv_ctas is not None else None,
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      _tiled_smem((pairs, block_kv, _WG_ROWS), q.dtype) if interpret_params else None,
    ],
    grid=dkv_grid,
    grid_names=dkv_grid_names,
    num_threads=2 * pairs,
    thread_name="wg",
    compiler_params=compiler_params,
    interpret=interpret_params,
    kernel_name="mosaic_block_sparse_dkv",
  )(q_block_index, q_block_count, *schedule, q, k, v, d_out, lse, delta)
  return dq, dk, dv
