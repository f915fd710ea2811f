"""Block-sparse attention against cuDNN dense attention, in the same run.

    python -m benchmarks.attention                  # the suite below; writes benchmarks/results/<device>.json
    python -m benchmarks.attention --seq-len 32760 --heads 12 --head-dim 128 --sparsity 0.95 --backend triton
    python -m benchmarks.attention --sweep          # also times Triton launch settings (num_warps, num_stages)

Suite: 32,760 tokens (Wan2.1-1.3B 480p) × 12 heads × 128 at sparsity 0.95, 0.9, 0.8 and 0 (every block
kept); the same at head_dim 64; 75,600 tokens (Wan2.1-14B 720p) × 40 heads × 128 at 0.95. bf16, batch 1.

Masks keep the same number of randomly chosen kv blocks in every row. Times are medians of device time
per call, read from one `jax.profiler` trace per shape (`timing.device_ms`: warm-up, then 9 samples of 10
back-to-back calls, 5 samples of one call for calls over 20 ms), for cuDNN and ours alike: attention
calls by the span of their kernels, the mask stages and tables (each shorter than a host dispatch) by
their kernels' own time. fwd_ms and fwd_bwd_ms are the public `block_sparse_attention` call on a given mask
(index tables included); mask_ms is `block_mask` (pooling, pooled softmax, Top-k ∪ Top-p selection);
mask_fwd_ms is `sparse_attention` (mask from Q and K, then the forward, in one call; Top-k alone at the
random masks' kept count), what a caller waits for, against the same cuDNN forward (mask_fwd_speedup).
qk_read_ms is XLA summing Q and K (reading each once): the read floor the mask's pooling is held against.
TFLOP/s count only the kept blocks' work: forward 4·B·H·Nq·Nk·D·(1−s), forward+backward 3.5x that.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks import mask as mask_benchmark
from benchmarks import timing
from pallas_kernels.block_mask import triton_index_table as index_table
from pallas_kernels.block_sparse_attention import triton as triton_block_sparse
from sparge_jax import attention
from sparge_jax import mask as mask_lib


def random_block_mask(key, batch, heads, n_q_blocks, n_kv_blocks, kept):
  """bool [batch, heads, n_q_blocks, n_kv_blocks] keeping exactly `kept` random kv blocks per row."""
  noise = jax.random.uniform(key, (batch, heads, n_q_blocks, n_kv_blocks))
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return ranks < kept


def _fwd_bwd(attend):
  def run(q, k, v, d_out):
    out, pullback = jax.vjp(attend, q, k, v)
    return pullback(d_out)

  return jax.jit(run)


def measure(*, batch, seq_len, heads, head_dim, sparsities, dtype, backends, block_q, block_kv, seed=0):
  """Records for one shape: cuDNN once, then each backend at each sparsity."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  shape = (batch, seq_len, heads, head_dim)
  q, k, v, d_out = (jax.random.normal(key, shape, dtype) for key in keys[:4])
  n_q, n_kv = -(-seq_len // block_q), -(-seq_len // block_kv)

  dense = lambda q, k, v: attention.dense_attention(q, k, v)
  make_mask = jax.jit(lambda q, k: attention.block_mask(q, k, block_q=block_q, block_kv=block_kv))
  calls = {
    "cudnn_fwd": (jax.jit(dense), (q, k, v)),
    "cudnn_fwd_bwd": (_fwd_bwd(dense), (q, k, v, d_out)),
    "mask": (make_mask, (q, k)),
    "qk_read": (jax.jit(lambda q, k: (jnp.sum(q, dtype=jnp.float32), jnp.sum(k, dtype=jnp.float32))), (q, k)),
  }
  stages, _ = mask_benchmark.stage_calls(q, k, topk=0.03, topp=0.2, block_q=block_q, block_kv=block_kv)
  calls.update({name: stages[name] for name in MASK_COMPONENTS})
  sparsity_of = {}
  for target in sparsities:
    kept = max(1, round((1 - target) * n_kv))
    mask = random_block_mask(keys[4], batch, heads, n_q, n_kv, kept)
    sparsity_of[target] = 1.0 - float(jnp.mean(mask))
    calls[("tables", target)] = (jax.jit(index_table.index_tables), (mask,))  # what the GPU backends build
    for backend in backends:
      # The mask is an argument, not a closure constant: XLA would otherwise build the index tables at
      # compile time and leave them out of the timing.
      sparse = jax.jit(
        lambda q, k, v, mask, backend=backend: attention.block_sparse_attention(
          q, k, v, mask, block_q=block_q, block_kv=block_kv, backend=backend
        )
      )
      fwd_bwd = jax.jit(
        lambda q, k, v, d_out, mask, sparse=sparse: jax.vjp(lambda q, k, v: sparse(q, k, v, mask), q, k, v)[1](d_out)
      )
      calls[(backend, target, "fwd")] = (sparse, (q, k, v, mask))
      calls[(backend, target, "fwd_bwd")] = (fwd_bwd, (q, k, v, d_out, mask))
      # What a sparse_attention caller waits for: the mask from Q and K, then the forward, in one call.
      # Top-k alone at the same kept count keeps the same number of blocks per row as the random mask.
      mask_fwd = jax.jit(
        lambda q, k, v, backend=backend, topk=kept / n_kv: attention.sparse_attention(
          q, k, v, topk=topk, topp=0.0, mode="topk", block_q=block_q, block_kv=block_kv, backend=backend
        )
      )
      calls[(backend, target, "mask_fwd")] = (mask_fwd, (q, k, v))
  times = timing.device_ms(calls)
  # Attention calls by span (idle gaps count); the mask stages by their kernels' own time: alone, each is
  # shorter than its host dispatch, but inside sparse_attention or a model nothing waits for the host.
  ms = {label: (t.busy if label in MASK_CALLS or label[0] == "tables" else t.span) for label, t in times.items()}

  dense_flops = 4 * batch * heads * seq_len * seq_len * head_dim
  mask_breakdown = {name: ms[name] for name in MASK_COMPONENTS if name in ms}
  records = []
  for target in sparsities:
    sparsity = sparsity_of[target]
    for backend in backends:
      if (backend, target, "fwd") not in ms or (backend, target, "fwd_bwd") not in ms:
        continue  # failed to compile or run: reported by device_ms
      fwd_ms, fwd_bwd_ms = ms[(backend, target, "fwd")], ms[(backend, target, "fwd_bwd")]
      mask_fwd_ms = ms.get((backend, target, "mask_fwd"), float("nan"))
      kept_flops = dense_flops * (1 - sparsity)
      records.append(
        dict(
          batch=batch,
          seq_len=seq_len,
          heads=heads,
          head_dim=head_dim,
          dtype=jnp.dtype(dtype).name,
          backend=backend,
          block_q=block_q,
          block_kv=block_kv,
          target_sparsity=target,
          sparsity=sparsity,
          fwd_ms=fwd_ms,
          fwd_bwd_ms=fwd_bwd_ms,
          cudnn_fwd_ms=ms["cudnn_fwd"],
          cudnn_fwd_bwd_ms=ms["cudnn_fwd_bwd"],
          mask_ms=ms["mask"],
          tables_ms=ms[("tables", target)],
          mask_breakdown_ms=mask_breakdown,
          qk_read_floor_ms=2 * q.nbytes / 3.0e9,
          qk_read_ms=ms["qk_read"],
          fwd_speedup=ms["cudnn_fwd"] / fwd_ms,
          fwd_bwd_speedup=ms["cudnn_fwd_bwd"] / fwd_bwd_ms,
          mask_fwd_ms=mask_fwd_ms,
          mask_fwd_speedup=ms["cudnn_fwd"] / mask_fwd_ms,
          ideal_speedup=1 / (1 - sparsity) if sparsity < 1 else float("inf"),
          fwd_tflops=kept_flops / fwd_ms / 1e9,
          fwd_bwd_tflops=3.5 * kept_flops / fwd_bwd_ms / 1e9,
          cudnn_fwd_tflops=dense_flops / ms["cudnn_fwd"] / 1e9,
        )
      )
      print_row(records[-1])
  return records


def print_row(r):
  print(
    f"{r['seq_len']:>6} {r['heads']:>3} {r['head_dim']:>4} {r['backend']:>7} {r['sparsity']:6.3f} "
    f"{r['fwd_ms']:8.3f} {r['cudnn_fwd_ms']:8.2f} {r['fwd_speedup']:6.2f} "
    f"{r['fwd_bwd_ms']:8.3f} {r['cudnn_fwd_bwd_ms']:8.2f} {r['fwd_bwd_speedup']:6.2f} "
    f"{r['ideal_speedup']:6.1f} {r['fwd_tflops']:6.0f} {r['fwd_bwd_tflops']:6.0f} "
    f"{r['mask_ms']:6.3f} {r['tables_ms']:6.3f} {r['mask_fwd_ms']:8.3f} {r['mask_fwd_speedup']:6.2f}",
    flush=True,
  )


HEADER = (
  f"{'tokens':>6} {'H':>3} {'D':>4} {'backend':>7} {'sparse':>6} {'fwd ms':>8} {'cuDNN':>8} {'x':>6} "
  f"{'fwd+bwd':>8} {'cuDNN':>8} {'x':>6} {'ideal':>6} {'TF/s f':>6} {'fb':>6} {'mask':>6} {'tables':>6} "
  f"{'mask+fwd':>8} {'x':>6}"
)

# (seq_len, heads, head_dim, sparsities): Wan2.1-1.3B at 480p, its head_dim-64 variant, Wan2.1-14B at 720p.
SUITE = [(32760, 12, 128, (0.95, 0.9, 0.8, 0.0)), (32760, 12, 64, (0.95,)), (75600, 40, 128, (0.95,))]


MASK_COMPONENTS = ("pooling", "pooled logits", "selection")  # stages of benchmarks.mask, timed alone
MASK_CALLS = ("mask", "qk_read") + MASK_COMPONENTS


def sweep(*, seq_len, heads, head_dim, sparsity, dtype, block_q, block_kv):
  """Kernel-only times (tables prebuilt) for launch settings of the Triton forward and backward."""
  keys = jax.random.split(jax.random.PRNGKey(1), 5)
  shape = (1, seq_len, heads, head_dim)
  q, k, v, d_out = (jax.random.normal(key, shape, dtype) for key in keys[:4])
  n_q, n_kv = -(-seq_len // block_q), -(-seq_len // block_kv)
  mask = random_block_mask(keys[4], 1, heads, n_q, n_kv, max(1, round((1 - sparsity) * n_kv)))
  (kv_index, kv_count), (q_index, q_count) = jax.jit(mask_lib.index_tables)(mask)
  scale = head_dim**-0.5
  common = dict(block_q=block_q, block_kv=block_kv, scale=scale)
  out, lse = triton_block_sparse.forward(q, k, v, kv_index, kv_count, **common)
  rows = []
  for warps, stages in itertools.product((4, 8), (2, 3, 4)):
    fwd = jax.jit(
      lambda q, k, v: triton_block_sparse.forward(
        q, k, v, kv_index, kv_count, num_warps=warps, num_stages=stages, **common
      )
    )
    bwd = jax.jit(
      lambda q, k, v, o, lse, do: triton_block_sparse.backward(
        q, k, v, o, lse, do, kv_index, kv_count, q_index, q_count, num_warps=warps, num_stages=stages, **common
      )
    )
    try:
      rows.append(
        dict(
          num_warps=warps,
          num_stages=stages,
          fwd_ms=timing.median_ms(fwd, q, k, v),
          bwd_ms=timing.median_ms(bwd, q, k, v, out, lse, d_out),
        )
      )
    except Exception as e:  # a launch setting that does not fit (shared memory) is a result, not a crash
      rows.append(dict(num_warps=warps, num_stages=stages, error=str(e).splitlines()[0][:200]))
    print(rows[-1], flush=True)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seq-len", type=int, default=None, help="one shape instead of the suite")
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--sparsity", type=float, nargs="+", default=[0.95, 0.9, 0.8])
  parser.add_argument(
    "--backend",
    nargs="+",
    default=None,
    choices=attention.BACKENDS,
    help="default: mosaic and triton on Hopper, triton on other GPUs",
  )
  parser.add_argument("--block-q", type=int, default=128)
  parser.add_argument("--block-kv", type=int, default=64)
  parser.add_argument("--sweep", action="store_true", help="also time Triton launch settings")
  parser.add_argument("--out", default=None, help="results file (default benchmarks/results/<device>.json)")
  args = parser.parse_args(argv)
  for name in ("seq_len", "heads", "head_dim", "batch"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  if not all(0 <= s < 1 for s in args.sparsity):
    parser.error("--sparsity values must lie in [0, 1)")
  if jax.default_backend() != "gpu":
    parser.error("this benchmark compares against cuDNN and needs a CUDA GPU")
  backends = args.backend or (["mosaic", "triton"] if attention._on_hopper() else ["triton"])
  suite = SUITE if args.seq_len is None else [(args.seq_len, args.heads, args.head_dim, tuple(args.sparsity))]

  print(f"device: {timing.device_name()}  jax {jax.__version__}", flush=True)
  print(HEADER, flush=True)
  records = []
  for seq_len, heads, head_dim, sparsities in suite:
    records += measure(
      batch=args.batch,
      seq_len=seq_len,
      heads=heads,
      head_dim=head_dim,
      sparsities=sparsities,
      dtype=jnp.bfloat16,
      backends=backends,
      block_q=args.block_q,
      block_kv=args.block_kv,
    )
  command = " ".join(["python -m benchmarks.attention", *(sys.argv[1:] if argv is None else argv)])
  payload = {"command": command, "records": records}
  if args.sweep:
    seq_len, heads, head_dim, sparsities = suite[0]
    payload["sweep"] = sweep(
      seq_len=seq_len,
      heads=heads,
      head_dim=head_dim,
      sparsity=sparsities[0],
      dtype=jnp.bfloat16,
      block_q=args.block_q,
      block_kv=args.block_kv,
    )
  path = args.out or os.path.join("benchmarks", "results", f"{timing.device_slug()}.json")
  timing.write_results(path, payload)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
