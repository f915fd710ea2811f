"""Speedup over cuDNN against sparsity, forward and forward+backward, with the ideal 1/(1 − s) line.

    python -m benchmarks.plot benchmarks/results/nvidia-h100-80gb-hbm3.json [more results files] --out docs/speedup.png

Reads the records written by `python -m benchmarks.attention` and plots one line per (backend, shape,
results file) for the 128-dim Wan2.1-1.3B shape family; other shapes appear as single points.
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("results", nargs="+", help="results files of benchmarks.attention")
  parser.add_argument("--out", default="docs/speedup.png")
  args = parser.parse_args(argv)
  runs = []
  for path in args.results:
    if not os.path.isfile(path):
      parser.error(f"results file not found: {path}")
    with open(path) as f:
      runs.append((os.path.basename(path), json.load(f)))

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, key, title in zip(axes, ("fwd_speedup", "fwd_bwd_speedup"), ("forward", "forward + backward")):
    ideal_s = [i / 100 for i in range(0, 97)]
    ax.plot(ideal_s, [1 / (1 - s) for s in ideal_s], "k--", lw=1, label="ideal 1/(1−s)")
    for name, payload in runs:
      groups = {}
      for r in payload["records"]:
        groups.setdefault((r["backend"], r["seq_len"], r["heads"], r["head_dim"]), []).append(r)
      for (backend, seq_len, heads, head_dim), records in sorted(groups.items()):
        records.sort(key=lambda r: r["sparsity"])
        label = f"{backend} {seq_len}×{heads}×{head_dim} ({name})"
        style = "o:" if len(records) > 1 else "s"  # dotted: only the markers are measurements
        ax.plot([r["sparsity"] for r in records], [r[key] for r in records], style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("block sparsity (fraction of tiles skipped)")
    ax.set_title(f"{title}: speedup over cuDNN dense")
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel("speedup (x)")
  axes[1].legend(fontsize=6, loc="upper left")
  device = runs[0][1].get("device", "")
  fig.suptitle(f"{device}, jax {runs[0][1].get('jax_version', '')}, bf16, batch 1")
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  tmp = args.out + ".tmp.png"
  fig.savefig(tmp, dpi=130)
  os.replace(tmp, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
