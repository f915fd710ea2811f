"""Typed training configs and their presets (``tiny``, ``wan2_1_1_3b``, ``wan2_1_14b``).

Pick one with ``--config NAME`` and override fields with ``--config.FIELD=VALUE``
(see ``train.configs.cli``). ``validate`` checks value ranges and names the offending field.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from sparge_jax.models.wan import AttentionConfig, WanConfig
from sparge_jax.models.wan import tiny as tiny_model
from sparge_jax.models.wan import wan2_1_1_3b as wan2_1_1_3b_model
from sparge_jax.models.wan import wan2_1_14b as wan2_1_14b_model


@dataclasses.dataclass(frozen=True)
class TimeConfig:
  """Training times t = shift(sigmoid(N(mean, std))); see ``train.flow``."""

  mean: float = 1.5
  std: float = 1.6
  shift: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """``path``: a shard directory (``train.data``); empty: synthetic moving shapes made on the fly,
  ``synthetic_examples`` videos of latent size ``frames x height x width`` with ``text_len`` tokens."""

  path: str = ""
  shuffle: bool = True
  synthetic_examples: int = 512
  frames: int = 8
  height: int = 16
  width: int = 16
  text_len: int = 16


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh (data, fsdp); data = -1 uses all devices that fsdp leaves."""

  data: int = -1
  fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """For toy runs with ``teacher="random"`` (ignored otherwise): first train the dense teacher for
  ``steps`` with the diffusion loss on the same data (into ``<workdir>/teacher/``), so that its
  attention has structure for the sparse student to approximate."""

  steps: int = 0
  learning_rate: float = 2e-3


@dataclasses.dataclass(frozen=True)
class Config:
  """One distillation run.

  teacher: "random" (freshly initialised from ``seed``; only sensible for toy runs), a diffusers
    Wan transformer folder (``config.json`` + safetensors), or one of our workdirs / checkpoint
    directories (its student becomes the teacher).
  attention: the student's self-attention (the teacher is always dense; ``model.attention`` is unused).
  loss: "distill" = mean (u_student - u_teacher)^2 on the same x_t, t, text;
    "diffusion" = mean (u_student - (noise - x0))^2, no teacher.
  batch_size: global, over all devices and processes.
  grad_clip_norm: 0 disables clipping. warmup_steps: linear warm-up from 0 to learning_rate.
  compute_dtype: "bfloat16" keeps float32 master weights and optimizer state.
  checkpoint_every: steps between checkpoints (the last step is always saved).
  """

  name: str
  model: WanConfig
  attention: AttentionConfig
  teacher: str = "random"
  pretrain_teacher: PretrainConfig = PretrainConfig()
  loss: Literal["distill", "diffusion"] = "distill"
  steps: int = 500
  batch_size: int = 8
  learning_rate: float = 1e-5
  weight_decay: float = 0.01
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  grad_clip_norm: float = 1.0
  warmup_steps: int = 0
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  time: TimeConfig = TimeConfig()
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  log_every: int = 1
  seed: int = 0

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
    model=tiny_model(),
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
  """Wan2.1-T2V-1.3B at 480p (21 x 60 x 104 latents, 32,760 tokens), the paper's recipe (REFERENCE.md §1-2)."""
  return Config(
    name="wan2_1_1_3b",
    model=dataclasses.replace(wan2_1_1_3b_model(), remat=True),
    attention=AttentionConfig(kind="sparse", topk=0.03, topp=0.2),
    teacher="Wan2.1-T2V-1.3B-Diffusers/transformer",
    steps=500,
    batch_size=8,
    compute_dtype="bfloat16",
    data=DataConfig(path="data/wan_latents", frames=21, height=60, width=104, text_len=512),
  )


def wan2_1_14b() -> Config:
  """Wan2.1-T2V-14B at 720p (21 x 90 x 160 latents, 75,600 tokens)."""
  return Config(
    name="wan2_1_14b",
    model=dataclasses.replace(wan2_1_14b_model(), remat=True),
    attention=AttentionConfig(kind="sparse", topk=0.03, topp=0.16),
    teacher="Wan2.1-T2V-14B-Diffusers/transformer",
    steps=500,
    batch_size=8,
    compute_dtype="bfloat16",
    mesh=MeshConfig(data=1, fsdp=-1),
    data=DataConfig(path="data/wan_latents_720p", frames=21, height=90, width=160, text_len=512),
  )


PRESETS = {"tiny": tiny, "wan2_1_1_3b": wan2_1_1_3b, "wan2_1_14b": wan2_1_14b}


def validate(config: Config) -> None:
  """Raises ``ValueError`` naming the first field whose value is out of range."""

  def check(ok: bool, field: str, requirement: str):
    if not ok:
      value = config
      for part in field.split("."):
        value = getattr(value, part)
      raise ValueError(f"--config.{field}={value!r}: {requirement}")

  a = config.attention
  for name in ("topk", "topp"):
    values = getattr(a, name) if isinstance(getattr(a, name), tuple) else (getattr(a, name),)
    check(all(0.0 <= v <= 1.0 for v in values), f"attention.{name}", "must be in [0, 1]")
    check(
      len(values) in (1, config.model.num_attention_heads),
      f"attention.{name}",
      f"needs 1 or {config.model.num_attention_heads} (heads) values",
    )
  check(a.mode in ("hybrid", "topk", "topp"), "attention.mode", "must be hybrid, topk or topp")
  if a.kind == "sparse":
    _check_sparse_attention(a, config.model)
  check(bool(config.teacher) or config.loss == "diffusion", "teacher", "must be set for loss=distill")
  check(config.pretrain_teacher.steps >= 0, "pretrain_teacher.steps", "must be >= 0")
  check(config.pretrain_teacher.learning_rate > 0, "pretrain_teacher.learning_rate", "must be > 0")
  check(config.steps >= 1, "steps", "must be >= 1")
  check(config.batch_size >= 1, "batch_size", "must be >= 1")
  check(config.learning_rate > 0, "learning_rate", "must be > 0")
  check(config.weight_decay >= 0, "weight_decay", "must be >= 0")
  check(0 <= config.adam_b1 < 1, "adam_b1", "must be in [0, 1)")
  check(0 <= config.adam_b2 < 1, "adam_b2", "must be in [0, 1)")
  check(config.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0 (0 disables clipping)")
  check(config.warmup_steps >= 0, "warmup_steps", "must be >= 0")
  check(config.time.std > 0, "time.std", "must be > 0")
  check(config.time.shift > 0, "time.shift", "must be > 0")
  check(config.data.synthetic_examples >= 1, "data.synthetic_examples", "must be >= 1")
  for name in ("frames", "height", "width"):
    size, patch = getattr(config.data, name), config.model.patch_size[("frames", "height", "width").index(name)]
    check(size >= 1 and size % patch == 0, f"data.{name}", f"must be a positive multiple of the patch size {patch}")
  check(config.data.text_len >= 3, "data.text_len", "must be >= 3")
  check(config.mesh.data == -1 or config.mesh.data >= 1, "mesh.data", "must be -1 or >= 1")
  check(config.mesh.fsdp == -1 or config.mesh.fsdp >= 1, "mesh.fsdp", "must be -1 or >= 1")
  check(not config.model.batch_axes, "model.batch_axes", "is set by the trainer (the batch is split over the mesh)")
  check(config.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
  check(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
  check(config.log_every >= 1, "log_every", "must be >= 1")


def _check_sparse_attention(attention: AttentionConfig, model: WanConfig) -> None:
  """Runs sparse_attention's own argument checks (block sizes, mode, backend) on abstract inputs."""
  import jax  # noqa: PLC0415 (keeps `import train.configs` light)

  from sparge_jax.attention import sparse_attention  # noqa: PLC0415

  q = jax.ShapeDtypeStruct((1, 64, model.num_attention_heads, model.attention_head_dim), jax.numpy.float32)
  topk, topp = (jax.numpy.asarray(p) if isinstance(p, tuple) else p for p in (attention.topk, attention.topp))
  try:
    jax.eval_shape(
      lambda q: sparse_attention(
        q,
        q,
        q,
        topk=topk,
        topp=topp,
        mode=attention.mode,
        block_q=attention.block_q,
        block_kv=attention.block_kv,
        backend=attention.implementation or "auto",
      ),
      q,
    )
  except ValueError as e:
    raise ValueError(f"--config.attention: {e}") from None


def to_dict(config: Any) -> dict:
  """A JSON-friendly dict of a (nested) dataclass config; dtypes become their names."""
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      value = to_dict(value)
    elif isinstance(value, tuple):
      value = list(value)
    elif not isinstance(value, (int, float, str, bool, type(None))):
      value = getattr(value, "__name__", None) or getattr(value, "name", None) or str(value)
    out[field.name] = value
  return out


def from_dict(cls: type, data: dict) -> Any:
  """Inverse of ``to_dict`` for configs whose non-dataclass fields are plain values."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in data:
      continue
    value, hint = data[field.name], hints[field.name]
    if dataclasses.is_dataclass(hint):
      value = from_dict(hint, value)
    elif isinstance(value, list):
      value = tuple(value)
    elif field.name in ("param_dtype", "compute_dtype") and hint is Any:
      import jax.numpy as jnp  # noqa: PLC0415 (only model dtype fields need it)

      value = jnp.dtype(value).type
    kwargs[field.name] = value
  return cls(**kwargs)
