"""Every quality experiment in order, inside one time budget.

    python -m experiments.run_all --minutes 25
    python -m experiments.run_all --minutes 20 --gpus 2      # fine-tuning grid split over 2 GPUs

Stages, each the documented command run as a subprocess (so each is exactly what `experiments/README.md`
lists): constructed mask rules; the teacher (a short first piece that measures the step time, then as
many steps as the teacher's share of the budget allows, then its samples at whatever step it reached);
mask rules on the teacher's attention; the fine-tuning grid (seed-major, cut where the budget ends; with
``--gpus N``, N processes each on its own GPU run every N-th run, then one pass collects them);
concentration; the report. Wall times per command go to `docs/results/run_times.json` and the report.
Re-running resumes: every stage skips what is already on disk.

Outputs are written under `runs/experiments/docs/` (git-ignored) and copied into `docs/` when all stages are
done: a remote runner that re-syncs the working tree between calls deletes untracked files it did not send,
and a run may span several calls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

from experiments import configs, evaluation
from train import cli


@dataclasses.dataclass(frozen=True)
class Args:
  """The command line of ``experiments.run_all``."""

  minutes: float = 25.0
  """The whole budget."""
  teacher_share: float = 0.4
  """Share of the budget for training the teacher."""
  teacher: str = "runs/experiments/teacher"
  """The teacher's workdir."""
  finetune_steps: int = 200
  """Steps per fine-tuning run."""
  seeds: int = 3
  """Seeds per fine-tuning condition."""
  staging: str = "runs/experiments/docs"
  """Where outputs are written until every stage is done."""
  docs: str = "docs"
  """Where the outputs are copied at the end."""
  gpus: int = 1
  """GPUs to split the fine-tuning grid over (one process each)."""


# Kept back from the fine-tuning grid for the stages after it (concentration, report) and process start-ups.
TAIL_S = 150.0


def _check(flags: Args) -> None:
  if flags.minutes <= 2:
    raise ValueError(f"--minutes must be > 2, got {flags.minutes}")
  if not 0 < flags.teacher_share < 1:
    raise ValueError(f"--teacher_share must be in (0, 1), got {flags.teacher_share}")
  if flags.finetune_steps < 1 or flags.seeds < 1 or flags.gpus < 1:
    raise ValueError("--finetune_steps, --seeds and --gpus must be >= 1")


def teacher_step(workdir: str) -> int:
  """The newest finished checkpoint's step (orbax names finished ones by the bare step number).

  Read from the directory names: this process must not start a JAX backend, which would take GPU memory
  from the stages it launches."""
  path = os.path.join(workdir, "checkpoints")
  steps = [int(name) for name in os.listdir(path) if name.isdigit()] if os.path.isdir(path) else []
  return max(steps, default=0)


def device_name(env) -> str:
  return subprocess.run(
    [sys.executable, "-c", "import jax; print(jax.devices()[0].device_kind)"],
    env=env,
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
  flags, code = cli.parse(Args, argv, prog="experiments.run_all", description=__doc__, check=_check)
  if code is not None:
    return code
  start, budget = time.time(), 60 * flags.minutes
  env = {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", "runs/experiments/jax-cache"),
  }
  stages, device = [], device_name(env)
  staging = flags.staging
  results, figures = os.path.join(staging, "results"), os.path.join(staging, "figures")
  out = lambda name: os.path.join(results, name)  # noqa: E731

  def stage(*args: str) -> None:
    command = [sys.executable, "-m", *args]
    shown = "python -m " + " ".join(args)
    print(f"\n=== {shown}  ({(time.time() - start) / 60:.1f} of {flags.minutes:.0f} min used)", flush=True)
    began = time.time()
    subprocess.run(command, env=env, check=True)
    stages.append({"command": shown, "seconds": time.time() - began})
    evaluation.write_json(out("run_times.json"), {"device": device, "stages": stages})

  left = lambda: budget - (time.time() - start)  # noqa: E731
  teacher = flags.teacher
  stage("experiments.mask_rules", "--out", out("mask_rules.json"), "--figure", os.path.join(figures, "mask_rules.png"))
  if not os.path.isfile(os.path.join(teacher, "teacher_done.json")):
    stage("experiments.train_teacher", "--workdir", teacher, "--minutes", "2.5")  # measures the step time
    teacher_minutes = flags.teacher_share * flags.minutes - (time.time() - start) / 60
    if teacher_minutes > 2 and teacher_step(teacher) < configs.teacher().steps:
      stage("experiments.train_teacher", "--workdir", teacher, "--minutes", f"{teacher_minutes:.2f}")
    if not os.path.isfile(os.path.join(teacher, "teacher_done.json")):
      # Out of teacher time: its samples and "done" at the step it reached (recorded in teacher_done.json).
      stage("experiments.train_teacher", "--workdir", teacher, f"--config.steps={teacher_step(teacher)}")
  os.makedirs(figures, exist_ok=True)
  shutil.copyfile(os.path.join(teacher, "samples.gif"), os.path.join(figures, "teacher_samples.gif"))
  stage(
    "experiments.mask_rules",
    "--teacher",
    teacher,
    "--out",
    out("mask_rules_teacher.json"),
    "--figure",
    os.path.join(figures, "mask_rules_teacher.png"),
  )
  finetune_minutes = (left() - TAIL_S) / 60
  finetune = [
    "experiments.finetune",
    "--teacher",
    teacher,
    "--steps",
    str(flags.finetune_steps),
    "--seeds",
    str(flags.seeds),
    "--out",
    out("finetune.json"),
    "--frames_figure",
    os.path.join(figures, "sample_frames.png"),
  ]
  if finetune_minutes > 1 and flags.gpus == 1:
    stage(*finetune, "--minutes", f"{finetune_minutes:.2f}")
  elif finetune_minutes > 1:
    gpus = flags.gpus
    shown = (
      f"python -m {' '.join(finetune)} --minutes {finetune_minutes:.2f} --shard i/{gpus} (i < {gpus}, one per GPU)"
    )
    print(f"\n=== {shown}", flush=True)
    began = time.time()
    shards = [
      subprocess.Popen(
        [sys.executable, "-m", *finetune, "--minutes", f"{finetune_minutes:.2f}", "--shard", f"{i}/{gpus}"],
        env={**env, "CUDA_VISIBLE_DEVICES": str(i)},
      )
      for i in range(gpus)
    ]
    if any(p.wait() for p in shards):
      raise RuntimeError("a fine-tuning shard failed; see its output above")
    stages.append({"command": shown, "seconds": time.time() - began})
    stage(*finetune, "--minutes", "0.01")  # collects every shard's runs into one summary; runs nothing new
  stage("experiments.concentration", "--teacher", teacher, "--out", out("concentration.json"))
  stage("experiments.report", "--results", results, "--figures", figures, "--out", os.path.join(staging, "RESULTS.md"))
  shutil.copytree(staging, flags.docs, dirs_exist_ok=True)
  print(f"\nall stages done in {(time.time() - start) / 60:.1f} min; copied {staging} into {flags.docs}/")
  with open(out("run_times.json")) as f:
    print(json.dumps(json.load(f), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
