"""Mask rules at equal sparsity (the paper's Table 1): Top-k, Top-p and their union.

    python -m experiments.mask_rules                     # constructed near-uniform and skewed attention
    python -m experiments.mask_rules --sparsity 0.8 0.9 0.95 --seq-len 10240
    python -m experiments.mask_rules --teacher runs/experiments/teacher   # the teacher's own attention

For each attention distribution and target sparsity, every rule's parameter is tuned (bisection on the
mean realized sparsity) so the three rules skip the same share of blocks (Top-k keeps ⌈(1 − s)·n_kv⌉ whole
blocks per row, so Top-p and the hybrid are tuned to the sparsity Top-k actually reaches); then the relative L1 error of the
attention output, Σ|o − o_ref| / Σ|o_ref| in float32, is measured against dense attention. Writes
`docs/results/mask_rules.json`, a plot `docs/figures/mask_rules.png` and mask heat maps (pooled P̄ and each
rule's kept blocks at 0.90) `docs/figures/mask_heatmaps.png` beside it.

Distributions (q, k, v: [1, seq, heads, 64]):
- near-uniform: logits scaled down by a factor in (0.05, 0.5) varying slowly along the queries, so rows of
  P̄ are flat to different degrees (a fixed Top-k misses mass in the flattest rows);
- skewed: an attention sink (the first kv block's keys aligned with a direction every query shares to a
  different degree), so in many rows one block eats most of the mass (Top-p alone spends its budget there).
Both share local structure (neighbouring tokens share a slowly varying component) and smooth values.

With `--teacher WORKDIR` (a workdir of `experiments.train_teacher`) the q, k, v are instead the trained
teacher's self-attention inputs on held-out videos noised to several t, at its first, middle and last layers
(rows carry `t` and `layer`); writes `docs/results/mask_rules_teacher.json` and its figure.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.results import write_results
from pallas_kernels.block_sparse_attention.reference import masked_attention_reference
from sparge_jax import attention
from sparge_jax.files import atomic_write
from sparge_jax.mask import pooled_block_probs_reference

RULES = ("topk", "topp", "hybrid")
HEAD_DIM = 64
LOCAL_WINDOW = 256


def local(key, shape):
  """Unit-variance noise averaged over LOCAL_WINDOW neighbouring tokens along axis 1."""
  noise = jax.random.normal(key, (shape[0], shape[1] + LOCAL_WINDOW, *shape[2:]))
  total = jnp.cumsum(noise, axis=1)
  return (total[:, LOCAL_WINDOW:] - total[:, :-LOCAL_WINDOW]) / LOCAL_WINDOW**0.5


def constructed_qkv(kind: str, *, seq_len: int, heads: int, seed: int = 0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  shape = (1, seq_len, heads, HEAD_DIM)
  q, k, v = (jax.random.normal(key, shape) for key in keys[:3])
  # Local structure, as in video tokens: a component shared by neighbouring tokens (a moving average of
  # noise over LOCAL_WINDOW tokens, unit variance everywhere, so no part of the sequence dominates). Values
  # vary smoothly too and carry a per-channel mean, as real value projections do, so the exact output is
  # far from zero and relative errors mean something.
  channel_mean = jax.random.normal(keys[7], (1, 1, heads, HEAD_DIM))
  q, k = q + local(keys[3], shape), k + local(keys[3], shape)
  v = channel_mean + 0.5 * v + local(keys[4], shape)
  if kind == "near-uniform":
    # Flat rows of varying flatness: logits scaled by a factor in (0.05, 0.5) that varies slowly along the
    # queries (over a few query blocks, so the pooled rows differ too, not only single tokens).
    temperature = 0.05 + 0.45 * jax.nn.sigmoid(2.0 * local(keys[5], (1, seq_len, heads, 1)))
    return q * temperature, k * 0.5, v
  if kind == "skewed":
    # Sink: queries share a direction (with a strength in (0, 3) that varies slowly along the queries) and
    # the first 64 keys point along it, so the first kv block takes from little to most of a row's mass.
    direction = jax.random.normal(keys[5], (1, 1, heads, HEAD_DIM))
    direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
    strength = 3.0 * jax.nn.sigmoid(2.0 * local(keys[6], (1, seq_len, heads, 1)))
    return q + strength * direction, k.at[:, :64].add(24.0 * direction), v
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


def constructed_sources(*, seq_len: int, heads: int, seed: int):
  """Yields (row labels, q, k, v) of the two constructed distributions."""
  for kind in ("near-uniform", "skewed"):
    yield {"distribution": kind}, *constructed_qkv(kind, seq_len=seq_len, heads=heads, seed=seed)


def teacher_sources(workdir: str, *, times=(0.1, 0.5, 0.9), num_videos: int = 2):
  """Yields (row labels, q, k, v) of the teacher's self-attention (float32 [videos, seq, heads, head_dim])
  at its first, middle and last layers, on held-out videos noised to each t."""
  from experiments import evaluation  # noqa: PLC0415 (needs flax; the constructed case does not)
  from sparge_jax.models.wan import AttentionConfig  # noqa: PLC0415
  from train.configs import Config, from_dict  # noqa: PLC0415

  with open(os.path.join(workdir, "config.json")) as f:
    config = from_dict(Config, json.load(f))
  _, graphdef, params = evaluation.load_model(config, workdir, AttentionConfig(kind="dense"))
  data = evaluation.held_out(config, num_videos)
  last = config.model.num_layers - 1
  for t in times:
    x_t = (1 - t) * data["x0"] + t * data["noise"]
    _, _, (q, k, v) = evaluation.forward(
      graphdef, params, x_t, np.full(num_videos, t, np.float32), data["context"], lambda q, k, v: (q, k, v)
    )
    for layer in sorted({0, last // 2, last}):
      yield (
        {"distribution": "teacher", "t": t, "layer": layer},
        *(jnp.asarray(a[layer], jnp.float32) for a in (q, k, v)),
      )


def run(sources, *, sparsities, block_q: int, block_kv: int, heatmap_target: float = 0.9):
  """Returns (rows, heatmaps): one row per (source, target, rule); for the target nearest ``heatmap_target``,
  per source the pooled P̄ and every rule's mask of its first example and head (for `plot_masks`)."""
  rows, heatmaps = [], []
  shown_target = min(sparsities, key=lambda s: abs(s - heatmap_target))
  for labels, q, k, v in sources:
    batch, seq_len, heads = q.shape[:3]
    full = jnp.ones((batch, heads, -(-seq_len // block_q), -(-seq_len // block_kv)), bool)
    dense = masked_attention_reference(q, k, v, full, block_q=block_q, block_kv=block_kv)
    probs = pooled_block_probs_reference(q, k, block_q=block_q, block_kv=block_kv, scale=q.shape[-1] ** -0.5)
    heatmap = {"labels": labels, "target": shown_target, "probs": np.asarray(probs[0, 0]), "masks": {}}
    heatmaps.append(heatmap)
    for target in sparsities:
      matched = target
      for rule in RULES:  # Top-k first: the others are tuned to the sparsity it actually reaches
        params, mask = tune(rule, q, k, matched, block_q=block_q, block_kv=block_kv)
        if rule == "topk":
          matched = realized_sparsity(mask)
        out = attention.block_sparse_attention(q, k, v, mask, block_q=block_q, block_kv=block_kv, backend="xla")
        rows.append(
          dict(
            **labels,
            target_sparsity=target,
            rule=rule,
            **params,
            sparsity=realized_sparsity(mask),
            rel_l1=relative_l1(out, dense),
          )
        )
        if target == shown_target:
          heatmap["masks"][rule] = (np.asarray(mask[0, 0]), rows[-1]["sparsity"])
        print(
          f"{labels} s={target:.2f} {rule:>6}: sparsity {rows[-1]['sparsity']:.3f} "
          f"L1 {rows[-1]['rel_l1']:.4f}  {params}",
          flush=True,
        )
  return rows, heatmaps


def _save(fig, path):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)


def plot_masks(heatmaps, path, *, max_rows: int = 3):
  """Mask heat maps: per source (row), log10 P̄ of the first head, then each rule's kept blocks at the
  shown target (teacher sources: the middle layer only)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers = sorted({h["labels"]["layer"] for h in heatmaps if "layer" in h["labels"]})
  middle = layers[len(layers) // 2] if layers else None  # constructed sources have no layer
  shown = [h for h in heatmaps if h["labels"].get("layer") == middle][:max_rows]
  fig, axes = plt.subplots(
    len(shown), 1 + len(RULES), figsize=(3.2 * (1 + len(RULES)), 2.6 * len(shown)), squeeze=False
  )
  for row, h in zip(axes, shown):
    name = ", ".join(f"{k} {v}" for k, v in h["labels"].items())
    row[0].imshow(np.log10(h["probs"] + 1e-9), aspect="auto", cmap="magma", interpolation="nearest")
    row[0].set_title(f"{name}\nlog10 pooled P̄ (head 0)", fontsize=7)
    for ax, rule in zip(row[1:], RULES):
      mask, sparsity = h["masks"][rule]
      ax.imshow(mask, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
      ax.set_title(
        f"{rule} at {h['target']:.2f}: head 0 keeps {mask.mean():.1%}\n(all heads: sparsity {sparsity:.3f})", fontsize=7
      )
    for ax in row:
      ax.set_xlabel("kv block", fontsize=7)
      ax.set_ylabel("query block", fontsize=7)
      ax.tick_params(labelsize=6)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def plot(rows, path):
  """One panel per distribution (teacher rows: one per t, averaged over layers at each target)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = sorted({(r["distribution"], r.get("t")) for r in rows}, key=lambda p: (p[0], p[1] or 0))
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=False, squeeze=False)
  for ax, (kind, t) in zip(axes[0], panels):
    for rule in RULES:
      mine = [r for r in rows if r["distribution"] == kind and r.get("t") == t and r["rule"] == rule]
      targets = sorted({r["target_sparsity"] for r in mine})
      pts = [
        (
          np.mean([r["sparsity"] for r in mine if r["target_sparsity"] == s]),
          np.mean([r["rel_l1"] for r in mine if r["target_sparsity"] == s]),
        )
        for s in targets
      ]
      ax.plot(*zip(*pts), marker="o", label=rule)
    ax.set_title(f"{kind} attention" + ("" if t is None else f", t = {t} (mean over layers)"))
    ax.set_xlabel("realized block sparsity")
    ax.set_ylabel("relative L1 error of output")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--seq-len", type=int, default=5120, help="5,120 = 80 kv blocks: Top-k counts are exact at 0.8, 0.9, 0.95"
  )
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9, 0.95])
  parser.add_argument("--block-q", type=int, default=128)
  parser.add_argument("--block-kv", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--teacher", default=None, help="a teacher workdir: measure on its attention instead")
  parser.add_argument("--times", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="with --teacher: noise levels t")
  parser.add_argument("--out", default=None, help="default docs/results/mask_rules[_teacher].json")
  parser.add_argument("--figure", default=None, help="default docs/figures/mask_rules[_teacher].png")
  args = parser.parse_args(argv)
  if args.seq_len < args.block_kv or args.heads < 1:
    parser.error("--seq-len must be at least one kv block and --heads >= 1")
  if not all(0 < s < 1 for s in args.sparsity):
    parser.error("--sparsity values must lie in (0, 1)")
  if args.teacher is not None and not os.path.isfile(os.path.join(args.teacher, "config.json")):
    parser.error(f"--teacher {args.teacher!r}: no teacher workdir (config.json missing)")
  if not all(0 < t < 1 for t in args.times):
    parser.error("--times values must lie in (0, 1)")
  suffix = "" if args.teacher is None else "_teacher"
  args.out = args.out or f"docs/results/mask_rules{suffix}.json"
  args.figure = args.figure or f"docs/figures/mask_rules{suffix}.png"
  if args.teacher is None:
    sources = constructed_sources(seq_len=args.seq_len, heads=args.heads, seed=args.seed)
    setup = {
      "command": "python -m experiments.mask_rules",
      "seq_len": args.seq_len,
      "heads": args.heads,
      "head_dim": HEAD_DIM,
    }
  else:
    sources = teacher_sources(args.teacher, times=tuple(args.times))
    setup = {"command": f"python -m experiments.mask_rules --teacher {args.teacher}", "times": args.times}
  rows, heatmaps = run(sources, sparsities=args.sparsity, block_q=args.block_q, block_kv=args.block_kv)
  write_results(args.out, {**setup, "rows": rows})
  plot(rows, args.figure)
  masks_figure = os.path.join(os.path.dirname(args.figure), f"mask_heatmaps{suffix}.png")
  plot_masks(heatmaps, masks_figure)
  print(f"wrote {args.out}, {args.figure} and {masks_figure}")


if __name__ == "__main__":
  main()
