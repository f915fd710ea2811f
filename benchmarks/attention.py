"""Block-sparse attention against cuDNN dense attention, in the same run.

    python -m benchmarks.attention                  # the suite; writes benchmarks/results/attention-<device>.json
    python -m benchmarks.attention --seq-len 32760 --heads 12 --head-dim 128 --sparsity 0.95 --backend triton
    python -m benchmarks.attention --seq-len 32760 --heads 32 --kv-heads 8 --causal --sparsity 0.95 0.0
    python -m benchmarks.attention --sweep          # also times Triton launch settings (num_warps, num_stages)

Suite (`inputs.SUITE`), bf16, batch 1: 32,760 tokens (Wan2.1-1.3B 480p) × 12 heads × 128 at sparsity 0.95,
0.9, 0.8 and 0 (every block kept); the same at head_dim 64; 75,600 tokens (Wan2.1-14B 720p) × 40 heads × 128
at 0.95; grouped-query attention, 32 query heads over 8 kv heads, at 0.95; causal at 0.95 and 0 of the
blocks the diagonal allows. Each row is timed against cuDNN (`jax.nn.dot_product_attention(
implementation="cudnn")`, with the same kv heads and `is_causal`) in the same run. A row the library cannot
run yet (it raises on the shapes alone) is skipped with its reason printed and recorded.

Masks follow `inputs`' kept-count law: the same number of random kv blocks in every row (causal rows: of
their allowed blocks, their own block always kept). Times are medians of device time per call, read from one
`jax.profiler` trace per case (`timing.device_ms`), for cuDNN and ours alike: attention calls by the span of
their kernels, the mask stages and tables (each shorter than a host dispatch) by their kernels' own time.
fwd_ms and fwd_bwd_ms are the public `block_sparse_attention` on a given mask (index tables included);
mask_ms is `block_mask`; mask_fwd_ms is `sparse_attention` (the mask from Q and K, then the forward; Top-k
alone at the random masks' kept fraction) against the same cuDNN forward. qk_read_ms is XLA summing Q and K,
the read floor of the mask's pooling. TFLOP/s count only the kept blocks' work: forward 4·B·N·T·S·D times
the kept fraction of all blocks, forward+backward 3.5x that. The command ends with the targets: GQA and
causal forward ratios against the MHA non-causal ratio at the same sparsity, and dense rows against cuDNN.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import inputs, results, timing
from benchmarks import mask as mask_benchmark
from pallas_kernels.block_mask import triton_index_table as index_table
from pallas_kernels.block_sparse_attention import triton as triton_block_sparse
from sparge_jax import attention
from sparge_jax import backends as backend_table
from sparge_jax import mask as mask_lib

MASK_COMPONENTS = ("pooling", "pooled logits", "selection")  # stages of benchmarks.mask, timed alone
MASK_CALLS = ("mask", "qk_read") + MASK_COMPONENTS
RATIO_TARGET = 0.9  # GQA/causal forward ratio over the MHA non-causal one; dense rows over cuDNN


def why_unsupported(fn, *args) -> str | None:
  """None if `fn(*args)` traces, else the library's reason; shapes only (`jax.eval_shape`): nothing runs."""
  try:
    jax.eval_shape(fn, *args)
  except (ValueError, TypeError, NotImplementedError) as e:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  return None


def dense_fns(case: inputs.Case, implementation: str = "cudnn"):
  """(forward(q, k, v), forward_backward(q, k, v, d_out) -> (dq, dk, dv)), jitted, of dense attention."""
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=case.is_causal, implementation=implementation)
  return jax.jit(dense), _fwd_bwd(dense)


def _api_options(case: inputs.Case, backend: str, block_q: int, block_kv: int, interpret: bool) -> dict:
  options = dict(block_q=block_q, block_kv=block_kv, backend=backend)
  # Passed only where used, so that the rows the library supports run on an API without these arguments.
  if case.is_causal:
    options["is_causal"] = True
  if interpret:
    options["interpret"] = True
  return options


def sparse_fns(case: inputs.Case, backend: str, *, block_q: int, block_kv: int, interpret: bool = False):
  """The public `block_sparse_attention` for `case` on `backend`, jitted: forward(q, k, v, mask) and
  forward_backward(q, k, v, d_out, mask) -> (dq, dk, dv)."""
  options = _api_options(case, backend, block_q, block_kv, interpret)
  # The mask is an argument, not a closure constant: XLA would otherwise build the index tables at compile
  # time and leave them out of the timing.
  forward = jax.jit(lambda q, k, v, mask: attention.block_sparse_attention(q, k, v, mask, **options))
  forward_backward = jax.jit(
    lambda q, k, v, d_out, mask: jax.vjp(lambda q, k, v: forward(q, k, v, mask), q, k, v)[1](d_out)
  )
  return forward, forward_backward


def sparse_attention_fn(
  case: inputs.Case, backend: str, *, topk: float, block_q: int, block_kv: int, interpret: bool = False
):
  """The public `sparse_attention` (mask from q and k, then the forward) with Top-k alone at `topk`,
  jitted: (q, k, v) -> out."""
  options = _api_options(case, backend, block_q, block_kv, interpret)
  return jax.jit(lambda q, k, v: attention.sparse_attention(q, k, v, topk=topk, topp=0.0, mode="topk", **options))


def _fwd_bwd(attend):
  def run(q, k, v, d_out):
    out, pullback = jax.vjp(attend, q, k, v)
    return pullback(d_out)

  return jax.jit(run)


def _skip(skipped, case, backend, target, what, reason):
  skipped.append(dict(case=case.label, backend=backend, target_sparsity=target, what=what, reason=reason))
  print(f"skip: {case.label} {backend or ''} {'' if target is None else f'at {target}'} {what}: {reason}", flush=True)


def measure(case: inputs.Case, *, batch, dtype, backends, block_q, block_kv, skipped, seed=0):
  """Records for one case: cuDNN once, then each backend at each sparsity. Appends skipped rows (with the
  library's reason) to `skipped`."""
  key = jax.random.PRNGKey(seed)
  q, k, v, d_out = inputs.random_qkv(
    key,
    batch=batch,
    seq_len=case.seq_len,
    heads=case.heads,
    head_dim=case.head_dim,
    kv_heads=case.kv_heads,
    dtype=dtype,
  )
  n_kv = -(-case.seq_len // block_kv)
  cudnn_fwd, cudnn_fwd_bwd = dense_fns(case)
  calls = {
    "cudnn_fwd": (cudnn_fwd, (q, k, v)),
    "cudnn_fwd_bwd": (cudnn_fwd_bwd, (q, k, v, d_out)),
    "qk_read": (jax.jit(lambda q, k: (jnp.sum(q, dtype=jnp.float32), jnp.sum(k, dtype=jnp.float32))), (q, k)),
  }
  causal = {"is_causal": True} if case.is_causal else {}
  make_mask = jax.jit(lambda q, k: attention.block_mask(q, k, block_q=block_q, block_kv=block_kv, **causal))
  reason = why_unsupported(make_mask, q, k)
  if reason:
    _skip(skipped, case, None, None, "block_mask", reason)
  else:
    calls["mask"] = (make_mask, (q, k))
  if not (case.is_gqa or case.is_causal):  # the mask's stages, as benchmarks.mask times them
    stages, _ = mask_benchmark.stage_calls(q, k, topk=0.03, topp=0.2, block_q=block_q, block_kv=block_kv)
    calls.update({name: stages[name] for name in MASK_COMPONENTS})

  allowed_fraction = 1.0
  if case.is_causal:
    allowed, _ = inputs.causal_blocks(case.seq_len, case.seq_len, block_q=block_q, block_kv=block_kv)
    allowed_fraction = float(np.mean(allowed))
  kept_fraction, sparsity_of = {}, {}
  # One compiled forward and forward+backward per backend serve every sparsity: the mask is an argument.
  apis = {backend: sparse_fns(case, backend, block_q=block_q, block_kv=block_kv) for backend in backends}
  for target in case.sparsities:
    mask = inputs.suite_mask(inputs.mask_key(key), case, target, batch=batch, block_q=block_q, block_kv=block_kv)
    kept_fraction[target] = float(jnp.mean(mask))
    sparsity_of[target] = 1.0 - kept_fraction[target] / allowed_fraction  # of the allowed blocks
    calls[("tables", target)] = (jax.jit(index_table.index_tables), (mask,))  # what the GPU backends build
    for backend, (forward, forward_backward) in apis.items():
      reason = why_unsupported(forward, q, k, v, mask)
      if reason:
        _skip(skipped, case, backend, target, "block_sparse_attention", reason)
        continue
      calls[(backend, target, "fwd")] = (forward, (q, k, v, mask))
      calls[(backend, target, "fwd_bwd")] = (forward_backward, (q, k, v, d_out, mask))
      # Top-k alone at the random mask's kept fraction keeps about as many blocks per row.
      topk = inputs.kept_count(target, n_kv) / n_kv
      mask_forward = sparse_attention_fn(case, backend, topk=topk, block_q=block_q, block_kv=block_kv)
      reason = why_unsupported(mask_forward, q, k, v)
      if reason:
        _skip(skipped, case, backend, target, "sparse_attention", reason)
      else:
        calls[(backend, target, "mask_fwd")] = (mask_forward, (q, k, v))
  times = timing.device_ms(calls)
  # Attention calls by span (idle gaps count); the mask stages by their kernels' own time: alone, each is
  # shorter than its host dispatch, but inside sparse_attention or a model nothing waits for the host.
  ms = {label: (t.busy if label in MASK_CALLS or label[0] == "tables" else t.span) for label, t in times.items()}
  if "cudnn_fwd" not in ms or "cudnn_fwd_bwd" not in ms:
    _skip(skipped, case, "cudnn", None, "dense attention", "cuDNN failed (printed above): no ratios")
    return []

  dense_flops = 4 * batch * case.heads * case.seq_len * case.seq_len * case.head_dim
  # cuDNN's causal kernel computes the lower triangle only.
  cudnn_flops = dense_flops * ((case.seq_len + 1) / (2 * case.seq_len) if case.is_causal else 1.0)
  nan = float("nan")
  records = []
  for target in case.sparsities:
    sparsity = sparsity_of[target]
    for backend in backends:
      if (backend, target, "fwd") not in ms or (backend, target, "fwd_bwd") not in ms:
        if (backend, target, "fwd") in calls:
          _skip(skipped, case, backend, target, "timing", "failed to compile or run (printed above)")
        continue
      fwd_ms, fwd_bwd_ms = ms[(backend, target, "fwd")], ms[(backend, target, "fwd_bwd")]
      mask_fwd_ms = ms.get((backend, target, "mask_fwd"), nan)
      kept_flops = dense_flops * kept_fraction[target]
      records.append(
        dict(
          case=case.label,
          batch=batch,
          seq_len=case.seq_len,
          heads=case.heads,
          kv_heads=case.kv_heads,
          head_dim=case.head_dim,
          is_causal=case.is_causal,
          dtype=jnp.dtype(dtype).name,
          backend=backend,
          block_q=block_q,
          block_kv=block_kv,
          target_sparsity=target,
          sparsity=sparsity,
          kept_fraction=kept_fraction[target],
          fwd_ms=fwd_ms,
          fwd_bwd_ms=fwd_bwd_ms,
          cudnn_fwd_ms=ms["cudnn_fwd"],
          cudnn_fwd_bwd_ms=ms["cudnn_fwd_bwd"],
          mask_ms=ms.get("mask", nan),
          tables_ms=ms.get(("tables", target), nan),
          mask_breakdown_ms={name: ms[name] for name in MASK_COMPONENTS if name in ms},
          qk_read_floor_ms=(q.nbytes + k.nbytes) / 3.0e9,
          qk_read_ms=ms.get("qk_read", nan),
          fwd_speedup=ms["cudnn_fwd"] / fwd_ms,
          fwd_bwd_speedup=ms["cudnn_fwd_bwd"] / fwd_bwd_ms,
          mask_fwd_ms=mask_fwd_ms,
          mask_fwd_speedup=ms["cudnn_fwd"] / mask_fwd_ms,
          ideal_speedup=1 / (1 - sparsity) if sparsity < 1 else float("inf"),
          fwd_tflops=kept_flops / fwd_ms / 1e9,
          fwd_bwd_tflops=3.5 * kept_flops / fwd_bwd_ms / 1e9,
          cudnn_fwd_tflops=cudnn_flops / ms["cudnn_fwd"] / 1e9,
        )
      )
      print_row(records[-1])
  return records


def targets(records) -> list[dict]:
  """The GQA and causal rows' ratios against the MHA non-causal row of the same sequence length, head_dim,
  backend and target sparsity (the forward ratio's target: >= RATIO_TARGET of it), and every dense row
  (target sparsity 0) against cuDNN (target: >= RATIO_TARGET)."""
  base = {
    (r["backend"], r["seq_len"], r["head_dim"], r["target_sparsity"]): r
    for r in records
    if r["kv_heads"] == r["heads"] and not r["is_causal"]
  }
  rows = []
  for r in records:
    reference = base.get((r["backend"], r["seq_len"], r["head_dim"], r["target_sparsity"]))
    if reference is not None and reference is not r:
      value = r["fwd_speedup"] / reference["fwd_speedup"]
      rows.append(
        dict(
          what=f"{r['backend']} {r['case']} at {r['target_sparsity']}: forward ratio over {reference['case']}'s",
          value=value,
          target=RATIO_TARGET,
          met=value >= RATIO_TARGET,
          fwd_speedup=r["fwd_speedup"],
          reference_fwd_speedup=reference["fwd_speedup"],
          fwd_bwd_over_reference=r["fwd_bwd_speedup"] / reference["fwd_bwd_speedup"],
        )
      )
    if r["target_sparsity"] == 0.0:
      for key, what in (("fwd_speedup", "forward"), ("fwd_bwd_speedup", "forward+backward")):
        rows.append(
          dict(
            what=f"{r['backend']} {r['case']} dense: {what} over cuDNN",
            value=r[key],
            target=RATIO_TARGET,
            met=r[key] >= RATIO_TARGET,
          )
        )
  return rows


def print_targets(rows) -> None:
  print("\ntargets:")
  for t in rows:
    extra = ""
    if "reference_fwd_speedup" in t:
      extra = (
        f" ({t['fwd_speedup']:.2f}x vs {t['reference_fwd_speedup']:.2f}x; "
        f"forward+backward {t['fwd_bwd_over_reference']:.2f} of it)"
      )
    print(f"  {t['what']}: {t['value']:.2f}{extra}, target >= {t['target']:.2f}: {'met' if t['met'] else 'NOT met'}")


def print_row(r):
  print(
    f"{r['seq_len']:>6} {r['heads']:>3} {r['kv_heads']:>3} {r['head_dim']:>4} {'yes' if r['is_causal'] else 'no':>6} "
    f"{r['backend']:>7} {r['sparsity']:6.3f} "
    f"{r['fwd_ms']:8.3f} {r['cudnn_fwd_ms']:8.2f} {r['fwd_speedup']:6.2f} "
    f"{r['fwd_bwd_ms']:8.3f} {r['cudnn_fwd_bwd_ms']:8.2f} {r['fwd_bwd_speedup']:6.2f} "
    f"{r['ideal_speedup']:6.1f} {r['fwd_tflops']:6.0f} {r['fwd_bwd_tflops']:6.0f} "
    f"{r['mask_ms']:6.3f} {r['tables_ms']:6.3f} {r['mask_fwd_ms']:8.3f} {r['mask_fwd_speedup']:6.2f}",
    flush=True,
  )


HEADER = (
  f"{'tokens':>6} {'H':>3} {'KV':>3} {'D':>4} {'causal':>6} {'backend':>7} {'sparse':>6} {'fwd ms':>8} {'cuDNN':>8} "
  f"{'x':>6} {'fwd+bwd':>8} {'cuDNN':>8} {'x':>6} {'ideal':>6} {'TF/s f':>6} {'fb':>6} {'mask':>6} {'tables':>6} "
  f"{'mask+fwd':>8} {'x':>6}"
)


def sweep(case: inputs.Case, *, dtype, block_q, block_kv):
  """Kernel-only times (tables prebuilt) for launch settings of the Triton forward and backward, at the
  case's first sparsity."""
  key = jax.random.PRNGKey(1)
  q, k, v, d_out = inputs.random_qkv(
    key, batch=1, seq_len=case.seq_len, heads=case.heads, head_dim=case.head_dim, dtype=dtype
  )
  mask = inputs.suite_mask(inputs.mask_key(key), case, case.sparsities[0], batch=1, block_q=block_q, block_kv=block_kv)
  (kv_index, kv_count), (q_index, q_count) = jax.jit(mask_lib.index_tables)(mask)
  common = dict(block_q=block_q, block_kv=block_kv, scale=case.head_dim**-0.5)
  tables = dict(kv_block_index=kv_index, kv_block_count=kv_count, q_block_index=q_index, q_block_count=q_count)
  if "d_lse" in inspect.signature(triton_block_sparse.backward).parameters:
    tables["d_lse"] = None  # the loss does not use the log-sum-exp
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
        q, k, v, o, lse, do, num_warps=warps, num_stages=stages, **tables, **common
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
  inputs.add_shape_arguments(parser, seq_len=None)
  parser.add_argument("--kv-heads", type=int, default=None, help="k/v heads (default: --heads)")
  parser.add_argument("--causal", action="store_true")
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
  parser.add_argument("--out", default=None, help="results file (default benchmarks/results/attention-<device>.json)")
  args = parser.parse_args(argv)
  inputs.check_positive(parser, args, "seq_len", "heads", "head_dim", "kv_heads", "batch")
  if not all(0 <= s < 1 for s in args.sparsity):
    parser.error("--sparsity values must lie in [0, 1)")
  if args.kv_heads is not None and args.heads % args.kv_heads:
    parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
  if jax.default_backend() != "gpu":
    parser.error("this benchmark compares against cuDNN and needs a CUDA GPU")
  backends = args.backend or (["mosaic", "triton"] if backend_table.on_hopper() else ["triton"])
  if args.seq_len is None:
    suite = inputs.SUITE
  else:
    suite = [inputs.Case(args.seq_len, args.heads, args.head_dim, tuple(args.sparsity), args.kv_heads, args.causal)]

  print(f"device: {results.device_name()}  jax {jax.__version__}", flush=True)
  print(HEADER, flush=True)
  records, skipped = [], []
  for case in suite:
    records += measure(
      case,
      batch=args.batch,
      dtype=jnp.bfloat16,
      backends=backends,
      block_q=args.block_q,
      block_kv=args.block_kv,
      skipped=skipped,
    )
  target_rows = targets(records)
  print_targets(target_rows)
  command = " ".join(["python -m benchmarks.attention", *(sys.argv[1:] if argv is None else argv)])
  payload = {"command": command, "records": records, "targets": target_rows, "skipped": skipped}
  if args.sweep:
    payload["sweep"] = sweep(suite[0], dtype=jnp.bfloat16, block_q=args.block_q, block_kv=args.block_kv)
  path = args.out or results.results_path("attention")
  results.write_results(path, payload)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
