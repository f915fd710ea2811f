"""The block mask stage by stage, against reading Q and K once and against the sparse forward.

    python -m benchmarks.mask                          # 32,760 tokens × 12 heads × 128
    python -m benchmarks.mask --seq-len 75600 --heads 40

Two kinds of input, both bf16, batch 1:
- random: Q and K standard normal, as in `benchmarks.attention`. Pooled rows are nearly uniform, so Top-p
  decides (the default hybrid keeps many blocks) and the selection runs its Top-p search.
- structured: the same plus a slowly varying component of position, shared by neighbouring tokens as in
  video; pooled rows are skewed and Top-k decides, as in trained models (`inputs.qk_inputs`).
For each, the kernel time (`timing.device_ms`, busy) of: the read floor (XLA summing Q and K, the bytes any
pooling must read), pooling, pooled logits, selection, forward table, dK/dV table (transpose + table), and
`block_mask` plus both tables as one call; then the sparse forward at 0.95 (a random mask, as the attention
suite times it), so the mask's share of the forward is printed. Writes benchmarks/results/mask-<device>.json.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import inputs, results, timing
from pallas_kernels.block_mask import triton_index_table as index_table
from pallas_kernels.block_mask import triton_pool as mask_pool
from pallas_kernels.block_mask import triton_select as mask_select
from sparge_jax import attention


def stage_calls(q, k, *, topk: float, topp: float, block_q: int = 128, block_kv: int = 64, interpret: bool = False):
  """{stage: (jitted fn, args)} for the mask's stages, each fed the previous stage's output, and the whole
  mask + tables; the inputs of each stage are computed once here. Also returns the mask."""
  scale = q.shape[-1] ** -0.5
  pool = jax.jit(functools.partial(mask_pool.block_means_pair, block_q=block_q, block_kv=block_kv, interpret=interpret))
  logits_fn = jax.jit(functools.partial(mask_pool.pooled_logits, scale=scale, interpret=interpret))
  select = jax.jit(functools.partial(mask_select.select_blocks_from_logits, mode="hybrid", interpret=interpret))
  table = jax.jit(functools.partial(index_table.index_table, interpret=interpret))
  transposed_table = jax.jit(lambda m: index_table.index_table(jnp.swapaxes(m, -1, -2), interpret=interpret))

  def whole(q, k):
    mask = attention.block_mask(
      q, k, topk=topk, topp=topp, block_q=block_q, block_kv=block_kv, backend="triton", interpret=interpret
    )
    return mask, index_table.index_tables(mask, interpret=interpret)

  q_means, k_means = pool(q, k)
  logits = logits_fn(q_means, k_means)
  mask = select(logits, topk, topp)
  calls = {
    "read floor (XLA sum of Q and K)": (
      jax.jit(lambda q, k: (jnp.sum(q, dtype=jnp.float32), jnp.sum(k, dtype=jnp.float32))),
      (q, k),
    ),
    "pooling": (pool, (q, k)),
    "pooled logits": (logits_fn, (q_means, k_means)),
    "selection": (select, (logits, topk, topp)),
    "forward table": (table, (mask,)),
    "dK/dV table": (transposed_table, (mask,)),
    "mask + both tables": (jax.jit(whole), (q, k)),
  }
  return calls, mask


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  inputs.add_shape_arguments(parser)
  parser.add_argument("--topk", type=float, default=0.03)
  parser.add_argument("--topp", type=float, default=0.2)
  parser.add_argument("--out", default=None, help="default benchmarks/results/mask-<device>.json")
  args = parser.parse_args(argv)
  inputs.check_positive(parser, args, "seq_len", "heads")
  if args.head_dim not in (64, 128):
    parser.error(f"--head-dim must be 64 or 128, got {args.head_dim}")
  if not (0 <= args.topk <= 1 and 0 <= args.topp <= 1):
    parser.error("--topk and --topp must lie in [0, 1]")
  if jax.default_backend() != "gpu":
    parser.error("this benchmark reads GPU kernel times and needs a CUDA GPU")

  shape = (1, args.seq_len, args.heads, args.head_dim)
  print(
    f"device: {results.device_name()}  jax {jax.__version__}  shape {shape}  hybrid Top-k {args.topk} "
    f"∪ Top-p {args.topp}"
  )
  q, k = inputs.qk_inputs("random", shape)
  v = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.bfloat16)
  n_q, n_kv = -(-args.seq_len // 128), -(-args.seq_len // 64)
  forward_mask = inputs.random_block_mask(
    jax.random.PRNGKey(2), 1, args.heads, n_q, n_kv, inputs.kept_count(0.95, n_kv)
  )
  forward = timing.device_ms({"forward": (jax.jit(attention.block_sparse_attention), (q, k, v, forward_mask))})
  forward_us = forward["forward"].span * 1e3
  print(f"sparse forward at 0.95 (random mask): {forward_us:.1f} µs")

  by_kind = {}
  for kind in ("random", "structured"):
    q, k = inputs.qk_inputs(kind, shape)
    calls, mask = stage_calls(q, k, topk=args.topk, topp=args.topp)
    whole_mask = calls["mask + both tables"][0](q, k)[0]
    if not bool(jnp.all(whole_mask == mask)):
      raise RuntimeError("the stages' mask differs from block_mask's: the stages no longer match the library")
    times = {name: t.busy * 1e3 for name, t in timing.device_ms(calls).items()}
    whole = times["mask + both tables"]
    print(f"\n{kind} inputs: {float(jnp.mean(mask)):.1%} of blocks kept")
    for name, us in times.items():
      print(f"  {name:34s} {us:7.1f} µs")
    print(
      f"  mask + both tables = {whole / times['read floor (XLA sum of Q and K)']:.2f}x the read floor, "
      f"{whole / forward_us:.1%} of the sparse forward"
    )
    by_kind[kind] = {"kept_fraction": float(jnp.mean(mask)), "kernel_us": times, "share_of_forward": whole / forward_us}

  path = args.out or results.results_path("mask")
  results.write_results(
    path,
    {
      "command": "python -m benchmarks.mask",
      "seq_len": args.seq_len,
      "heads": args.heads,
      "head_dim": args.head_dim,
      "topk": args.topk,
      "topp": args.topp,
      "forward_us": forward_us,
      "results": by_kind,
    },
  )
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
