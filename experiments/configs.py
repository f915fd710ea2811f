"""The small Wan-style teacher of the quality experiments, its data, and a step-time estimate.

    python -m experiments.configs          # prints the size, token count and the H100 step-time estimate

Teacher: 8 layers, 8 heads x 64 (dim 512), ffn 2048, Wan's structure (qk RMS-norm, 3-D RoPE, cross-attention
to "text"), ~34 M block parameters. Videos: 16 latent frames of 32 x 32 x 16 channels, patch (1, 2, 2) ->
16 x 16 x 16 = 4,096 tokens: 32 query blocks of 128 and 64 kv blocks of 64 per row.

Data: `train.data.MovingShapes` written to disk once (`write_datasets`), so that every fine-tuning run,
whatever its seed, reads the teacher's exact data; the "unlike" set is the same generator with another seed,
hence other palette colours and other caption embeddings.

Step-time estimate (not a measurement): dense FLOPs of the forward (projections, FFN, self-attention
4·N²·dim, cross-attention) x 3 for forward+backward, at an assumed fraction of the throughput the
1.3B model reached on an H100: the dense student's forward+backward time at 32,760 tokens that
benchmarks/results/distill-nvidia-h100-80gb-hbm3-x1.json records.
"""

from __future__ import annotations

import dataclasses
import json
import os

from sparge_jax.models.wan import AttentionConfig, WanConfig
from sparge_jax.models.wan import wan2_1_1_3b as wan2_1_1_3b_model
from train.configs import Config, DataConfig, ModelConfig, TimeConfig
from train.data import MovingShapes, write_dataset

DATA_DIR = "runs/experiments/data"
TEACHER_DATA, UNLIKE_DATA = "shapes", "shapes-unlike"
# A small model is far from the 1.3B's matmul efficiency; 0.4 of its throughput is our guess.
ASSUMED_EFFICIENCY = 0.4
MEASURED_1_3B = {"file": "benchmarks/results/distill-nvidia-h100-80gb-hbm3-x1.json", "tokens": 32760, "text_len": 512}


def teacher_model() -> ModelConfig:
  return ModelConfig(
    num_attention_heads=8,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=256,
    ffn_dim=2048,
    num_layers=8,
  )


def teacher(data_dir: str = DATA_DIR) -> Config:
  """Dense teacher trained from scratch with the diffusion loss (6,000 steps of 8 videos)."""
  return Config(
    name="exp_teacher",
    model=teacher_model(),
    attention=AttentionConfig(kind="dense"),
    teacher="random",
    loss="diffusion",
    steps=6000,
    batch_size=8,
    learning_rate=5e-4,
    warmup_steps=200,
    grad_clip_norm=1.0,
    compute_dtype="bfloat16",
    time=TimeConfig(),
    data=DataConfig(path=os.path.join(data_dir, TEACHER_DATA), frames=16, height=32, width=32, text_len=16),
    checkpoint_every=500,
    keep_checkpoints=2,
    log_every=10,
  )


def finetune(
  base: Config,
  *,
  teacher_dir: str,
  loss: str,
  attention: AttentionConfig,
  steps: int,
  seed: int,
  data_path: str | None = None,
) -> Config:
  """A fine-tuning run of the teacher: student initialised from ``teacher_dir``."""
  return dataclasses.replace(
    base,
    name=f"exp_{loss}",
    teacher=teacher_dir,
    loss=loss,
    attention=attention,
    steps=steps,
    learning_rate=1e-4,
    warmup_steps=min(20, steps - 1),
    seed=seed,
    checkpoint_every=steps,
    keep_checkpoints=1,
    data=dataclasses.replace(base.data, path=data_path or base.data.path),
  )


def write_datasets(config: Config, num_examples: int, data_dir: str = DATA_DIR) -> None:
  """Writes the teacher's data (MovingShapes seed 0) and the unlike data (seed 1) unless present."""
  d, m = config.data, config.model
  for name, seed in ((TEACHER_DATA, 0), (UNLIKE_DATA, 1)):
    path = os.path.join(data_dir, name)
    if os.path.isdir(path):
      continue
    os.makedirs(data_dir, exist_ok=True)
    source = MovingShapes(
      num_examples, (d.frames, d.height, d.width, m.in_channels), (d.text_len, m.text_dim), seed=seed
    )
    write_dataset(path, (source.get(i) for i in range(num_examples)))


def forward_flops(model: WanConfig | ModelConfig, tokens: int, text_len: int) -> float:
  """Dense forward FLOPs of one video (matmuls only)."""
  dim, layers = model.dim, model.num_layers
  per_layer = (
    2 * tokens * dim * dim * 4  # self-attention q, k, v, out
    + 4 * tokens * tokens * dim  # QK^T and PV
    + 2 * tokens * dim * dim * 2
    + 2 * text_len * dim * dim * 2  # cross q, out; k, v on text
    + 4 * tokens * text_len * dim  # cross-attention QK^T and PV
    + 2 * tokens * dim * model.ffn_dim * 2
  )
  return layers * per_layer


def estimate_step_seconds(config: Config, *, teacher_forward: bool) -> float:
  """Estimated H100 seconds per training step (forward+backward, plus a teacher forward if distilling)."""
  with open(MEASURED_1_3B["file"]) as f:
    measured_s = json.load(f)["dense"]["student_fwd_bwd_ms"] / 1e3
  flops_per_s = 3 * forward_flops(wan2_1_1_3b_model(), MEASURED_1_3B["tokens"], MEASURED_1_3B["text_len"]) / measured_s
  tokens = (
    (config.data.frames // config.model.patch_size[0])
    * (config.data.height // config.model.patch_size[1])
    * (config.data.width // config.model.patch_size[2])
  )
  flops = config.batch_size * forward_flops(config.model, tokens, config.data.text_len) * (4 if teacher_forward else 3)
  return flops / (flops_per_s * ASSUMED_EFFICIENCY)


def main() -> None:
  config = teacher()
  m = config.model
  tokens = (
    (config.data.frames // m.patch_size[0])
    * (config.data.height // m.patch_size[1])
    * (config.data.width // m.patch_size[2])
  )
  params = m.num_layers * (8 * m.dim**2 + 2 * m.dim * m.ffn_dim)
  print(
    f"teacher: {m.num_layers} layers, dim {m.dim}, ~{params / 1e6:.0f} M block parameters, {tokens} tokens "
    f"per video ({tokens // 128} q blocks x {tokens // 64} kv blocks)"
  )
  for label, distill in (("diffusion (teacher / diffusion fine-tune)", False), ("distillation", True)):
    s = estimate_step_seconds(config, teacher_forward=distill)
    print(
      f"estimated H100 step, batch {config.batch_size}, {label}: {s * 1e3:.0f} ms "
      f"(assumed {ASSUMED_EFFICIENCY:.0%} of the 1.3B's throughput)"
    )
  print(
    f"teacher: {config.steps} steps ~ {config.steps * estimate_step_seconds(config, teacher_forward=False) / 60:.1f}"
    " min + compilation"
  )


if __name__ == "__main__":
  main()
