"""Where the time of a sparse-attention call goes: device time per kernel, from a `jax.profiler` trace.

    python -m benchmarks.profile                       # 32,760 tokens × 12 heads × 128, sparsity 0.95
    python -m benchmarks.profile --seq-len 75600 --heads 40 --sparsity 0.9

Wall-clock medians (benchmarks/timing.py) of a small kernel include the host's dispatch when the kernel is
shorter than the dispatch; the trace's kernel durations do not. For each call it prints the kernels, their
mean device time per call and their share, and writes them to
benchmarks/results/profile-<device>.json.
"""

from __future__ import annotations

import argparse
import collections

import jax
import jax.numpy as jnp

from benchmarks import inputs, results, timing
from sparge_jax import attention


def kernel_times_us(fn, *args, repeats: int = 20, device: str = "/device:GPU:0") -> dict[str, float]:
  """Mean device time per call of each kernel that `fn(*args)` runs, in microseconds, longest first.

  fn must be jitted. Kernels are the complete events on `device`'s process in the trace; a kernel that runs
  k times per call counts k times.
  """
  jax.block_until_ready(fn(*args))  # compile outside the trace

  def run():
    for _ in range(repeats):
      out = fn(*args)
    jax.block_until_ready(out)

  return summarize(timing.trace_events(run), repeats=repeats, device=device)


def summarize(events, *, repeats: int, device: str) -> dict[str, float]:
  """Chrome-trace events -> {kernel name: mean µs per call} for the processes named like `device`."""
  totals = collections.Counter()
  for e in timing.device_events(events, device):
    totals[e["name"]] += float(e.get("dur", 0.0))
  return {name: us / repeats for name, us in totals.most_common()}


def _print(title, times):
  total = sum(times.values())
  print(f"\n{title}: {total:.1f} µs of kernels per call")
  for name, us in times.items():
    print(f"  {us:9.1f} µs {100 * us / total:5.1f}%  {name[:110]}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  inputs.add_shape_arguments(parser)
  parser.add_argument("--sparsity", type=float, default=0.95)
  parser.add_argument("--backend", default="auto", choices=attention.BACKENDS)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default=None, help="default benchmarks/results/profile-<device>.json")
  args = parser.parse_args(argv)
  inputs.check_positive(parser, args, "seq_len", "heads", "head_dim", "repeats")
  if not 0 <= args.sparsity < 1:
    parser.error("--sparsity must lie in [0, 1)")
  if jax.default_backend() != "gpu":
    parser.error("this profile reads GPU kernel times and needs a CUDA GPU")

  key = jax.random.PRNGKey(0)
  shape = (1, args.seq_len, args.heads, args.head_dim)
  q, k, v, d_out = inputs.random_qkv(
    key, batch=1, seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim, dtype=jnp.bfloat16
  )
  case = inputs.Case(args.seq_len, args.heads, args.head_dim, (args.sparsity,))
  mask = inputs.suite_mask(inputs.mask_key(key), case, args.sparsity, batch=1, block_q=128, block_kv=64)
  sparse = lambda q, k, v, mask: attention.block_sparse_attention(q, k, v, mask, backend=args.backend)
  calls = {
    "block_mask": (jax.jit(lambda q, k: attention.block_mask(q, k, backend=args.backend)), (q, k)),
    "block_sparse_attention forward": (jax.jit(sparse), (q, k, v, mask)),
    "block_sparse_attention forward+backward": (
      jax.jit(lambda q, k, v, d_out, mask: jax.vjp(lambda q, k, v: sparse(q, k, v, mask), q, k, v)[1](d_out)),
      (q, k, v, d_out, mask),
    ),
    "dense_attention forward (cuDNN)": (jax.jit(attention.dense_attention), (q, k, v)),
  }
  print(
    f"device: {results.device_name()}  jax {jax.__version__}  shape {shape}  sparsity "
    f"{1 - float(jnp.mean(mask)):.3f}  backend {args.backend}"
  )
  kernels = {}
  for title, (fn, call_args) in calls.items():
    kernels[title] = kernel_times_us(fn, *call_args, repeats=args.repeats)
    _print(title, kernels[title])
  path = args.out or results.results_path("profile")
  results.write_results(
    path,
    {
      "command": "python -m benchmarks.profile",
      "seq_len": args.seq_len,
      "heads": args.heads,
      "head_dim": args.head_dim,
      "sparsity": args.sparsity,
      "kernels_us_per_call": kernels,
    },
  )
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
