"""Block-sparse flash attention as Pallas Mosaic GPU kernels (Hopper: wgmma, TMA, warp specialisation).

`forward` and `backward` follow the backend contract of this package (the same signatures, index tables
and conventions as `triton` and `xla`): every work item is one tile and loops only over the blocks its
table row lists, so skipped blocks cost nothing and no two CTAs write the same output (no atomics).
Softmax runs in base 2 in float32; `lse` is the natural-log log-sum-exp [batch, heads, q_len]; a row with
no kept block outputs 0 and has lse = -inf. Query head n reads kv head n // (heads // kv_heads) (GQA,
MQA) by its TMA addresses, never a copy of K and V per query head; dK and dV sum over a kv head's query
heads inside the kernel. Keys past `kv_seq_lengths[b]` and, with `is_causal`, keys after their query get
a large finite negative score, only in the steps whose blocks hold such keys. The lse cotangent enters
delta = rowsum(dO·O) - d_lse where the dQ kernel forms it.

The kernels (the design follows jax's `attention_mgpu.py`, FlashAttention-3 style):
- `mosaic_forward`: out and lse; a CTA's compute warpgroups share one K/V stream.
- `mosaic_dq`: dQ over the forward table; it also forms delta for dK/dV.
- `mosaic_dkv`: dK and dV over the transposed table, two kv blocks per CTA.
- `mosaic_pipeline`: what they share (the K/V ring, the products, the key mask, the launch).
All three are persistent (one CTA per SM looping over work items) and warp specialised (a memory
warpgroup streams tiles by TMA into rings of shared-memory slots for the compute warpgroups). Ragged
lengths cost nothing extra where they are multiples of 8: TMA loads fill out-of-range rows with zeros and
TMA stores drop them. TMA of the (8, 64)-tiled layout takes whole 8-row tiles only, so other lengths are
zero padded to them first (a copy of the inputs, and a slice of the outputs).

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
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse_attention import mosaic_dkv, mosaic_dq, mosaic_forward
from pallas_kernels.block_sparse_attention import mosaic_pipeline as mp
from pallas_kernels.block_sparse_attention.schedule import balanced_schedule

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # wgmma takes 16-bit operands
HEAD_DIMS = (64, 128)
BLOCK_Q = (64, 128)  # one or two compute warpgroups of 64 rows
BLOCK_KV = (64,)
SEQ_MULTIPLE = None  # any q_len and kv_len (lengths that are not multiples of 8 are zero padded: a copy)


@dataclasses.dataclass(frozen=True)
class MosaicTuning:
  """The settings a caller may choose; the defaults are the fastest measured (MOSAIC_NOTES.md), except
  `balanced` under causal masking, chosen by the cost model there and not yet run on a GPU.

  forward_stages: K/V slots in flight in the forward, 128 keys (two kept kv blocks) each.
  dq_stages: K/V slots in flight in the dQ kernel, 64 keys each.
  dkv_stages: Q/dO sub-tiles of 64 rows in flight per kv block in the dK/dV kernel.
  balanced: the persistent lanes take their work items as `schedule.balanced_schedule` deals them, instead
    of round-robin. With causal masking, where rows differ in length by design, all three kernels: the
    forward and dQ by each q block's allowed kv blocks (a schedule fixed at trace time), dK/dV by its
    table's q counts, every round merged. Without it the dK/dV kernel only, rounds merged in pairs.
    None: with causal masking, or at head_dim 128.
  num_ctas: CTAs of each persistent launch (at most one per work item); None: one per SM.
  """

  forward_stages: int = 2
  dq_stages: int = 2
  dkv_stages: int = 2
  balanced: bool | None = None
  num_ctas: int | None = None

  def __post_init__(self):
    for name in ("forward_stages", "dq_stages", "dkv_stages", "num_ctas"):
      value = getattr(self, name)
      if value is None and name == "num_ctas":
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: a positive int, got {value!r}")
    if self.balanced not in (None, True, False):
      raise ValueError(f"balanced: True, False or None, got {self.balanced!r}")


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


def _assert_supported(q, k, v, block_q, block_kv, kv_seq_lengths):
  assert q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype, (q.dtype, k.dtype, v.dtype)
  assert q.shape[-1] in HEAD_DIMS and k.shape[-1] == q.shape[-1] == v.shape[-1], (q.shape, k.shape, v.shape)
  assert k.shape == v.shape and q.shape[2] % k.shape[2] == 0, (q.shape, k.shape, v.shape)
  assert block_q in BLOCK_Q and block_kv in BLOCK_KV, (block_q, block_kv)
  if kv_seq_lengths is not None:
    assert kv_seq_lengths.shape == q.shape[:1] and kv_seq_lengths.dtype == jnp.int32, kv_seq_lengths


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

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim], heads % kv_heads == 0
  (query head n reads kv head n // (heads // kv_heads)).
  kv_block_index: int32 [batch, heads, n_q_blocks, n_kv_blocks]; kv_block_count: int32 [batch, heads, n_q_blocks].
  kv_seq_lengths: int32 [batch] or None: keys from kv_seq_lengths[b] on take no part.
  is_causal: query i attends keys j ≤ i only (top-left aligned); the tables list no block wholly above
  the diagonal. tuning: `MosaicTuning` fields.
  Returns (out [batch, q_len, heads, head_dim], lse float32 [batch, heads, q_len]).
  """
  _assert_supported(q, k, v, block_q, block_kv, kv_seq_lengths)
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
    kv_seq_lengths,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    is_causal=bool(is_causal),
    tuning=tuning,
    interpret=interpret,
  )


def _causal_schedule(q_len, kv_len, *, block_q, block_kv, rows, lanes):
  """The forward and dQ kernels' schedule under causal masking, fixed at trace time: q block i costs the kv
  blocks its queries may see (the masks keep about a share of those, and always the block of its first
  query), the same in each of the `rows` (head, batch) rows of q blocks; `lanes` CTAs."""
  n_q_blocks, n_kv_blocks = pl.cdiv(q_len, block_q), pl.cdiv(kv_len, block_kv)
  last_query = np.minimum((np.arange(n_q_blocks) + 1) * block_q, q_len) - 1
  allowed = np.minimum(last_query // block_kv + 1, n_kv_blocks)
  with jax.ensure_compile_time_eval():
    return mp.Schedule(*balanced_schedule(np.tile(allowed, rows), lanes))


def _pad_to_tiles(x):
  """[batch, length, heads, head_dim] -> zero padded to whole 8-row tiles, which TMA needs."""
  padding = -x.shape[1] % 8
  return x if padding == 0 else jnp.pad(x, ((0, 0), (0, padding), (0, 0), (0, 0)))


def _pad_rows(x, length):
  """[batch, heads, q_len] -> [batch, heads, length], zero padded: whole tiles for the TMA."""
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[-1])))


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale", "is_causal", "tuning", "interpret"))
def _forward(
  q, k, v, kv_block_index, kv_block_count, kv_seq_lengths, *, block_q, block_kv, scale, is_causal, tuning, interpret
):
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  ctas = mp.persistent_ctas(tuning.num_ctas, kv_block_count.size)
  schedule = None
  if is_causal and tuning.balanced is not False:
    schedule = _causal_schedule(q_len, kv_len, block_q=block_q, block_kv=block_kv, rows=batch * heads, lanes=ctas)
  out, lse = mosaic_forward.forward_call(
    _pad_to_tiles(q),
    _pad_to_tiles(k),
    _pad_to_tiles(v),
    kv_block_index,
    kv_block_count,
    schedule,
    kv_seq_lengths,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    kv_len=kv_len,
    causal=is_causal,
    stages=tuning.forward_stages,
    ctas=ctas,
    interpret=interpret,
  )
  if out.shape[1] != q_len:
    out, lse = out[:, :q_len], lse[..., :q_len]
  return out, lse


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

  out, lse: `forward`'s results; d_out: [batch, q_len, heads, head_dim], the cotangent of out; d_lse:
  float32 [batch, heads, q_len], the cotangent of lse, or None (zero).
  q_block_index: int32 [batch, kv_heads, n_kv_blocks, group · n_q_blocks], group = heads // kv_heads, entry
  member · n_q_blocks + q_block for query head kv_head · group + member; q_block_count: int32
  [batch, kv_heads, n_kv_blocks]. dk and dv sum over each kv head's query heads.
  kv_seq_lengths, is_causal, tuning: as `forward`'s. Returns (dq, dk, dv) in the shapes of q, k, v.
  """
  _assert_supported(q, k, v, block_q, block_kv, kv_seq_lengths)
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
    d_lse,
    kv_block_index,
    kv_block_count,
    q_block_index,
    q_block_count,
    kv_seq_lengths,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    is_causal=bool(is_causal),
    tuning=tuning,
    row_slots=row_slots,
    kv_slots=kv_slots,
    interpret=interpret,
  )


@functools.partial(
  jax.jit,
  static_argnames=("block_q", "block_kv", "scale", "is_causal", "tuning", "row_slots", "kv_slots", "interpret"),
)
def _backward(
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
  kv_seq_lengths,
  *,
  block_q,
  block_kv,
  scale,
  is_causal,
  tuning,
  row_slots,
  kv_slots,
  interpret,
):
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1:3]
  n_q_blocks, n_kv_blocks = kv_block_index.shape[-2:]
  padded_len = n_q_blocks * block_q
  if is_causal or kv_seq_lengths is not None:
    # A row whose listed keys are all masked has lse = -inf: make its probabilities exp(s - lse) zero.
    lse = jnp.where(jnp.isneginf(lse), -mp.MASKED, lse)
  # lse zero padded: padded rows (zero q and dO, so zero delta) then add exactly zero to dK and dV.
  lse = _pad_rows(lse, padded_len)
  if d_lse is not None:
    d_lse = _pad_rows(d_lse.astype(jnp.float32), padded_len)
  q, k, v, out, d_out = (_pad_to_tiles(x) for x in (q, k, v, out, d_out))
  masks = dict(kv_len=kv_len, causal=is_causal)
  dq_ctas = mp.persistent_ctas(tuning.num_ctas, batch * heads * n_q_blocks)
  dq_schedule = None
  if is_causal and tuning.balanced is not False:
    dq_schedule = _causal_schedule(q_len, kv_len, block_q=block_q, block_kv=block_kv, rows=batch * heads, lanes=dq_ctas)
  dq, delta = mosaic_dq.dq_call(
    q,
    k,
    v,
    out,
    d_out,
    lse,
    d_lse,
    kv_block_index,
    kv_block_count,
    dq_schedule,
    kv_seq_lengths,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    **masks,
    stages=tuning.dq_stages,
    row_slots=row_slots,
    ctas=dq_ctas,
    interpret=interpret,
  )
  dkv_ctas = mp.persistent_ctas(tuning.num_ctas, pl.cdiv(batch * kv_heads * n_kv_blocks, mosaic_dkv.PAIRS))
  balanced = (is_causal or dim == 128) if tuning.balanced is None else tuning.balanced
  schedule = None
  if balanced:  # kv blocks differ in how many q blocks they serve: deal them so every lane does about as much
    # Causal: a kv block serves the q blocks at or after it, so adjacent rounds differ; merge them all.
    lanes = dkv_ctas * mosaic_dkv.PAIRS
    levels = None if is_causal else 1
    schedule = mp.Schedule(*balanced_schedule(q_block_count.reshape(-1), lanes, levels=levels))
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
    kv_seq_lengths,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    n_q_blocks=n_q_blocks,
    causal=is_causal,
    stages=tuning.dkv_stages,
    kv_slots=kv_slots,
    ctas=dkv_ctas,
    interpret=interpret,
  )
  if dq.shape[1] != q_len:
    dq = dq[:, :q_len]
  if dk.shape[1] != kv_len:
    dk, dv = dk[:, :kv_len], dv[:, :kv_len]
  return dq, dk, dv
