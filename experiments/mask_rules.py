"""Mask rules at equal sparsity (the paper's Table 1): Top-k, Top-p and their union.

    python -m experiments.mask_rules                     # constructed near-uniform and skewed attention
    python -m experiments.mask_rules --sparsity 0.8 0.9 0.95 --seq-len 10240

For each attention distribution and target sparsity, every rule's parameter is tuned (bisection on the
mean realized sparsity) so the three rules skip the same share of blocks; then the relative L1 error of the
attention output, Σ|o − o_ref| / Σ|o_ref| in float32, is measured against dense attention. Writes
`docs/results/mask_rules.json` and a plot `docs/figures/mask_rules.png`.

Distributions (q, k, v: [1, seq, heads, 64]):
- near-uniform: logits scaled down by a per-query factor in [0.05, 0.5], so rows of P̄ are flat to
  different degrees (a fixed Top-k misses mass in the flattest rows);
- skewed: an attention sink (the first kv block's keys aligned with every query), so one block eats most of
  the mass (Top-p alone spends its budget there).
Both share local structure (neighbouring tokens share a slowly varying component) and smooth values.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import write_results
from sparge_jax import attention
from sparge_jax.reference import masked_attention_reference

RULES = ("topk", "topp", "hybrid")
HEAD_DIM = 64


def constructed_qkv(kind: str, *, seq_len: int, heads: int, seed: int = 0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  shape = (1, seq_len, heads, HEAD_DIM)
  q, k, v = (jax.random.normal(key, shape) for key in keys[:3])
  # Local structure, as in video tokens: a slowly varying component shared along the sequence. Values
  # vary smoothly too, so the exact output is far from zero and relative errors mean something.
  walk = lambda key: jnp.cumsum(jax.random.normal(key, shape) * 0.25, axis=1) / seq_len ** 0.25
  q, k, v = q + walk(keys[3]), k + walk(keys[3]), 0.5 * v + walk(keys[4])
  if kind == "near-uniform":
    # Flat rows of varying flatness: each query's logits are scaled by a factor in [0.05, 0.5].
    temperature = 0.05 + 0.45 * jax.random.uniform(keys[5], (1, seq_len, heads, 1))
    return q * temperature, k * 0.5, v
  if kind == "skewed":
    # Sink: the first 64 keys point along the mean query direction.
    direction = jnp.mean(q, axis=1, keepdims=True)
    direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
    return q, k.at[:, :64].add(6.0 * direction), v
  raise ValueError(f"kind must be 'near-uniform' or 'skewed', got {kind!r}")


def realized_sparsity(mask) -> float:
  return 1.0 - float(jnp.mean(mask))


def tune(rule: str, q, k, target: float, *, block_q: int, block_kv: int):
  """The rule's parameter(s) whose mean realized sparsity is closest to `target`.

  Top-k: topk = 1 − target (exact up to rounding). Top-p: bisection on p. Hybrid: topk at half the block
  budget, bisection on p for the rest (the paper pairs a small k with a moderate p).
  """
  def mask_for(topk, topp, mode):
    return attention.block_mask(q, k, topk=topk, topp=topp, mode=mode, block_q=block_q, block_kv=block_kv)

  if rule == "topk":
    return dict(topk=1.0 - target, topp=0.0), mask_for(1.0 - target, 0.0, "topk")
  topk = (1.0 - target) / 2 if rule == "hybrid" else 0.0
  low, high = 0.0, 1.0  # sparsity falls as p grows
  best = None
  for _ in range(30):
    p = (low + high) / 2
    mask = mask_for(topk, p, rule)
    s = realized_sparsity(mask)
    if best is None or abs(s - target) < abs(best[2] - target):
      best = (p, mask, s)
    if s > target:
      low = p
    else:
      high = p
  return dict(topk=topk, topp=best[0]), best[1]


def relative_l1(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(out - ref).sum() / np.abs(ref).sum())


def run(*, seq_len: int, heads: int, sparsities, block_q: int, block_kv: int, seed: int):
  rows = []
  for kind in ("near-uniform", "skewed"):
    q, k, v = constructed_qkv(kind, seq_len=seq_len, heads=heads, seed=seed)
    dense = masked_attention_reference(q, k, v, jnp.ones((1, heads, -(-seq_len // block_q), -(-seq_len // block_kv)), bool),
                                       block_q=block_q, block_kv=block_kv)
    for target in sparsities:
      for rule in RULES:
        params, mask = tune(rule, q, k, target, block_q=block_q, block_kv=block_kv)
        out = attention.block_sparse_attention(q, k, v, mask, block_q=block_q, block_kv=block_kv, backend="xla")
        rows.append(dict(distribution=kind, target_sparsity=target, rule=rule, **params,
                         sparsity=realized_sparsity(mask), rel_l1=relative_l1(out, dense)))
        print(f"{kind:>12} s={target:.2f} {rule:>6}: sparsity {rows[-1]['sparsity']:.3f} "
              f"L1 {rows[-1]['rel_l1']:.4f}  {params}", flush=True)
  return rows


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
  for ax, kind in zip(axes, ("near-uniform", "skewed")):
    for rule in RULES:
      pts = sorted((r["sparsity"], r["rel_l1"]) for r in rows if r["distribution"] == kind and r["rule"] == rule)
      ax.plot(*zip(*pts), marker="o", label=rule)
    ax.set_title(f"{kind} attention")
    ax.set_xlabel("realized block sparsity")
    ax.set_ylabel("relative L1 error of output")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  os.replace(tmp, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seq-len", type=int, default=5120, help="5,120 = 80 kv blocks: Top-k counts are exact at 0.8, 0.9, 0.95")
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9, 0.95])
  parser.add_argument("--block-q", type=int, default=128)
  parser.add_argument("--block-kv", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="docs/results/mask_rules.json")
  parser.add_argument("--figure", default="docs/figures/mask_rules.png")
  args = parser.parse_args(argv)
  if args.seq_len < args.block_kv or args.heads < 1:
    parser.error("--seq-len must be at least one kv block and --heads >= 1")
  if not all(0 < s < 1 for s in args.sparsity):
    parser.error("--sparsity values must lie in (0, 1)")
  rows = run(seq_len=args.seq_len, heads=args.heads, sparsities=args.sparsity, block_q=args.block_q,
             block_kv=args.block_kv, seed=args.seed)
  write_results(args.out, {"command": "python -m experiments.mask_rules", "seq_len": args.seq_len,
                           "heads": args.heads, "head_dim": HEAD_DIM, "rows": rows})
  plot(rows, args.figure)
  print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
  main()
