"""Typed training configs, their presets (``tiny``, ``wan2_1_1_3b``, ``wan2_1_14b``) and their checks.

Pick a preset with ``--config NAME`` (or a file of your own: ``--config my_config.py`` defining
``get_config()``, or a saved ``config.json``) and override fields with ``--config.FIELD=VALUE``; see
``train.cli``. ``validate`` checks value ranges and names the offending field; it never traces or
compiles anything, so it runs before ``jax.distributed.initialize``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import jax.numpy as jnp

from sparge_jax.config import AttentionConfig
from sparge_jax.models.wan import WanConfig
from sparge_jax.models.wan import tiny as tiny_model
from sparge_jax.models.wan import wan2_1_1_3b as wan2_1_1_3b_model
from sparge_jax.models.wan import wan2_1_14b as wan2_1_14b_model

from .files import from_dict, load_config, to_dict

__all__ = [
  "PRESETS",
  "AttentionConfig",
  "Config",
  "DataConfig",
  "EvalConfig",
  "MeshConfig",
  "ModelConfig",
  "PretrainConfig",
  "TimeConfig",
  "checker",
  "from_dict",
  "load_config",
  "patch_grid",
  "tiny",
  "to_dict",
  "validate",
  "validate_model",
  "wan2_1_14b",
  "wan2_1_1_3b",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The Wan architecture (diffusers ``config.json`` names) and its rematerialisation.

  The trainer sets the rest of ``sparge_jax.models.wan.WanConfig`` itself: self-attention from
  ``attention`` (the teacher's is dense), the compute dtype from ``compute_dtype``, float32 parameters, and
  the batch and sequence axes of its mesh.
  """

  patch_size: tuple[int, int, int] = (1, 2, 2)
  """Latent frames, height and width per token."""
  num_attention_heads: int = 12
  """Attention heads."""
  attention_head_dim: int = 128
  """Channels per head; the model width is heads x head_dim."""
  in_channels: int = 16
  """Latent channels in."""
  out_channels: int = 16
  """Latent channels out."""
  text_dim: int = 4096
  """Width of the text encoder's output."""
  freq_dim: int = 256
  """Width of the timestep sinusoid."""
  ffn_dim: int = 8960
  """Hidden width of the feed-forward layers."""
  num_layers: int = 30
  """Transformer blocks."""
  cross_attn_norm: bool = True
  """Layer-norm before cross-attention."""
  eps: float = 1e-6
  """Epsilon of the norms."""
  rope_max_seq_len: int = 1024
  """Longest rotary table per axis."""
  remat: bool = False
  """Recompute each block in the backward pass (saves memory)."""
  remat_saves: tuple[Literal["qkv", "ffn_hidden"], ...] = ()
  """Block intermediates kept through the backward pass when remat is on."""

  @property
  def dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @classmethod
  def from_wan(cls, wan: WanConfig) -> ModelConfig:
    """The architecture fields of a ``WanConfig``."""
    return cls(**{f.name: getattr(wan, f.name) for f in dataclasses.fields(cls)})

  def wan(
    self,
    *,
    attention: AttentionConfig,
    compute_dtype: Literal["float32", "bfloat16"] = "float32",
    batch_axes: tuple[str, ...] = (),
    sequence_axes: tuple[str, ...] = (),
    sequence_parallel: str = "ulysses",
  ) -> WanConfig:
    """The ``WanConfig`` of this architecture with the given run options (float32 parameters)."""
    return WanConfig(
      **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
      attention=attention,
      param_dtype=jnp.float32,
      compute_dtype=jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32,
      batch_axes=batch_axes,
      sequence_axes=sequence_axes,
      sequence_parallel=sequence_parallel,
    )


@dataclasses.dataclass(frozen=True)
class TimeConfig:
  """Training times t = shift(sigmoid(N(mean, std))); see ``train.flow``."""

  mean: float = 1.5
  """Mean of the logit-normal."""
  std: float = 1.6
  """Standard deviation of the logit-normal."""
  shift: float = 1.0
  """Wan's timestep shift (1 leaves t as drawn)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training videos: a shard folder, or synthetic moving shapes made on the fly."""

  path: str = ""
  """A shard folder (``train.make_dataset`` writes one); empty: synthetic moving shapes."""
  shuffle: bool = True
  """Shuffle the examples each epoch."""
  synthetic_examples: int = 512
  """Number of synthetic videos (without a path)."""
  frames: int = 8
  """Latent frames of the synthetic videos."""
  height: int = 16
  """Latent height of the synthetic videos."""
  width: int = 16
  """Latent width of the synthetic videos."""
  text_len: int = 16
  """Text tokens of the synthetic captions."""
  heldout_examples: int = 16
  """Examples the eval measures and training never sees: the last ones of the shard folder, or extra
  synthetic videos."""
  workers: int = 0
  """Worker processes reading batches ahead (grain); 0 reads in threads of the trainer."""
  prefetch: int = 2
  """Batches read ahead (per worker with workers > 0)."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Teacher against student during distillation: the velocity loss on the held-out examples, and videos
  both generate from the same noise and text (no guidance), compared by PSNR and SSIM."""

  every: int = 50
  """Steps between evals (and one before the first step); 0: none (the loss on the held-out examples before
  the first step and after the last is in summary.json either way)."""
  videos: int = 2
  """Videos each model generates: the captions of the first held-out examples, or eval.prompts."""
  num_steps: int = 10
  """Sampling steps per video."""
  shift: float = 5.0
  """Timestep shift of the sampler."""
  frames: int = 0
  """Latent frames of the videos; 0: the training data's."""
  height: int = 0
  """Latent height of the videos; 0: the training data's."""
  width: int = 0
  """Latent width of the videos; 0: the training data's."""
  model: str = ""
  """A Wan diffusers folder: its vae/ decodes the videos to pixels and scheduler/ samples them (its
  text_encoder/ and tokenizer/ encode eval.prompts); empty: Euler sampling, latents shown through a fixed
  RGB projection."""
  prompts: tuple[str, ...] = ()
  """With eval.model: the prompts of the videos; empty: the held-out captions."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh (data, fsdp, sequence) over all devices of all processes."""

  data: int = -1
  """Data-parallel size; -1 uses all devices that fsdp and sequence leave."""
  fsdp: int = 1
  """Parameter-sharding size; -1 uses all devices that data and sequence leave."""
  sequence: int = 1
  """Sequence-parallel size: devices that split each example's tokens (the batch splits over data x fsdp)."""
  sequence_parallel: Literal["ulysses", "ring", "usp"] = "ulysses"
  """How self-attention spans the sequence devices: ulysses (all-to-all to heads: best where the heads
  divide by sequence), ring (k/v rotate around them), usp (Ulysses over sequence / ring, ring over ring)."""
  ring: int = 1
  """With usp: the ring part of sequence (a divisor of it)."""


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """For toy runs with ``teacher="random"`` (ignored otherwise): first train the dense teacher with the
  diffusion loss on the same data (into ``<workdir>/teacher/``), so that its attention has structure for the
  sparse student to approximate."""

  steps: int = 0
  """Pretraining steps (0: none)."""
  learning_rate: float = 2e-3
  """Pretraining learning rate."""


@dataclasses.dataclass(frozen=True)
class Config:
  """One distillation run."""

  name: str
  """Run name; the default workdir is runs/<name>-<date>-<time>."""
  model: ModelConfig
  """The architecture of teacher and student."""
  attention: AttentionConfig
  """The student's self-attention (the teacher's is always dense)."""
  teacher: str = "random"
  """"random" (initialised from seed; for toy runs), a diffusers Wan transformer folder (config.json +
  safetensors), or a workdir / checkpoint folder of ours (its student becomes the teacher)."""
  pretrain_teacher: PretrainConfig = PretrainConfig()
  loss: Literal["distill", "diffusion"] = "distill"
  """distill: mean (u_student - u_teacher)^2 on the same x_t, t and text; diffusion: mean (u_student -
  (noise - x0))^2, no teacher."""
  steps: int = 500
  """Optimizer steps in all (a resumed run continues to this step)."""
  batch_size: int = 8
  """Global batch, over all devices and processes."""
  learning_rate: float = 1e-5
  """AdamW peak learning rate."""
  weight_decay: float = 0.01
  """AdamW weight decay."""
  adam_b1: float = 0.9
  """AdamW beta1."""
  adam_b2: float = 0.999
  """AdamW beta2."""
  grad_clip_norm: float = 1.0
  """Global gradient-norm clip; 0 disables it."""
  warmup_steps: int = 0
  """Linear warm-up from 0 to learning_rate."""
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  """bfloat16 keeps float32 master weights and optimizer state."""
  time: TimeConfig = TimeConfig()
  data: DataConfig = DataConfig()
  eval: EvalConfig = EvalConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint_every: int = 100
  """Steps between checkpoints (the last step is always saved)."""
  keep_checkpoints: int = 3
  """Newest checkpoints kept."""
  log_every: int = 1
  """Steps between metrics records."""
  seed: int = 0
  """Seeds initialisation, data order, t and noise."""

  @property
  def pretrains_teacher(self) -> bool:
    return self.teacher == "random" and self.pretrain_teacher.steps > 0


def tiny() -> Config:
  """The out-of-the-box run: a 2-layer toy Wan, synthetic moving shapes, a few minutes on 2 CPU cores.

  512 tokens per video (8 x 8 x 8 after patching), 32 x 16 tiles: 16 x 32 blocks, so the
  sparse mask has room to skip most of them.
  """
  return Config(
    name="tiny",
    model=ModelConfig.from_wan(tiny_model()),
    attention=AttentionConfig(kind="sparse", topk=0.1, topp=0.3, block_q=32, block_kv=16),
    pretrain_teacher=PretrainConfig(steps=300),
    steps=200,
    batch_size=4,
    learning_rate=3e-4,
    warmup_steps=10,
    checkpoint_every=50,
    keep_checkpoints=2,
  )


def wan2_1_1_3b() -> Config:
  """Wan2.1-T2V-1.3B at 480p (21 x 60 x 104 latents, 32,760 tokens), the SpargeAttention2 recipe."""
  return Config(
    name="wan2_1_1_3b",
    model=dataclasses.replace(ModelConfig.from_wan(wan2_1_1_3b_model()), remat=True),
    attention=AttentionConfig(kind="sparse", topk=0.03, topp=0.2),
    teacher="Wan2.1-T2V-1.3B-Diffusers/transformer",
    steps=500,
    batch_size=8,
    compute_dtype="bfloat16",
    data=DataConfig(path="data/wan_latents", frames=21, height=60, width=104, text_len=512),
    eval=EvalConfig(every=100, num_steps=20, model="Wan2.1-T2V-1.3B-Diffusers"),
  )


def wan2_1_14b() -> Config:
  """Wan2.1-T2V-14B at 720p (21 x 90 x 160 latents, 75,600 tokens)."""
  return Config(
    name="wan2_1_14b",
    model=dataclasses.replace(ModelConfig.from_wan(wan2_1_14b_model()), remat=True),
    attention=AttentionConfig(kind="sparse", topk=0.03, topp=0.16),
    teacher="Wan2.1-T2V-14B-Diffusers/transformer",
    steps=500,
    batch_size=8,
    compute_dtype="bfloat16",
    mesh=MeshConfig(data=1, fsdp=-1),
    data=DataConfig(path="data/wan_latents_720p", frames=21, height=90, width=160, text_len=512),
    eval=EvalConfig(every=100, num_steps=20, model="Wan2.1-T2V-14B-Diffusers"),
  )


PRESETS = {"tiny": tiny, "wan2_1_1_3b": wan2_1_1_3b, "wan2_1_14b": wan2_1_14b}


def checker(config) -> Callable[[bool, str, str], None]:
  """``check(ok, field, requirement)``: ValueError ``--config.FIELD=VALUE: requirement`` unless ``ok``."""

  def check(ok: bool, field: str, requirement: str) -> None:
    if not ok:
      value = config
      for part in field.split("."):
        value = getattr(value, part)
      raise ValueError(f"--config.{field}={value!r}: {requirement}")

  return check


def validate_model(config) -> None:
  """Checks ``config.model`` (a ``ModelConfig``) and its fit with ``config.attention`` if it has one."""
  check, m = checker(config), config.model
  for name in (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "rope_max_seq_len",
  ):
    check(getattr(m, name) >= 1, f"model.{name}", "must be >= 1")
  check(len(m.patch_size) == 3 and min(m.patch_size) >= 1, "model.patch_size", "must be 3 positive sizes")
  check(0 < m.eps < math.inf, "model.eps", "must be > 0 and finite")
  attention = getattr(config, "attention", AttentionConfig())
  try:  # WanConfig's own checks (rotary split, remat names): plain Python, nothing traced
    m.wan(attention=attention)
  except ValueError as e:
    raise ValueError(f"--config.model: {e}") from None
  try:
    attention.check_heads(m.num_attention_heads)
  except ValueError as e:
    raise ValueError(f"--config.attention: {e}") from None


def patch_grid(model: ModelConfig, frames: int, height: int, width: int) -> list[int]:
  """Patches per axis of a latent video of this size."""
  return [size // patch for size, patch in zip((frames, height, width), model.patch_size)]


def validate(config: Config) -> None:
  """Raises ``ValueError`` naming the first field whose value is out of range.

  The attention settings validate themselves when an ``AttentionConfig`` is built; here only their fit
  with the model (one topk / topp per head) is checked.
  """
  check = checker(config)
  validate_model(config)
  check(bool(config.teacher) or config.loss == "diffusion", "teacher", "must be set for loss=distill")
  check(config.pretrain_teacher.steps >= 0, "pretrain_teacher.steps", "must be >= 0")
  check(
    0 < config.pretrain_teacher.learning_rate < math.inf, "pretrain_teacher.learning_rate", "must be > 0 and finite"
  )
  check(config.steps >= 1, "steps", "must be >= 1")
  check(config.batch_size >= 1, "batch_size", "must be >= 1")
  check(0 < config.learning_rate < math.inf, "learning_rate", "must be > 0 and finite")
  check(0 <= config.weight_decay < math.inf, "weight_decay", "must be >= 0 and finite")
  check(0 <= config.adam_b1 < 1, "adam_b1", "must be in [0, 1)")
  check(0 <= config.adam_b2 < 1, "adam_b2", "must be in [0, 1)")
  check(config.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0 (0 disables clipping)")
  check(config.warmup_steps >= 0, "warmup_steps", "must be >= 0")
  check(math.isfinite(config.time.mean), "time.mean", "must be finite")
  check(0 < config.time.std < math.inf, "time.std", "must be > 0 and finite")
  check(0 < config.time.shift < math.inf, "time.shift", "must be > 0 and finite")
  grid = patch_grid(config.model, config.data.frames, config.data.height, config.data.width)
  check(
    max(grid) <= config.model.rope_max_seq_len, "model.rope_max_seq_len", f"must cover the data's patch grid {grid}"
  )
  check(config.data.synthetic_examples >= 1, "data.synthetic_examples", "must be >= 1")
  for name in ("frames", "height", "width"):
    size, patch = getattr(config.data, name), config.model.patch_size[("frames", "height", "width").index(name)]
    check(size >= 1 and size % patch == 0, f"data.{name}", f"must be a positive multiple of the patch size {patch}")
  check(config.data.text_len >= 3, "data.text_len", "must be >= 3")
  check(config.data.heldout_examples >= 1, "data.heldout_examples", "must be >= 1")
  check(config.data.workers >= 0, "data.workers", "must be >= 0")
  check(config.data.prefetch >= 0, "data.prefetch", "must be >= 0")
  e = config.eval
  check(e.every >= 0, "eval.every", "must be >= 0 (0: no eval)")
  check(e.videos >= 0, "eval.videos", "must be >= 0")
  check(e.num_steps >= 1, "eval.num_steps", "must be >= 1")
  check(e.shift > 0, "eval.shift", "must be > 0")
  for name in ("frames", "height", "width"):
    size, patch = getattr(e, name), config.model.patch_size[("frames", "height", "width").index(name)]
    check(
      size >= 0 and size % patch == 0, f"eval.{name}", f"must be 0 (the data's) or a multiple of the patch size {patch}"
    )
  check(not e.prompts or bool(e.model), "eval.prompts", "needs eval.model (its text encoder encodes them)")
  check(config.mesh.data == -1 or config.mesh.data >= 1, "mesh.data", "must be -1 or >= 1")
  check(config.mesh.fsdp == -1 or config.mesh.fsdp >= 1, "mesh.fsdp", "must be -1 or >= 1")
  check(config.mesh.sequence >= 1, "mesh.sequence", "must be >= 1")
  check(
    config.mesh.sequence_parallel in ("ulysses", "ring", "usp"),
    "mesh.sequence_parallel",
    "must be ulysses, ring or usp",
  )
  check(
    config.mesh.ring >= 1 and config.mesh.sequence % config.mesh.ring == 0, "mesh.ring", "must divide mesh.sequence"
  )
  check(config.mesh.ring == 1 or config.mesh.sequence_parallel == "usp", "mesh.ring", "is for sequence_parallel=usp")
  check(config.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
  check(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
  check(config.log_every >= 1, "log_every", "must be >= 1")
  check(config.seed >= 0, "seed", "must be >= 0")
