"""Pieces shared by the Mosaic GPU block-sparse attention kernels (`mosaic_forward`, `mosaic_dq`, `mosaic_dkv`).

- Shared-memory layouts and the SMEM budget of one CTA.
- Tensor-core products (`mma`, `two_products`, `mma_then`) that run the same computation compiled (register
  operands, accumulators kept in registers) and in the Mosaic GPU interpreter (operands staged through SMEM).
- The K/V ring of the forward and dQ kernels: a memory warpgroup streams a row's kept K and V tiles by TMA into
  `KvRing` slots, each with a "loaded" barrier (TMA transaction count) and a "free" barrier (the compute
  warpgroups arrive when done with it); `drain` observes the last releases.
- The key mask of a row's last step, and the persistent work-item loops (round-robin or a `Schedule`).
- `call_kernel`: one persistent launch of a kernel body that takes its inputs, outputs and scratch as named
  structures.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.varying import vary, varying_axes

LOG2E = math.log2(math.e)
MASKED = -1e30  # the score of a key that takes no part: large and finite, so never -inf arithmetic
WG_ROWS = 64  # rows of one warpgroup's wgmma tile
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column of a wgmma tile
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per CTA
SMEM_OVERHEAD = 4 * 1024  # lse tiles, barriers, alignment of the swizzled buffers


def tiled_smem(shape, dtype):
  """Shared memory laid out for TMA and wgmma: (8, 64)-element tiles, 128-byte swizzle."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def interpret_params(interpret):
  """interpret (bool or `plgpu.InterpretGPUParams`) -> the `interpret` argument of `plgpu.kernel`."""
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else None


def num_sms():
  return getattr(jax.devices()[0], "core_count", None) or 132  # H100 SXM when not on a GPU


def persistent_ctas(num_ctas, max_ctas):
  """CTAs of a persistent launch: num_ctas (None: one per SM), at most max_ctas (one work item each)."""
  return max(1, min(num_sms() if num_ctas is None else num_ctas, max_ctas))


def ceil_div(a, b):
  return lax.div(a + b - 1, b)


def row_broadcast(x, shape):
  return lax.broadcast_in_dim(x, shape, [0])


def col_broadcast(x, shape):
  return lax.broadcast_in_dim(x, shape, [1])


def mma(acc, a, b, *, a_smem=None, while_running=None):
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


def two_products(first, second, shape, *, before_second, while_second):
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


def mma_then(acc, a, b, acc2, make_a2, b2, *, a_smem=None):
  """(acc + a @ b, acc2 + make_a2() @ b2): a and make_a2()'s result in registers, b and b2 in SMEM.

  Compiled, make_a2 runs while the first product is on the tensor cores (dSᵀ formed under dV's
  wgmma). Interpreted, both go through a_smem one after the other, as `mma`.
  """
  if a_smem is not None:
    acc = mma(acc, a, b, a_smem=a_smem)
    return acc, mma(acc2, make_a2(), b2, a_smem=a_smem)

  def accumulate(refs):
    ref, ref2 = refs
    plgpu.wgmma(ref, a, b)
    plgpu.wgmma(ref2, make_a2(), b2)

  return pl.run_state(accumulate)((plgpu.ACC.init(acc), plgpu.ACC.init(acc2)))


def rebalance_registers(compute_wgs, *, compute):
  """Move registers from the memory warpgroup to two compute warpgroups (2·232 + 40 = 3·168).

  With one compute warpgroup each of the two already has the most a thread can hold.
  """
  if compute_wgs == 2:
    plgpu.set_max_registers(232 if compute else 40, action="increase" if compute else "decrease")


def drain(count, num_stages, free_barriers):
  """Memory warpgroup epilogue: observe the releases of the last `num_stages` steps.

  The loads only waited for the releases of steps before count - num_stages. Observing every phase
  of a barrier one waits on keeps its parity in step (and the interpreter checks it).
  """

  @pl.loop(jnp.maximum(count - num_stages, 0), count)
  def _(c):
    for barrier in free_barriers(c):
      plgpu.barrier_wait(barrier)


class KvRing(NamedTuple):
  """A ring of K/V slots that a memory warpgroup fills by TMA for the compute warpgroups.

  k, v: SMEM [stages, keys, head_dim]; k_loaded, v_loaded: one barrier per slot, one arrival per kv block
  copied into it; k_free, v_free: one barrier per slot, one arrival per compute warpgroup.
  """

  k: Any
  v: Any
  k_loaded: Any
  v_loaded: Any
  k_free: Any
  v_free: Any

  @staticmethod
  def scratch(stages, keys, head_dim, dtype, *, blocks_per_step, compute_wgs):
    """The scratch types of a ring of `stages` slots of `keys` keys each."""
    return KvRing(
      k=tiled_smem((stages, keys, head_dim), dtype),
      v=tiled_smem((stages, keys, head_dim), dtype),
      k_loaded=plgpu.Barrier(num_arrivals=blocks_per_step, num_barriers=stages),
      v_loaded=plgpu.Barrier(num_arrivals=blocks_per_step, num_barriers=stages),
      k_free=plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=stages),
      v_free=plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=stages),
    )


def stream_kv(kv_index, count, k_src, v_src, ring: KvRing, *, block_kv, num_stages, kv_per_step, done):
  """Memory warpgroup of forward and dQ: TMA one row's kept K and V tiles into the ring of slots.

  k_src, v_src: [kv_len, dim] GMEM views. A step loads `kv_per_step` kept blocks into one slot of
  kv_per_step·block_kv rows; the ring's step `done + c` (`done`: steps of earlier work items of the
  CTA) uses slot (done + c) % num_stages, refilled once the compute warpgroups release it (K and V
  separately, so the next K can land while V is still in use). An odd count's last step loads its
  last block twice: the second copy is finite data that the compute side masks out.
  The caller drains the releases (`drain_kv`) after its last row.
  """

  def load(c, slot, wait_free):
    if kv_per_step == 1:
      blocks = [kv_index[c]]
    else:
      blocks = [kv_index[jnp.minimum(kv_per_step * c + h, count - 1)] for h in range(kv_per_step)]
    for free, loaded, src, smem in (
      (ring.k_free, ring.k_loaded, k_src, ring.k),
      (ring.v_free, ring.v_loaded, v_src, ring.v),
    ):
      wait_free(free.at[slot])
      for h, block in enumerate(blocks):
        dst = smem.at[slot] if kv_per_step == 1 else smem.at[slot, pl.ds(h * block_kv, block_kv)]
        plgpu.copy_gmem_to_smem(src.at[pl.ds(block * block_kv, block_kv)], dst, loaded.at[slot])

  @pl.loop(0, ceil_div(count, kv_per_step))
  def _(c):
    ring_step = done + c
    load(
      c,
      lax.rem(ring_step, num_stages),
      lambda barrier: pl.when(ring_step >= num_stages)(lambda: plgpu.barrier_wait(barrier)),
    )


def drain_kv(steps, num_stages, ring: KvRing):
  drain(steps, num_stages, lambda c: (ring.k_free.at[lax.rem(c, num_stages)], ring.v_free.at[lax.rem(c, num_stages)]))


def key_mask(kv_index, count, *, block_kv, kv_len, kv_per_step, kv_length=None, first_row=None, diagonal_blocks=0):
  """(scores [64, kv_per_step·block_kv], step) -> scores with the keys that take no part at MASKED.

  kv_index, count: the row's table entries and their count; kv_len: the static key count of the arrays.
  Those keys are: keys past kv_len (or past kv_length, a traced per-batch count, when given), the repeated
  block of an odd count's last step and, when first_row is given (causal), keys after the query row, where
  first_row is the tile's first query row.

  Only a row's last step can hold a partial or repeated block (rows list their kv blocks ascending, so the
  partial block comes last), and with causal masking only the blocks crossing the diagonal, at most
  `diagonal_blocks` (those of the q block's rows) and also the row's last: so only those steps pay for
  the compares and the select.
  """
  if kv_length is None and first_row is None:
    if kv_per_step == 1 and kv_len % block_kv == 0:
      return lambda scores, c: scores
    steps = ceil_div(count, kv_per_step)
    last = jnp.maximum(count - 1, 0)
    last_valid = (last - (steps - 1) * kv_per_step) * block_kv + jnp.minimum(
      kv_len - kv_index[last] * block_kv, block_kv
    )

    def mask_last(scores):
      cols = plgpu.broadcasted_iota(jnp.int32, scores.shape, 1, layout=plgpu.Layout.WGMMA)
      return jnp.where(cols < last_valid, scores, MASKED)

    return lambda scores, c: lax.cond(c == steps - 1, mask_last, lambda scores: scores, scores)

  assert kv_per_step in (1, 2), kv_per_step
  limit = kv_len if kv_length is None else kv_length
  steps = ceil_div(count, kv_per_step)
  first_masked = steps - 1
  if first_row is not None:
    # Blocks with a key after the tile's first row: b·block_kv + block_kv - 1 > first_row.
    threshold = lax.div(first_row + 1, block_kv)
    crossing = 0
    for m in range(diagonal_blocks):
      entry = count - 1 - m
      crossing += ((entry >= 0) & (kv_index[jnp.maximum(entry, 0)] >= threshold)).astype(jnp.int32)
    first_masked = jnp.minimum(lax.div(count - crossing, kv_per_step), steps - 1)

  def mask(scores, c):
    cols = plgpu.broadcasted_iota(jnp.int32, scores.shape, 1, layout=plgpu.Layout.WGMMA)
    first = kv_per_step * c
    if kv_per_step == 1:
      keys = cols + kv_index[first] * block_kv
      valid = keys < limit
    else:  # the step's two blocks sit side by side; an odd count's last step repeats its last block
      second = kv_index[jnp.minimum(first + 1, count - 1)]
      keys = cols + jnp.where(cols < block_kv, kv_index[first] * block_kv, second * block_kv - block_kv)
      valid = (keys < limit) & (cols < (count - first) * block_kv)
    if first_row is not None:
      valid = valid & (
        keys <= plgpu.broadcasted_iota(jnp.int32, scores.shape, 0, layout=plgpu.Layout.WGMMA) + first_row
      )
    return jnp.where(valid, scores, MASKED)

  return lambda scores, c: lax.cond(c >= first_masked, mask, lambda scores, c: scores, scores, c)


class WorkItems(NamedTuple):
  """A persistent lane's work items: `run(body)` folds body(i, (block, head, batch), done) over the lane's
  items from done = 0 (body returns the new done, e.g. pipeline steps so far) and returns the final done;
  `item_at(i)` is the lane's i-th (block, head, batch); `count` how many it has."""

  count: Any
  run: Any
  item_at: Any


def _work_items(count, item_id, counts):
  blocks, heads, _ = counts

  def item_at(i):
    w = item_id(i)
    rest = lax.div(w, blocks)
    return lax.rem(w, blocks), lax.rem(rest, heads), lax.div(rest, heads)

  def run(body):
    return lax.fori_loop(0, count, lambda i, done: body(i, item_at(i), done), 0)

  return WorkItems(count, run, item_at)


class Schedule(NamedTuple):
  """A `schedule.balanced_schedule` of a kernel's work items over its lanes."""

  items: Any  # int32 [lanes, rounds]: item w = block + blocks·(head + heads·batch); -1 past count
  count: Any  # int32 [lanes]


def work_items(lane, lanes, counts, schedule: Schedule | None):
  """`lane`'s work items of the counts = (blocks, heads, batch) items, blocks fastest: those its row of
  `schedule` lists (a ref of each field), or with schedule None items lane, lane + lanes, ... (round-robin).
  Either way the lanes running at one time take adjacent items, which share a head's K/V (or Q and dO) in L2."""
  if schedule is not None:
    return _work_items(schedule.count[lane], lambda i: schedule.items[lane, i], counts)
  blocks, heads, batch = counts
  total = blocks * heads * batch
  count = jnp.where(lane < total, lax.div(total - 1 - lane, lanes) + 1, 0)
  return _work_items(count, lambda i: i * lanes + lane, counts)


def call_kernel(body, inputs, out_type, scratch, *, ctas, num_threads, interpret, name):
  """Run body(inputs, outputs, scratch) on `ctas` persistent CTAs of `num_threads` warpgroups ("wg").

  inputs: a pytree (e.g. a NamedTuple) of arrays, None for absent ones; out_type: a pytree of
  `jax.ShapeDtypeStruct`; scratch: a pytree of SMEM and barrier types. The body receives each as the same
  structure of refs. Returns the outputs in out_type's structure.
  """
  flat_inputs, inputs_tree = jax.tree.flatten(inputs)
  flat_out_type, out_tree = jax.tree.flatten(out_type)

  def kernel_body(*refs, scratch):
    inputs_refs = jax.tree.unflatten(inputs_tree, refs[: len(flat_inputs)])
    output_refs = jax.tree.unflatten(out_tree, refs[len(flat_inputs) :])
    body(inputs_refs, output_refs, scratch)

  outputs = plgpu.kernel(
    kernel_body,
    out_type=list(flat_out_type),
    scratch_types=dict(scratch=scratch),
    grid=(ctas,),
    grid_names=("ctas",),
    num_threads=num_threads,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    interpret=interpret_params(interpret),
    kernel_name=name,
  )(*flat_inputs)
  # Under `jax.shard_map(check_vma=True)` the outputs must vary over the manual axes their inputs vary over
  # (a custom_vjp's backward must return its primals' types). `plgpu.kernel` traces its launch with
  # check_vma off, which drops any varying axes declared on out_type, so they are cast on afterwards.
  axes = varying_axes(flat_inputs)
  return jax.tree.unflatten(out_tree, [vary(x, axes) for x in outputs])
