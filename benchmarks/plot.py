"""Figures from results files: speedup against sparsity, and the mask's stages.

    python -m benchmarks.plot benchmarks/results/attention-nvidia-h200.json [more results files] --out docs/speedup.png
    python -m benchmarks.plot benchmarks/results/mask-nvidia-h100-80gb-hbm3.json --out docs/mask.png

From `python -m benchmarks.attention` records: speedup over cuDNN, forward and forward+backward, with the
ideal 1/(1 − s) line, one line per (backend, case, results file) where a case has several sparsities; other
cases appear as single points; FlexAttention's rows (`benchmarks.flex_attention`), over torch's cuDNN, too.
From one `python -m benchmarks.mask` file: each input kind's stages as stacked bars, against the read floor
and 15% of the sparse forward.
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

  if runs[0][1].get("command") == "python -m benchmarks.mask":
    if len(runs) > 1:
      parser.error("give one benchmarks.mask results file at a time")
    fig = _mask_figure(plt, runs[0][1])
  else:
    fig = _speedup_figure(plt, runs)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  tmp = args.out + ".tmp.png"
  fig.savefig(tmp, dpi=130)
  os.replace(tmp, args.out)
  print(f"wrote {args.out}")


_MASK_STAGES = ("pooling", "pooled logits", "selection", "forward table", "dK/dV table")


def _mask_figure(plt, payload):
  kinds = list(payload["results"])
  fig, ax = plt.subplots(figsize=(12, 1.4 + 0.8 * len(kinds)))
  for row, kind in enumerate(kinds):
    times = payload["results"][kind]["kernel_us"]
    left = 0.0
    for i, stage in enumerate(_MASK_STAGES):
      ax.barh(row, times[stage], left=left, color=f"C{i}", label=stage if row == 0 else None)
      left += times[stage]
    whole = times["mask + both tables"]
    ax.text(
      left + 1,
      row,
      f"{whole:.1f} µs in one call ({payload['results'][kind]['kept_fraction']:.1%} kept)",
      va="center",
      fontsize=8,
    )
  floor = min(payload["results"][k]["kernel_us"]["read floor (XLA sum of Q and K)"] for k in kinds)
  goal = 0.15 * payload["forward_us"]
  ax.axvline(floor, color="k", ls=":", lw=1, label=f"read floor: XLA sums Q and K ({floor:.1f} µs)")
  ax.axvline(goal, color="r", ls="--", lw=1, label=f"15% of the 0.95 sparse forward ({goal:.1f} µs)")
  ax.set_yticks(range(len(kinds)), [f"{k} inputs" for k in kinds])
  ax.set_xlim(0, 1.35 * max(payload["results"][k]["kernel_us"]["mask + both tables"] for k in kinds))
  ax.set_xlabel("kernel time, µs (stages timed one by one)")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  ax.set_title(
    f"block mask + both index tables, {payload['seq_len']:,} tokens × {payload['heads']} heads × "
    f"{payload['head_dim']}: {payload.get('device', '')}",
    fontsize=9,
  )
  fig.tight_layout()
  return fig


def _speedup_figure(plt, runs):
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, key, title in zip(axes, ("fwd_speedup", "fwd_bwd_speedup"), ("forward", "forward + backward")):
    ideal_s = [i / 100 for i in range(0, 97)]
    ax.plot(ideal_s, [1 / (1 - s) for s in ideal_s], "k--", lw=1, label="ideal 1/(1−s)")
    for name, payload in runs:
      groups = {}
      flex = [dict(r, backend="FlexAttention") for r in payload.get("flex_attention", {}).get("records", [])]
      for r in payload["records"] + flex:
        # Older files have no "case": one kv head per query head, not causal.
        case = r.get("case", f"{r['seq_len']}x{r['heads']}x{r['head_dim']}")
        groups.setdefault((r["backend"], case), []).append(r)
      for (backend, case), records in sorted(groups.items()):
        records.sort(key=lambda r: r["sparsity"])
        label = f"{backend} {case} ({name})"
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
  return fig


if __name__ == "__main__":
  main()
