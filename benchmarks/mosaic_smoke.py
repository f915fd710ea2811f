"""First GPU run of the Mosaic GPU block-sparse kernels: compile, check against Triton, time both.

    python -m benchmarks.mosaic_smoke                 # 32,760 tokens x 12 heads x 128, bf16, 95% sparsity
    python -m benchmarks.mosaic_smoke --sweep         # also the `MosaicTuning` settings that fit: pipeline
                                                      # depths, dK/dV dealing, CTA counts
    python -m benchmarks.mosaic_smoke --head-dim 64 --sweep   # deeper pipelines, which fit at head_dim 64
    python -m benchmarks.mosaic_smoke --heads 32 --kv-heads 8 # GQA; --causal: causal masking (allowed blocks)
    python -m benchmarks.mosaic_smoke --causal --sweep        # also round-robin against the balanced schedules

Each step runs on its own and prints its exception, so one failure does not hide the others. Errors are
relative (‖ours − triton‖ / ‖triton‖) on the same inputs and index tables; both are bf16 kernels, so
expect ~1e-3, not 0. TFLOP/s count only the kept blocks: forward 4·D·block_q·block_kv per kept block,
backward 2.5x that (cuDNN: the dense or causal flops).
Times are device time (`timing.device_ms`, one profiler trace for all of them, after every check).
"""

from __future__ import annotations

import argparse
import functools
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.inputs import causal_block_mask, random_block_mask
from benchmarks.results import device_name
from pallas_kernels.block_sparse_attention import mosaic as mosaic_block_sparse
from pallas_kernels.block_sparse_attention import mosaic_pipeline
from pallas_kernels.block_sparse_attention import triton as triton_block_sparse
from sparge_jax import mask as mask_lib


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  finite = np.isfinite(ref)
  if not np.array_equal(np.isfinite(x), finite):
    return float("nan")
  return float(np.linalg.norm(x[finite] - ref[finite]) / np.linalg.norm(ref[finite]))


def _step(name, fn, results):
  try:
    results[name] = fn()
  except Exception as e:  # report and go on: one failing step must not hide the others
    results[name] = None
    print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[:2000]}")
    traceback.print_exc(limit=4)
  return results[name]


def sweep_variants(head_dim, causal=False):
  """(forward, backward) lists of `MosaicTuning` settings to time against the defaults: those that fit
  in shared memory at head_dim (MOSAIC_NOTES.md has what each measured); with causal masking also
  round-robin dealing, against the balanced schedules that are then the default in all three kernels."""
  sms = mosaic_pipeline.num_sms()
  if head_dim == 128:
    forward = (dict(forward_stages=1), dict(num_ctas=sms - 4)) + ((dict(balanced=False),) if causal else ())
    backward = (
      dict(dq_stages=3),  # one Q/dO row slot instead of two
      dict(dkv_stages=1),  # two K/V slots per dK/dV pair, no Q/dO double buffering
      dict(balanced=False),  # round-robin dealing
      dict(num_ctas=sms - 4),
    )
  else:
    forward = tuple(dict(forward_stages=n) for n in (3, 4)) + ((dict(balanced=False),) if causal else ())
    backward = tuple(dict(dq_stages=d, dkv_stages=s) for d in (2, 3, 4) for s in (2, 3) if (d, s) != (2, 2))
    backward += (dict(balanced=not causal),)
  return forward, backward


def tables(mask, *, kv_heads):
  """The forward/dQ table per query head and the dK/dV table per kv head (the backend contract's)."""
  batch, heads, n_q, n_kv = mask.shape
  group = heads // kv_heads
  by_kv_head = mask.reshape(batch, kv_heads, group, n_q, n_kv).transpose(0, 1, 4, 2, 3)
  return mask_lib.index_table(mask), mask_lib.index_table(by_kv_head.reshape(batch, kv_heads, n_kv, group * n_q))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-len", type=int, default=32760)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--sparsity", type=float, default=0.95)
  parser.add_argument("--kv-heads", type=int, default=None, help="GQA: kv heads (default: --heads)")
  parser.add_argument(
    "--causal",
    action="store_true",
    help="causal masking; the mask keeps --sparsity's share of each row's allowed blocks",
  )
  parser.add_argument("--sweep", action="store_true")
  args = parser.parse_args(argv)
  kv_heads = args.kv_heads or args.heads
  print(f"device {device_name()}, jax {jax.__version__}")

  block_q, block_kv, dtype = 128, 64, jnp.bfloat16
  shape = (1, args.seq_len, args.heads, args.head_dim)
  kv_shape = (1, args.seq_len, kv_heads, args.head_dim)
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  q, d_out = (jax.random.normal(key, shape, dtype) for key in keys[:2])
  k, v = (jax.random.normal(key, kv_shape, dtype) for key in keys[2:4])
  n_q, n_kv = -(-args.seq_len // block_q), -(-args.seq_len // block_kv)
  if args.causal:  # the attention suite's causal mask: the allowed blocks only, each q block's own block first
    mask = causal_block_mask(
      keys[4], 1, args.heads, args.seq_len, args.seq_len, block_q=block_q, block_kv=block_kv, sparsity=args.sparsity
    )
  else:
    mask = random_block_mask(keys[4], 1, args.heads, n_q, n_kv, max(1, round((1 - args.sparsity) * n_kv)))
  (kv_index, kv_count), (q_index, q_count) = jax.jit(functools.partial(tables, kv_heads=kv_heads))(mask)
  blocks = dict(block_q=block_q, block_kv=block_kv, scale=args.head_dim**-0.5, is_causal=args.causal)
  kept_flops = 4 * args.head_dim * block_q * block_kv * float(jnp.sum(mask))
  dense_flops = 4 * args.heads * args.seq_len**2 * args.head_dim * (0.5 if args.causal else 1.0)
  print(
    f"shape {shape} bf16, kv heads {kv_heads}, causal {args.causal}: {float(jnp.mean(jnp.sum(mask, -1))):.1f}/{n_kv}"
    " kv blocks kept per row"
  )

  def forward_fn(module, **tuning):
    return jax.jit(lambda q, k, v, i, c: module.forward(q, k, v, i, c, **blocks, **tuning))

  def backward_fn(module, **tuning):
    return jax.jit(
      lambda q, k, v, o, l, do, i, c, qi, qc: module.backward(q, k, v, o, l, do, None, i, c, qi, qc, **blocks, **tuning)
    )

  fwd_args = (q, k, v, kv_index, kv_count)
  results = {}
  triton_fwd = _step(
    "triton forward", lambda: jax.block_until_ready(forward_fn(triton_block_sparse)(*fwd_args)), results
  )
  mosaic_fwd = _step(
    "mosaic forward compile+run", lambda: jax.block_until_ready(forward_fn(mosaic_block_sparse)(*fwd_args)), results
  )
  if triton_fwd and mosaic_fwd:
    _step(
      "forward error",
      lambda: dict(out=_rel_err(mosaic_fwd[0], triton_fwd[0]), lse=_rel_err(mosaic_fwd[1], triton_fwd[1])),
      results,
    )

  def bwd_args(fwd):
    return (q, k, v, fwd[0], fwd[1], d_out, kv_index, kv_count, q_index, q_count)

  triton_bwd = mosaic_bwd = None
  if triton_fwd:
    triton_bwd = _step(
      "triton backward", lambda: jax.block_until_ready(backward_fn(triton_block_sparse)(*bwd_args(triton_fwd))), results
    )
    # The same (out, lse) for both, so only the backward kernels differ.
    mosaic_bwd = _step(
      "mosaic backward compile+run",
      lambda: jax.block_until_ready(backward_fn(mosaic_block_sparse)(*bwd_args(triton_fwd))),
      results,
    )
  if triton_bwd and mosaic_bwd:
    _step(
      "backward error",
      lambda: {name: _rel_err(m, t) for name, m, t in zip(("dq", "dk", "dv"), mosaic_bwd, triton_bwd)},
      results,
    )

  cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=args.causal, implementation="cudnn"))
  to_time = {"cudnn fwd": (cudnn, (q, k, v))}
  for name, module in (("triton", triton_block_sparse), ("mosaic", mosaic_block_sparse)):
    if results.get(f"{name} forward" if name == "triton" else "mosaic forward compile+run"):
      to_time[f"{name} fwd"] = (forward_fn(module), fwd_args)
    if triton_fwd and results.get(f"{name} backward" if name == "triton" else "mosaic backward compile+run"):
      to_time[f"{name} bwd"] = (backward_fn(module), bwd_args(triton_fwd))

  errors = {}

  def sweep_forward(tuning):
    """Time one forward variant; record its error against Triton on the same tables."""
    name = "mosaic fwd " + " ".join(f"{k}={v}" for k, v in tuning.items())
    fn = forward_fn(mosaic_block_sparse, **tuning)
    result = jax.block_until_ready(fn(*fwd_args))
    if triton_fwd:
      errors[name] = dict(out=_rel_err(result[0], triton_fwd[0]), lse=_rel_err(result[1], triton_fwd[1]))
    to_time[name] = (fn, fwd_args)

  def sweep_backward(tuning):
    name = "mosaic bwd " + " ".join(f"{k}={v}" for k, v in tuning.items())
    fn = backward_fn(mosaic_block_sparse, **tuning)
    grads = jax.block_until_ready(fn(*bwd_args(triton_fwd)))
    errors[name] = {g: _rel_err(m, t) for g, m, t in zip(("dq", "dk", "dv"), grads, triton_bwd)}
    to_time[name] = (fn, bwd_args(triton_fwd))

  if args.sweep and mosaic_fwd:
    forward_variants, backward_variants = sweep_variants(args.head_dim, args.causal)
    for tuning in forward_variants:
      _step(f"sweep forward {tuning}", lambda: sweep_forward(tuning), results)
    if triton_fwd and mosaic_bwd:
      for tuning in backward_variants:
        _step(f"sweep backward {tuning}", lambda: sweep_backward(tuning), results)

  times = {}
  _step(
    "time everything (device clock)",
    lambda: times.update({name: t.span for name, t in timing.device_ms(to_time).items()}),
    results,
  )

  print("\nerrors vs triton:", results.get("forward error"), results.get("backward error"))
  for name, error in errors.items():
    print(f"  {name}: " + ", ".join(f"{what} {value:.2e}" for what, value in error.items()))
  print(f"{'what':<80}{'ms':>9}{'kept TFLOP/s':>14}{'vs cudnn fwd':>14}")
  cudnn = times.get("cudnn fwd")
  for name, ms in times.items():
    flops = kept_flops * (2.5 if "bwd" in name else 1.0)
    if name == "cudnn fwd":
      flops = dense_flops
    ratio = f"{cudnn / ms:.1f}x" if cudnn and "fwd" in name else ""
    print(f"{name:<80}{ms:>9.3f}{flops / ms / 1e9:>14.0f}{ratio:>14}")


if __name__ == "__main__":
  main()
