"""Turn the experiments' JSON files into ``docs/RESULTS.md`` tables and figures (numbers only from the files).

    python -m experiments.report [--results docs/results] [--out docs/RESULTS.md] [--figures docs/figures]

Reads whichever of mask_rules.json, finetune.json and concentration.json exist; a missing file gives a
"not run yet" line, never a number. ``--notes`` (a hand-written reading of a run, if the file exists) is
appended as it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from sparge_jax.files import atomic_write
from train import cli


@dataclasses.dataclass(frozen=True)
class Args:
  """The command line of ``experiments.report``."""

  results: str = "docs/results"
  """The folder of the experiments' JSON files."""
  out: str = "docs/RESULTS.md"
  """The report to write."""
  figures: str = "docs/figures"
  """The folder for the figures."""
  notes: str = "experiments/notes.md"
  """A hand-written reading of a run, appended if the file exists."""


METRICS = ("velocity_mse", "psnr", "ssim", "attn_l1", "attn_l1_vs_teacher", "sparsity")


def _load(results: str, name: str):
  path = os.path.join(results, name)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _save(fig, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110)


def _heatmaps(figures: str, name: str, data) -> list[str]:
  """The mask heat-map figure `experiments.mask_rules` writes beside its plot, where that run made one."""
  if not os.path.isfile(os.path.join(figures, name)):
    return []
  return [
    f"Mask heat maps (log10 pooled P̄ of head 0, then each rule's kept blocks, black, at 0.90; from "
    f"`{data['command']}`):",
    "",
    f"![mask heat maps](figures/{name})",
    "",
  ]


def _rules_table(rows: list[dict], label: str) -> list[str]:
  """One line per (label, target, rule): realized sparsity and relative L1, averaged over the rows sharing them
  (the teacher's rows come once per layer)."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r[label], r["target_sparsity"], r["rule"]), []).append(r)
  return [f"| {label} | target sparsity | rule | realized sparsity | relative L1 |", "|---|---|---|---|---|"] + [
    f"| {value} | {target:.2f} | {rule} | {np.mean([r['sparsity'] for r in g]):.3f} | "
    f"{np.mean([r['rel_l1'] for r in g]):.4f} |"
    for (value, target, rule), g in groups.items()
  ]


def mask_rules_section(data, figures: str) -> list[str]:
  lines = ["## 1. Mask rules at equal sparsity (constructed attention)", ""]
  if data is None:
    return lines + ["Not run yet (`python -m experiments.mask_rules`).", ""]
  lines += [
    f"`{data['command']}` on {data.get('device', 'an unrecorded device')}, seq {data['seq_len']}, "
    f"{data['heads']} heads.",
    "",
  ]
  lines += _rules_table(data["rows"], "distribution")
  lines += ["", "![error against sparsity](figures/mask_rules.png)", ""]
  return lines + _heatmaps(figures, "mask_heatmaps.png", data)


def mask_rules_teacher_section(data, figures: str) -> list[str]:
  lines = ["### On the teacher's own attention", ""]
  if data is None:
    return lines + ["Not run yet (`python -m experiments.mask_rules --teacher runs/experiments/teacher`).", ""]
  layers = sorted({r["layer"] for r in data["rows"]})
  lines += [f"`{data['command']}`: held-out videos noised to t, layers {layers}; mean over those layers.", ""]
  lines += _rules_table(data["rows"], "t")
  lines += ["", "![error against sparsity, teacher](figures/mask_rules_teacher.png)", ""]
  return lines + _heatmaps(figures, "mask_heatmaps_teacher.png", data)


def finetune_section(data, figures: str) -> list[str]:
  lines = ["## 2. Fine-tuning at 90% and 95% sparsity", ""]
  if data is None:
    return lines + ["Not run yet (`python -m experiments.finetune`).", ""]
  partial = (
    ""
    if data.get("complete", True)
    else (" **Incomplete**: the time budget cut the plan short; the seeds column says how many ran.")
  )
  lines += [
    f"`{data['command']}` on {data['device']}: {data['steps']} steps per run, up to {data['seeds']} seeds "
    f"(mean ± std over seeds), {data['eval_examples']} held-out x_t, {data['sample_videos']} sampled "
    f"videos with {data['sample_steps']} Euler steps.{partial}",
    "",
    "| condition | target | seeds | " + " | ".join(METRICS) + " |",
    "|---" * (3 + len(METRICS)) + "|",
  ]
  for r in data["summary"]:
    target = "dense" if r["target_sparsity"] is None else f"{r['target_sparsity']:.2f}"
    cells = [f"{r[m + '_mean']:.4g} ± {r[m + '_std']:.2g}" for m in METRICS]
    lines.append(f"| {r['condition']} | {target} | {r['seeds']} | " + " | ".join(cells) + " |")
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(9, 4))
  labels = [f"{r['condition']}\n{r['target_sparsity'] or 'dense'}" for r in data["summary"]]
  ax.bar(
    range(len(labels)),
    [r["velocity_mse_mean"] for r in data["summary"]],
    yerr=[r["velocity_mse_std"] for r in data["summary"]],
  )
  ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("velocity MSE vs teacher")
  fig.tight_layout()
  _save(fig, os.path.join(figures, "finetune_velocity_mse.png"))
  plt.close(fig)
  lines += ["", "![velocity MSE](figures/finetune_velocity_mse.png)", ""]
  if os.path.isfile(os.path.join(figures, "sample_frames.png")):
    lines += [
      "Samples from the same noise and captions (rows: models, seed 0; columns: frames):",
      "",
      "![sample frames side by side](figures/sample_frames.png)",
      "",
    ]
  return lines


def concentration_section(data, figures: str) -> list[str]:
  lines = ["## 3. Attention concentration before and after sparse fine-tuning", ""]
  if data is None:
    return lines + ["Not run yet (`python -m experiments.concentration`).", ""]
  share = data["share_of_mass"]
  lines += [
    f"`{data['command']}` on {data['device']}; times {data['times']}.",
    "",
    f"| model | target sparsity | seed | share of blocks for {share:.0%} of the mass | relative L1 at that sparsity |",
    "|---|---|---|---|---|",
  ]
  for r in data["rows"]:
    target = "-" if r["target_sparsity"] is None else f"{r['target_sparsity']:.2f}"
    lines.append(
      f"| {r['model']} | {target} | {r['seed'] if r['seed'] is not None else '-'} | "
      f"{r['blocks_needed']:.4f} | {r['rel_l1']:.4f} |"
    )
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  shown = [data["rows"][0]] + data["rows"][-1:] if len(data["rows"]) > 1 else data["rows"][:1]
  fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
  for ax, r in zip(axes[0], shown):
    ax.imshow(np.log10(np.asarray(r["mass_map"]) + 1e-6), aspect="auto", cmap="magma")
    ax.set_title(f"{r['model']} {r['target_sparsity'] or ''}: log10 block mass (layer 0, head 0)")
    ax.set_xlabel("kv block")
    ax.set_ylabel("query block")
  fig.tight_layout()
  _save(fig, os.path.join(figures, "attention_mass.png"))
  plt.close(fig)
  return lines + ["", "![block attention mass](figures/attention_mass.png)", ""]


def run_times_section(data) -> list[str]:
  if data is None:
    return []
  lines = [
    f"Device: {data['device']}. Wall time per command (compilation included):",
    "",
    "| command | seconds |",
    "|---|---|",
  ]
  lines += [f"| `{r['command']}` | {r['seconds']:.0f} |" for r in data["stages"]]
  return lines + [""]


def main(argv: list[str] | None = None) -> int:
  flags, code = cli.parse(Args, argv, prog="experiments.report", description=__doc__)
  if code is not None:
    return code
  results, figures = flags.results, flags.figures
  lines = [
    "# Results: sparse attention on a small Wan-style teacher",
    "",
    "Generated by `python -m experiments.report` from the JSON files in `docs/results/`; "
    "commands in `experiments/README.md`.",
    "",
  ]
  lines += run_times_section(_load(results, "run_times.json"))
  lines += mask_rules_section(_load(results, "mask_rules.json"), figures)
  lines += mask_rules_teacher_section(_load(results, "mask_rules_teacher.json"), figures)
  lines += finetune_section(_load(results, "finetune.json"), figures)
  lines += concentration_section(_load(results, "concentration.json"), figures)
  if flags.notes and os.path.isfile(flags.notes):
    with open(flags.notes) as f:
      lines += ["", f.read()]
  os.makedirs(os.path.dirname(flags.out) or ".", exist_ok=True)
  with atomic_write(flags.out, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  print(f"wrote {flags.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
