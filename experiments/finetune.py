"""Sparse fine-tuning of the experiments' teacher at 90% and 95% sparsity, in resumable pieces.

    python -m experiments.finetune --minutes 10        # repeat until it prints "finetune done"

Conditions, per target sparsity (each trained one with every seed):
  training-free        teacher weights, hybrid mask (deterministic: evaluated once)
  sparse+diffusion     hybrid mask, diffusion loss on the teacher's data
  distill-hybrid       hybrid mask, velocity distillation   (the paper's method)
  distill-topk         Top-k only mask, distillation
  distill-topp         Top-p only mask, distillation
and once: full+diffusion-unlike (dense attention, diffusion loss on data unlike the teacher's).

Per-head topk/topp are tuned on the teacher's attention on the held-out x_t (bisection per head, as
``experiments.mask_rules.tune``: Top-k k = 1 - s; Top-p bisection on p; hybrid k = (1 - s)/2, bisection on p),
Top-p and hybrid to the sparsity Top-k actually reaches (it rounds its block count up).
Metrics on fixed held-out x_t (t spread over (0, 1)): velocity MSE against the teacher; self-attention
relative L1 of the run's attention against dense attention on its own q, k, v (``attn_l1``) and against
the teacher's dense attention output (``attn_l1_vs_teacher``); realized sparsity; PSNR and SSIM
(``experiments.evaluation.mean_ssim``) of Euler samples against the teacher's from the same noise and captions.
``--shard i/n`` runs every n-th run of the plan from the i-th (one process per GPU, same workdir); a later call
without it collects them all. Writes each run's ``eval.json`` in its workdir, then ``--out`` (mean, std and per-seed values; also when
``--minutes`` cuts the plan short, with ``"complete": false``) and ``--frames_figure`` (sample frames of the
teacher, training-free, sparse+diffusion and distill-hybrid students at the highest sparsity, side by side).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import configs, evaluation
from sparge_jax import attention
from sparge_jax.files import atomic_write
from sparge_jax.models.wan import AttentionConfig
from train import cli, distill
from train.configs import Config, from_dict
from train.sample import psnr, rgb_projection, to_rgb


@dataclasses.dataclass(frozen=True)
class Args:
  """The command line of ``experiments.finetune``."""

  teacher: str = "runs/experiments/teacher"
  """The finished teacher's workdir (``experiments.train_teacher``)."""
  workdir: str = "runs/experiments/finetune"
  """One folder per run, and the tuned mask settings."""
  data_dir: str = configs.DATA_DIR
  """The experiments' datasets."""
  minutes: float = 10.0
  """Time for this call; runs that may not fit are left for the next."""
  seeds: int = 3
  """Seeds per condition."""
  steps: int = 200
  """Steps per fine-tuning run."""
  sparsities: str = "0.9,0.95"
  """Comma-separated target sparsities in (0, 1)."""
  eval_examples: int = 8
  """Held-out videos for the metrics."""
  sample_videos: int = 4
  """Videos sampled for PSNR and SSIM."""
  sample_steps: int = 30
  """Euler steps per sample."""
  block_q: int = 128
  """Query tile size."""
  block_kv: int = 64
  """Key/value tile size."""
  out: str = "docs/results/finetune.json"
  """The results file."""
  frames_figure: str = "docs/figures/sample_frames.png"
  """The figure of sample frames side by side."""
  shard: str = "0/1"
  """"i/n": run every n-th run of the plan from the i-th (one process per GPU)."""


CONDITIONS = ("training-free", "sparse+diffusion", "distill-hybrid", "distill-topk", "distill-topp")
RULE = {
  "training-free": "hybrid",
  "sparse+diffusion": "hybrid",
  "distill-hybrid": "hybrid",
  "distill-topk": "topk",
  "distill-topp": "topp",
}
METRICS = ("velocity_mse", "attn_l1", "attn_l1_vs_teacher", "sparsity", "psnr", "ssim")


def tune(
  graphdef, params, data, *, rule: str, target: float, heads: int, block_q: int, block_kv: int, backend: str
) -> dict:
  """Per-head (topk, topp) whose mean realized sparsity on the teacher's held-out attention is ~``target``."""

  @jax.jit
  def sparsity(params, topk, topp):
    def probe(q, k, v):
      mask = attention.block_mask(
        q, k, topk=topk, topp=topp, mode=rule, block_q=block_q, block_kv=block_kv, backend=backend
      )
      return 1.0 - mask.mean(axis=(0, 2, 3))

    model = nnx.merge(graphdef, params)
    dtype = jax.tree.leaves(params)[0].dtype
    return model(
      jnp.asarray(data["x_t"], dtype), 1000.0 * jnp.asarray(data["t"]), jnp.asarray(data["context"], dtype), probe=probe
    )[1].mean(0)

  topk = np.full(heads, 1.0 - target if rule == "topk" else (1.0 - target) / 2 if rule == "hybrid" else 0.0, np.float32)
  if rule == "topk":
    p = np.zeros(heads, np.float32)
    return {"topk": topk.tolist(), "topp": p.tolist(), "sparsity": np.asarray(sparsity(params, topk, p)).tolist()}
  low, high = np.zeros(heads, np.float32), np.ones(heads, np.float32)  # sparsity falls as p grows
  best_p, best = np.full(heads, 0.5, np.float32), np.full(heads, np.inf)
  for _ in range(20):
    p = (low + high) / 2
    s = np.asarray(sparsity(params, topk, p))
    better = np.abs(s - target) < np.abs(best - target)
    best_p, best = np.where(better, p, best_p), np.where(better, s, best)
    low, high = np.where(s > target, p, low), np.where(s > target, high, p)
  return {"topk": topk.tolist(), "topp": best_p.tolist(), "sparsity": best.tolist()}


def evaluate(
  base: Config, graphdef, params, attention_config, teacher: dict, data: dict, noise, context, sample_steps: int
) -> dict:
  """The run's metrics against the teacher (``teacher``: its velocity, attention outputs and samples)."""
  velocity, sparsity, (out, dense) = evaluation.forward(
    graphdef, params, data["x_t"], data["t"], data["context"], evaluation.attention_outputs_probe(attention_config)
  )
  videos = evaluation.sample(graphdef, params, noise, context, num_steps=sample_steps)
  return {
    "velocity_mse": float(np.mean((np.asarray(velocity) - teacher["velocity"]) ** 2)),
    "attn_l1": evaluation.relative_l1(out, dense),
    "attn_l1_vs_teacher": evaluation.relative_l1(out, teacher["attention"]),
    "sparsity": float(np.mean(sparsity)),
    "psnr": float(np.mean([psnr(t, v) for t, v in zip(teacher["videos"], videos)])),
    "ssim": float(np.mean([evaluation.mean_ssim(t, v) for t, v in zip(teacher["videos"], videos)])),
  }, videos


def plan(sparsities, seeds) -> list[dict]:
  """Seed-major, so that a budget cut still leaves every condition with its first seeds."""
  runs = []
  for seed in range(seeds):
    runs += [
      {"condition": c, "target_sparsity": s, "seed": seed}
      for s in sparsities
      for c in CONDITIONS
      if seed == 0 or c != "training-free"
    ]
    runs.append({"condition": "full+diffusion-unlike", "target_sparsity": None, "seed": seed})
  return runs


FRAMES_SHOWN = ("training-free", "sparse+diffusion", "distill-hybrid")


def write_frames_figure(workdir: str, sparsity: float, path: str, *, videos: int = 2, frames: int = 4) -> bool:
  """Sample frames of the teacher and the seed-0 runs of ``FRAMES_SHOWN`` at ``sparsity``, from the same
  noise and captions, side by side (rows: models; columns: frames of each video). False if none ran yet."""
  teacher = np.load(os.path.join(workdir, "teacher_samples.npz"))["videos"]
  shown = [("teacher (dense)", teacher)]
  for condition in FRAMES_SHOWN:
    npz = os.path.join(
      workdir, run_name({"condition": condition, "target_sparsity": sparsity, "seed": 0}), "samples.npz"
    )
    if os.path.isfile(npz):
      shown.append((f"{condition} @ {sparsity:.2f}", np.load(npz)["videos"]))
  if len(shown) == 1:
    return False
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  projection = rgb_projection(teacher)
  videos = min(videos, len(teacher))
  picks = np.linspace(0, teacher.shape[1] - 1, frames).round().astype(int)
  fig, axes = plt.subplots(
    len(shown), videos * frames, figsize=(1.4 * videos * frames, 1.5 * len(shown)), squeeze=False
  )
  for row, (label, video) in zip(axes, shown):
    rgb = to_rgb(video[:videos], *projection, scale=1)
    for i, ax in enumerate(row):
      ax.imshow(rgb[i // frames, picks[i % frames]], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_ylabel(label, fontsize=7)
      if row is axes[0]:
        ax.set_title(f"video {i // frames}, frame {picks[i % frames]}", fontsize=6)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
  return True


def run_name(run: dict) -> str:
  target = "dense" if run["target_sparsity"] is None else f"s{run['target_sparsity']:.2f}"
  return f"{run['condition']}-{target}-seed{run['seed']}"


def summarise(rows: list[dict]) -> list[dict]:
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((row["condition"], row["target_sparsity"]), []).append(row)
  return [
    {
      "condition": c,
      "target_sparsity": s,
      "seeds": len(g),
      **{f"{m}_mean": float(np.mean([r[m] for r in g])) for m in METRICS},
      **{f"{m}_std": float(np.std([r[m] for r in g])) for m in METRICS},
    }
    for (c, s), g in groups.items()
  ]


def _sparsities(flags) -> list[float]:
  return [float(s) for s in flags.sparsities.split(",") if s.strip()]


def _shard(flags) -> tuple[int, int]:
  """--shard "i/n": this process runs plan entries i, i + n, ... (e.g. one process per GPU)."""
  try:
    index, count = (int(p) for p in flags.shard.split("/"))
  except ValueError:
    raise ValueError(f"--shard must be 'i/n' with 0 <= i < n, got {flags.shard!r}") from None
  if not 0 <= index < count:
    raise ValueError(f"--shard must be 'i/n' with 0 <= i < n, got {flags.shard!r}")
  return index, count


def _check(flags: Args) -> None:
  _shard(flags)
  sparsities = _sparsities(flags)
  if not sparsities or not all(0 < s < 1 for s in sparsities):
    raise ValueError(f"--sparsities must be comma-separated values in (0, 1), got {flags.sparsities!r}")
  for name in ("seeds", "steps", "eval_examples", "sample_videos", "sample_steps"):
    if getattr(flags, name) < 1:
      raise ValueError(f"--{name} must be >= 1, got {getattr(flags, name)}")
  if flags.minutes <= 0:
    raise ValueError(f"--minutes must be > 0, got {flags.minutes}")
  if not os.path.isfile(os.path.join(flags.teacher, "teacher_done.json")):
    raise ValueError(
      f"--teacher {flags.teacher!r}: no finished teacher (teacher_done.json); run experiments.train_teacher first"
    )


def main(argv: list[str] | None = None) -> int:
  flags, code = cli.parse(Args, argv, prog="experiments.finetune", description=__doc__, check=_check)
  if code is not None:
    return code
  sparsities = _sparsities(flags)
  start, workdir = time.time(), flags.workdir
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(flags.teacher, "config.json")) as f:
    base = from_dict(Config, json.load(f))
  heads, a = base.model.num_attention_heads, base.attention
  block_q, block_kv = flags.block_q, flags.block_kv
  dense_config, graphdef, teacher_params = evaluation.load_model(base, flags.teacher, AttentionConfig(kind="dense"))
  data = evaluation.held_out(base, flags.eval_examples)
  noise, context = data["noise"][: flags.sample_videos], data["context"][: flags.sample_videos]

  tuned_path = os.path.join(workdir, "tuned.json")
  if not os.path.isfile(tuned_path):
    tuned = {}
    for s in sparsities:
      # Top-k keeps whole blocks (ceil((1 - s) * n_kv) per row), so its sparsity is what it is; the other
      # rules are tuned to Top-k's realized sparsity so that no rule gets more blocks than another.
      kwargs = dict(heads=heads, block_q=block_q, block_kv=block_kv, backend=a.implementation or "auto")
      tuned[f"topk@{s}"] = tune(graphdef, teacher_params, data, rule="topk", target=s, **kwargs)
      matched = float(np.mean(tuned[f"topk@{s}"]["sparsity"]))
      for rule in ("hybrid", "topp"):
        tuned[f"{rule}@{s}"] = tune(graphdef, teacher_params, data, rule=rule, target=matched, **kwargs)
    evaluation.write_json(tuned_path, tuned)
  with open(tuned_path) as f:
    tuned = json.load(f)

  velocity, _, (teacher_attention, _) = evaluation.forward(
    graphdef,
    teacher_params,
    data["x_t"],
    data["t"],
    data["context"],
    evaluation.attention_outputs_probe(AttentionConfig(kind="dense")),
  )
  teacher = {
    "velocity": np.asarray(velocity),
    "attention": teacher_attention,
    "videos": evaluation.sample(graphdef, teacher_params, noise, context, num_steps=flags.sample_steps),
  }
  np.savez(os.path.join(workdir, "teacher_samples.npz"), videos=teacher["videos"])

  def finish(rows, complete: bool) -> None:
    evaluation.write_json(
      flags.out,
      {
        "command": "python -m experiments.finetune",
        "device": jax.devices()[0].device_kind,
        "complete": complete,
        "teacher": os.path.abspath(flags.teacher),
        "steps": flags.steps,
        "seeds": flags.seeds,
        "eval_examples": flags.eval_examples,
        "sample_videos": flags.sample_videos,
        "sample_steps": flags.sample_steps,
        "tuned": tuned,
        "summary": summarise(rows),
        "runs": rows,
      },
    )
    write_frames_figure(workdir, max(sparsities), flags.frames_figure)

  longest, rows, left_over = 0.0, [], []
  shard, shards = _shard(flags)
  for i, run in enumerate(plan(sparsities, flags.seeds)):
    run_dir = os.path.join(workdir, run_name(run))
    eval_path = os.path.join(run_dir, "eval.json")
    if os.path.isfile(eval_path):
      with open(eval_path) as f:
        rows.append(json.load(f))
      continue
    # Another shard's run, or one that may not fit in what is left of --minutes.
    if i % shards != shard or time.time() - start + longest > 60 * flags.minutes:
      left_over.append(run_name(run))
      continue
    run_start = time.time()
    if run["target_sparsity"] is None:
      attention_config, loss, data_path = (
        AttentionConfig(kind="dense"),
        "diffusion",
        os.path.join(flags.data_dir, configs.UNLIKE_DATA),
      )
    else:
      params = tuned[f"{RULE[run['condition']]}@{run['target_sparsity']}"]
      attention_config = AttentionConfig(
        kind="sparse",
        topk=tuple(params["topk"]),
        topp=tuple(params["topp"]),
        mode=RULE[run["condition"]],
        block_q=block_q,
        block_kv=block_kv,
        implementation=a.implementation,
      )
      loss, data_path = ("distill" if run["condition"].startswith("distill") else "diffusion"), None
    run_graphdef = evaluation.with_attention(dense_config, attention_config)[1]
    if run["condition"] == "training-free":
      params, summary = teacher_params, None
    else:
      config = configs.finetune(
        base,
        teacher_dir=os.path.abspath(flags.teacher),
        loss=loss,
        attention=attention_config,
        steps=flags.steps,
        seed=run["seed"],
        data_path=data_path,
      )
      summary = distill.run(config, run_dir, progress=False)
      params = evaluation.load_model(config, run_dir, attention_config)[2]
    metrics, videos = evaluate(
      base, run_graphdef, params, attention_config, teacher, data, noise, context, flags.sample_steps
    )
    os.makedirs(run_dir, exist_ok=True)
    np.savez(os.path.join(run_dir, "samples.npz"), videos=videos)
    row = {
      **run,
      "name": run_name(run),
      **metrics,
      "attention": dataclasses.asdict(attention_config),
      "train_step_time_s": summary and summary["step_time_s"],
      "run_seconds": time.time() - run_start,
    }
    evaluation.write_json(eval_path, row)
    rows.append(row)
    longest = max(longest, row["run_seconds"])
    print(f"{row['name']}: " + ", ".join(f"{m} {row[m]:.4g}" for m in METRICS), flush=True)

  finish(rows, complete=not left_over)
  if left_over:
    print(
      f"{len(left_over)} runs not done here (other shards', or past --minutes: {', '.join(left_over)}); "
      f"wrote the {len(rows)} done so far to {flags.out}; run again to continue"
    )
  else:
    print(f"finetune done; wrote {flags.out} and {flags.frames_figure}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
