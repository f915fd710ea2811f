"""Block-sparse flash attention as Pallas Mosaic GPU kernels (Hopper: wgmma, TMA, warp specialisation).

`forward` and `backward` follow the backend contract of this package (the same signatures, index tables
and conventions as `triton` and `xla`): every work item is one tile and loops only over the blocks its
table row lists, so skipped blocks cost nothing and no two CTAs write the same output (no atomics).
Softmax runs in base 2 in float32; `lse` is the natural-log log-sum-exp [batch, heads, q_len]; a row with
no kept block outputs 0 and has lse = -inf.

The kernels (the design follows jax's `attention_mgpu.py`, FlashAttention-3 style):
- `mosaic_forward`: out and lse; a CTA's compute warpgroups share one K/V stream.
- `mosaic_dq`: dQ over the forward table; it also forms delta = rowsum(dO·O) for dK/dV.
- `mosaic_dkv`: dK and dV over the transposed table, two kv blocks per CTA.
- `mosaic_pipeline`: what they share (the K/V ring, the products, the key mask, the launch).
All three are persistent (one CTA per SM looping over work items) and warp specialised (a memory
warpgroup streams tiles by TMA into rings of shared-memory slots for the compute warpgroups). Ragged
lengths cost nothing extra: TMA loads fill out-of-range rows with zeros and TMA stores drop them.

What the kernels take is stated by the module constants below (the backend table reads them). The
settings a caller may choose are the fields of `MosaicTuning`, passed to `forward` and `backward` as
keyword arguments. `interpret=True` runs the kernels on CPU in the Mosaic GPU interpreter; an
`plgpu.InterpretGPUParams` instance may be passed instead, e.g. with `detect_races=True`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse_attention import mosaic_dkv, mosaic_dq, mosaic_forward
from pallas_kernels.block_sparse_attention import mosaic_pipeline as mp
from pallas_kernels.block_sparse_attention.schedule import balanced_schedule

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # wgmma takes 16-bit operands
HEAD_DIMS = (64, 128)
BLOCK_Q = (64, 128)  # one or two compute warpgroups of 64 rows
BLOCK_KV = (64,)
SEQ_MULTIPLE = 8  # q_len and kv_len: TMA of the (8, 64)-tiled layout takes whole 8-row tiles


@dataclasses.dataclass(frozen=True)
class MosaicTuning:
  """The settings a caller may choose; the defaults are the fastest measured (MOSAIC_NOTES.md).

  forward_stages: K/V slots in flight in the forward, 128 keys (two kept kv blocks) each.
  dq_stages: K/V slots in flight in the dQ kernel, 64 keys each.
  dkv_stages: Q/dO sub-tiles of 64 rows in flight per kv block in the dK/dV kernel.
  dkv_balanced: the dK/dV lanes take their kv blocks as `schedule.balanced_schedule` deals them by q
    count, instead of round-robin; None: at head_dim 128 only.
  num_ctas: CTAs of each persistent launch (at most one per work item); None: one per SM.
  """

  forward_stages: int = 2
  dq_stages: int = 2
  dkv_stages: int = 2
  dkv_balanced: bool | None = None
  num_ctas: int | None = None

  def __post_init__(self):
    for name in ("forward_stages", "dq_stages", "dkv_stages", "num_ctas"):
      value = getattr(self, name)
      if value is None and name == "num_ctas":
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: a positive int, got {value!r}")
    if self.dkv_balanced not in (None, True, False):
      raise ValueError(f"dkv_balanced: True, False or None, got {self.dkv_balanced!r}")


def _tuning(settings) -> MosaicTuning:
  fields = {f.name for f in dataclasses.fields(MosaicTuning)}
  unknown = sorted(set(settings) - fields)
  if unknown:
    raise ValueError(f"{', '.join(unknown)}: not a MosaicTuning setting (those are {', '.join(sorted(fields))})")
  return MosaicTuning(**settings)


def _shared_memory_error(name, value, head_dim, needed):
  return ValueError(
    f"{name}: {value} at head_dim {head_dim} needs {needed // 1024} KB of shared memory; "
    f"Hopper has {mp.SMEM_BYTES // 1024} KB"
  )


def _assert_supported(q, k, v, block_q, block_kv):
  assert q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype, (q.dtype, k.dtype, v.dtype)
  assert q.shape[-1] in HEAD_DIMS and k.shape[-1] == q.shape[-1] == v.shape[-1], (q.shape, k.shape, v.shape)
  assert block_q in BLOCK_Q and block_kv in BLOCK_KV, (block_q, block_kv)


def _not_yet(kv_seq_lengths, is_causal, d_lse=None):
  for name, value in (("kv_seq_lengths", kv_seq_lengths), ("d_lse", d_lse)):
    if value is not None:
      raise NotImplementedError(f"{name}: not yet in the mosaic kernels")
  if is_causal:
    raise NotImplementedError("is_causal: not yet in the mosaic kernels")


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
  interpret=False,
  **tuning,
):
  """Block-sparse attention forward.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim].
  kv_block_index: int32 [batch, heads, n_q_blocks, n_kv_blocks]; kv_block_count: int32 [batch, heads, n_q_blocks].
  tuning: `MosaicTuning` fields.
  Returns (out [batch, q_len, heads, head_dim], lse float32 [batch, heads, q_len]).
  """
  _not_yet(kv_seq_lengths, is_causal)
  _assert_supported(q, k, v, block_q, block_kv)
  tuning = _tuning(tuning)
  smem = mosaic_forward.smem_bytes(block_q, block_kv, q.shape[-1], tuning.forward_stages)
  if smem + mp.SMEM_OVERHEAD > mp.SMEM_BYTES:
    raise _shared_memory_error("forward_stages", tuning.forward_stages, q.shape[-1], smem)
  return _forward(
    q,
    k,
    v,
    kv_block_index,
    kv_block_count,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    tuning=tuning,
    interpret=interpret,
  )


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale", "tuning", "interpret"))
def _forward(q, k, v, kv_block_index, kv_block_count, *, block_q, block_kv, scale, tuning, interpret):
  return mosaic_forward.forward_call(
    q,
    k,
    v,
    kv_block_index,
    kv_block_count,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    stages=tuning.forward_stages,
    ctas=mp.persistent_ctas(tuning.num_ctas, kv_block_count.size),
    interpret=interpret,
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
  interpret=False,
  **tuning,
):
  """Gradients (dq, dk, dv) of `forward`: dQ over the forward table, dK/dV over the transposed one.

  out, lse: `forward`'s results; d_out: [batch, q_len, heads, head_dim], the cotangent of out.
  q_block_index: int32 [batch, heads, n_kv_blocks, n_q_blocks]; q_block_count: int32 [batch, heads, n_kv_blocks].
  tuning: `MosaicTuning` fields.
  """
  _not_yet(kv_seq_lengths, is_causal, d_lse)
  _assert_supported(q, k, v, block_q, block_kv)
  tuning = _tuning(tuning)
  dim = q.shape[-1]
  dq_smem = functools.partial(mosaic_dq.smem_bytes, block_q, block_kv, dim, tuning.dq_stages)
  # Two Q/dO row slots (the next item's rows land during this item) where they fit, else one.
  row_slots = 2 if dq_smem(2) + mp.SMEM_OVERHEAD <= mp.SMEM_BYTES else 1
  if dq_smem(row_slots) + mp.SMEM_OVERHEAD > mp.SMEM_BYTES:
    raise _shared_memory_error("dq_stages", tuning.dq_stages, dim, dq_smem(row_slots))
  kv_slots = mosaic_dkv.kv_slots_that_fit(block_kv, dim, tuning.dkv_stages)
  dkv_smem = mosaic_dkv.smem_bytes(block_kv, dim, tuning.dkv_stages, kv_slots)
  if dkv_smem + mp.SMEM_OVERHEAD > mp.SMEM_BYTES:
    raise _shared_memory_error("dkv_stages", tuning.dkv_stages, dim, dkv_smem)
  return _backward(
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
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    tuning=tuning,
    row_slots=row_slots,
    kv_slots=kv_slots,
    interpret=interpret,
  )


def _pad_rows(x, length):
  """[batch, heads, q_len] -> [batch, heads, length], zero padded: whole tiles for the TMA."""
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[-1])))


@functools.partial(
  jax.jit, static_argnames=("block_q", "block_kv", "scale", "tuning", "row_slots", "kv_slots", "interpret")
)
def _backward(
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
  tuning,
  row_slots,
  kv_slots,
  interpret,
):
  batch, _, heads, dim = q.shape
  n_q_blocks, n_kv_blocks = kv_block_index.shape[-2:]
  # lse zero padded: padded rows (zero q and dO, so zero delta) then add exactly zero to dK and dV.
  lse = _pad_rows(lse, n_q_blocks * block_q)
  dq, delta = mosaic_dq.dq_call(
    q,
    k,
    v,
    out,
    d_out,
    lse,
    kv_block_index,
    kv_block_count,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    stages=tuning.dq_stages,
    row_slots=row_slots,
    ctas=mp.persistent_ctas(tuning.num_ctas, batch * heads * n_q_blocks),
    interpret=interpret,
  )
  dkv_ctas = mp.persistent_ctas(tuning.num_ctas, pl.cdiv(batch * heads * n_kv_blocks, mosaic_dkv.PAIRS))
  balanced = dim == 128 if tuning.dkv_balanced is None else tuning.dkv_balanced
  schedule = None
  if balanced:  # kv blocks differ in how many q blocks they serve: deal them so every lane does about as much
    schedule = mosaic_dkv.DkvSchedule(*balanced_schedule(q_block_count.reshape(-1), dkv_ctas * mosaic_dkv.PAIRS))
  dk, dv = mosaic_dkv.dkv_call(
    q,
    k,
    v,
    d_out,
    lse,
    delta,
    q_block_index,
    q_block_count,
    schedule,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    stages=tuning.dkv_stages,
    kv_slots=kv_slots,
    ctas=dkv_ctas,
    interpret=interpret,
  )
  return dq, dk, dv
