"""Train the experiments' dense teacher (``experiments.configs.teacher``) in resumable pieces.

    python -m experiments.train_teacher --minutes 10          # repeat until it prints "teacher done"
    python -m experiments.train_teacher --minutes 1 --config.steps=4 --config.model.num_layers=1 ...  # tiny

Each call writes the datasets if missing, trains as many steps as fit in ``--minutes`` (from the step time
the previous piece measured, else the estimate in ``experiments.configs``), checkpoints and stops; the next
call resumes from the workdir (``train.distill.run``). When all steps are done it writes
``<workdir>/samples.gif`` (columns: a training video | the teacher's sample for its caption from noise |
their difference, which is not expected to be small) and ``<workdir>/teacher_done.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

from experiments import configs, evaluation
from sparge_jax.models.wan import AttentionConfig
from train import checkpoint, cli, distill
from train.configs import Config, validate
from train.sample import write_gif


@dataclasses.dataclass(frozen=True)
class Args:
  """The command line of ``experiments.train_teacher``."""

  config: Config
  workdir: str = "runs/experiments/teacher"
  """The teacher's workdir."""
  data_dir: str = configs.DATA_DIR
  """Where the experiments' datasets are written (if missing) and read."""
  minutes: float = 10.0
  """Time for this call; the next call resumes."""
  num_examples: int = 2048
  """Videos per dataset."""
  num_videos: int = 4
  """Videos sampled at the end."""
  num_steps: int = 30
  """Euler steps per sample."""


# Start-up, compilation and evaluation of a piece, kept out of the step budget.
OVERHEAD_S = 90.0


def measured_step_seconds(workdir: str) -> float | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    times = [r["step_time_s"] for r in map(json.loads, f) if "step_time_s" in r]
  return float(np.median(times)) if times else None


def steps_this_piece(config, workdir: str, done: int, minutes: float) -> int:
  step_s = measured_step_seconds(workdir) or configs.estimate_step_seconds(config, teacher_forward=False)
  return min(config.steps, done + max(1, int((60 * minutes - OVERHEAD_S) / step_s)))


def write_samples(config, workdir: str, num_videos: int, num_steps: int) -> dict:
  model_config, graphdef, params = evaluation.load_model(config, workdir, AttentionConfig(kind="dense"))
  data = evaluation.held_out(config, num_videos)
  videos = evaluation.sample(graphdef, params, data["noise"], data["context"], num_steps=num_steps)
  write_gif(os.path.join(workdir, "samples.gif"), data["x0"], videos, scale=8)
  return {"samples": os.path.join(workdir, "samples.gif"), "num_videos": num_videos, "num_steps": num_steps}


def _check(flags: Args) -> Args:
  """Validates the flags; returns them with the config reading the teacher's data directory."""
  if flags.minutes <= 0:
    raise ValueError(f"--minutes must be > 0, got {flags.minutes}")
  if flags.num_examples < 1 or flags.num_videos < 1 or flags.num_steps < 1:
    raise ValueError("--num_examples, --num_videos and --num_steps must be >= 1")
  data_path = os.path.join(flags.data_dir, configs.TEACHER_DATA)
  config = dataclasses.replace(flags.config, data=dataclasses.replace(flags.config.data, path=data_path))
  validate(config)
  return dataclasses.replace(flags, config=config)


def main(argv: list[str] | None = None) -> int:
  flags, code = cli.parse(
    Args,
    argv,
    prog="experiments.train_teacher",
    description=__doc__,
    presets={"teacher": configs.teacher},
    default="teacher",
    check=_check,
  )
  if code is not None:
    return code
  config = flags.config
  start = time.time()
  workdir = flags.workdir
  configs.write_datasets(config, flags.num_examples, flags.data_dir)
  existing = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  done = existing.latest_step() or 0
  existing.close()
  if done < config.steps:
    target = steps_this_piece(config, workdir, done, flags.minutes)
    summary = distill.run(dataclasses.replace(config, steps=target), workdir)
    distill.print_summary(summary)
    done = target
  if done < config.steps:
    print(f"teacher at step {done} of {config.steps} after {time.time() - start:.0f} s; run again to continue")
    return 0
  result = write_samples(config, workdir, flags.num_videos, flags.num_steps)
  evaluation.write_json(
    os.path.join(workdir, "teacher_done.json"),
    {"steps": config.steps, "step_time_s": measured_step_seconds(workdir), **result},
  )
  print(f"teacher done ({config.steps} steps); wrote {result['samples']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
