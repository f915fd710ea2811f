"""Attention concentration before and after sparse fine-tuning (the paper's Table 2).

    python -m experiments.concentration            # after experiments.finetune

For the teacher and every distill-hybrid student of ``experiments.finetune``: on the held-out videos at
several times t, per layer, head and query-block row, the share of kv blocks needed to hold 60% of the
attention mass (largest blocks first), and the relative L1 error of block-sparse attention keeping exactly
those blocks (``experiments.evaluation.concentration_probe``). Also keeps one block-mass map (layer 0,
head 0, video 0, the middle t) per model for the heat-map figure. Writes ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np

from experiments import evaluation
from sparge_jax.models.wan import AttentionConfig
from train import cli
from train.configs import Config, from_dict


@dataclasses.dataclass(frozen=True)
class Args:
  """The command line of ``experiments.concentration``."""

  teacher: str = "runs/experiments/teacher"
  """The teacher's workdir (``experiments.train_teacher``)."""
  finetune: str = "runs/experiments/finetune"
  """The fine-tuning workdir (``experiments.finetune``); its distill-hybrid students are measured."""
  eval_examples: int = 4
  """Held-out videos."""
  times: str = "0.1,0.3,0.5,0.7,0.9"
  """Comma-separated noise levels t in (0, 1)."""
  share: float = 0.6
  """Share of the attention mass the blocks must hold."""
  block_q: int = 128
  """Query tile size."""
  block_kv: int = 64
  """Key/value tile size."""
  out: str = "docs/results/concentration.json"
  """The results file."""


def measure(config: Config, workdir: str, data: dict, times, share: float, block_q: int, block_kv: int) -> dict:
  model_config, graphdef, params = evaluation.load_model(config, workdir, AttentionConfig(kind="dense"))
  probe = evaluation.concentration_probe(share, block_q=block_q, block_kv=block_kv)
  per_t = []
  for t in times:
    t_batch = np.full(len(data["x0"]), t, np.float32)
    x_t = (1 - t) * data["x0"] + t * data["noise"]
    _, _, (needed, diff, norm) = evaluation.forward(graphdef, params, x_t, t_batch, data["context"], probe)
    per_t.append(
      {
        "t": t,
        "blocks_needed": float(np.mean(needed)),
        "rel_l1": float(np.sum(diff) / np.sum(norm)),
        "blocks_needed_per_layer": np.asarray(needed).mean(axis=(1, 2)).tolist(),
      }
    )
  mid = times[len(times) // 2]
  x_t = (1 - mid) * data["x0"][:1] + mid * data["noise"][:1]
  _, _, mass = evaluation.forward(
    graphdef,
    params,
    x_t,
    np.full(1, mid, np.float32),
    data["context"][:1],
    lambda q, k, v: evaluation.block_mass(q[:, :, :1], k[:, :, :1], block_q=block_q, block_kv=block_kv),
  )
  return {
    "per_t": per_t,
    "blocks_needed": float(np.mean([r["blocks_needed"] for r in per_t])),
    "rel_l1": float(np.mean([r["rel_l1"] for r in per_t])),
    "mass_map": np.asarray(mass)[0, 0, 0].tolist(),
  }


def _times(flags) -> list[float]:
  return [float(t) for t in flags.times.split(",") if t.strip()]


def _check(flags: Args) -> None:
  times = _times(flags)
  if not times or not all(0 < t < 1 for t in times):
    raise ValueError(f"--times must be comma-separated values in (0, 1), got {flags.times!r}")
  if not 0 < flags.share < 1:
    raise ValueError(f"--share must be in (0, 1), got {flags.share}")
  if not os.path.isfile(os.path.join(flags.teacher, "config.json")):
    raise ValueError(f"--teacher {flags.teacher!r}: no teacher workdir")


def main(argv: list[str] | None = None) -> int:
  flags, code = cli.parse(Args, argv, prog="experiments.concentration", description=__doc__, check=_check)
  if code is not None:
    return code
  times = _times(flags)
  with open(os.path.join(flags.teacher, "config.json")) as f:
    base = from_dict(Config, json.load(f))
  data = evaluation.held_out(base, flags.eval_examples)
  args = (data, times, flags.share, flags.block_q, flags.block_kv)
  rows = [{"model": "teacher", "target_sparsity": None, "seed": None, **measure(base, flags.teacher, *args)}]
  finetuned = (
    sorted(
      d
      for d in os.listdir(flags.finetune)
      if d.startswith("distill-hybrid-") and os.path.isfile(os.path.join(flags.finetune, d, "eval.json"))
    )
    if os.path.isdir(flags.finetune)
    else []
  )
  for name in finetuned:
    with open(os.path.join(flags.finetune, name, "eval.json")) as f:
      run = json.load(f)
    rows.append(
      {
        "model": "distill-hybrid",
        "target_sparsity": run["target_sparsity"],
        "seed": run["seed"],
        **measure(base, os.path.join(flags.finetune, name), *args),
      }
    )
    print(
      f"{name}: blocks for {flags.share:.0%} of the mass {rows[-1]['blocks_needed']:.3f}, L1 {rows[-1]['rel_l1']:.4f}",
      flush=True,
    )
  evaluation.write_json(
    flags.out,
    {
      "command": "python -m experiments.concentration",
      "device": jax.devices()[0].device_kind,
      "share_of_mass": flags.share,
      "times": times,
      "rows": rows,
    },
  )
  print(
    f"teacher: blocks for {flags.share:.0%} of the mass {rows[0]['blocks_needed']:.3f}, "
    f"L1 {rows[0]['rel_l1']:.4f}; wrote {flags.out}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
