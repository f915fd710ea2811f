"""Write a latent-video dataset in the shard format of ``train.data``.

    python -m train.make_dataset --out data/shapes --num_examples 512                  # synthetic
    python -m train.make_dataset --out data/teacher --source teacher --config.teacher=PATH \\
        --num_examples 256 --num_steps 30                                               # teacher samples
    python -m train.make_dataset --out data/more --source teacher --config runs/RUN/config.json

(``sparge-make-dataset`` once installed.) ``synthetic``: procedural moving shapes with matching captions
(``train.data.MovingShapes``) at the latent size ``--config.frames/height/width``, with the model's channels
and text width. ``teacher``: the published recipes fine-tune on teacher-generated latents; this integrates
the dense teacher (``--config.teacher``) with the Euler sampler from seeded noise, conditioned on the
captions of ``--config.captions`` if set, else on the synthetic captions. ``--config`` starts from a
trainer preset or a run's ``config.json`` (its model, teacher and data sizes).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparge_jax.config import AttentionConfig

from . import cli, errors, flow, sharding, sources
from .configs import PRESETS, Config, ModelConfig, checker, patch_grid, validate_model
from .data import MovingShapes, Source, write_dataset
from .models import abstract_model
from .teacher import load_teacher
from .workdir import check_new_directory


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What the dataset is made for: a model, its teacher, and the latent and text sizes."""

  model: ModelConfig
  """The architecture (its channels and text width set the shapes; the teacher must match it)."""
  teacher: str = "random"
  """With --source teacher: a diffusers Wan transformer folder or a workdir of ours ("random": untrained)."""
  captions: str = ""
  """With --source teacher: a shard folder whose captions condition the samples; empty: synthetic captions."""
  frames: int = 8
  """Latent frames per video."""
  height: int = 16
  """Latent height."""
  width: int = 16
  """Latent width."""
  text_len: int = 16
  """Text tokens of the synthetic captions."""
  batch_size: int = 8
  """Teacher samples computed at once."""
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  """The teacher's compute dtype."""
  seed: int = 0
  """Seeds the synthetic videos and captions, and the teacher's noise."""

  @classmethod
  def from_config(cls, config: Config) -> DatasetConfig:
    """The dataset fields of a trainer config (the teacher a run pretrains is not known here: random)."""
    d = config.data
    return cls(
      model=config.model,
      teacher=config.teacher,
      captions=d.path,
      frames=d.frames,
      height=d.height,
      width=d.width,
      text_len=d.text_len,
      batch_size=config.batch_size,
      compute_dtype=config.compute_dtype,
      seed=config.seed,
    )

  def teacher_model(self):
    return self.model.wan(attention=AttentionConfig(kind="dense"), compute_dtype=self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class Args:
  """The command line of ``train.make_dataset``."""

  config: DatasetConfig
  out: str
  """The dataset folder to create (it must not exist)."""
  source: Literal["synthetic", "teacher"] = "synthetic"
  """synthetic: moving shapes; teacher: the teacher's samples for the captions."""
  num_examples: int = 256
  """Videos to write."""
  examples_per_shard: int = 64
  """Videos per safetensors shard."""
  num_steps: int = 30
  """With --source teacher: Euler steps per sample."""
  shift: float = 5.0
  """With --source teacher: timestep shift of the sampler (Wan samples with 5)."""


def synthetic(config: DatasetConfig, num_examples: int) -> MovingShapes:
  return sources.synthetic(
    num_examples, config.frames, config.height, config.width, config.text_len, config.model, config.seed
  )


def captions(config: DatasetConfig, num_examples: int) -> Source:
  """Where teacher samples get their text: ``config.captions`` if set, else synthetic captions."""
  if config.captions:
    return sources.dataset(config.captions, config.model, field="--config.captions")
  return synthetic(config, num_examples)


def teacher_examples(
  config: DatasetConfig, num_examples: int, *, num_steps: int, shift: float
) -> Iterator[dict[str, np.ndarray]]:
  """Teacher samples, ``config.batch_size`` at a time; noise for example i depends on (seed, i) only."""
  teacher_config = config.teacher_model()
  mesh = sharding.make_mesh(-1, 1)
  graphdef, state = abstract_model(teacher_config)
  shardings = sharding.param_shardings(state, mesh)
  params, description = load_teacher(config.teacher, teacher_config, state.to_pure_dict(), shardings, config.seed)
  print(f"teacher: {description}")
  texts = captions(config, num_examples)
  latent_shape = (config.frames, config.height, config.width, config.model.in_channels)
  dtype = teacher_config.compute_dtype

  @jax.jit
  def sample(params, noise, context):
    def velocity(x, t):
      return nnx.merge(graphdef, params)(x.astype(dtype), t, context.astype(dtype)).astype(x.dtype)

    return flow.euler_sample(velocity, noise, num_steps=num_steps, shift=shift)

  key = jax.random.key(config.seed)
  for start in range(0, num_examples, config.batch_size):
    indices = range(start, min(start + config.batch_size, num_examples))
    context = np.stack([texts.get(i % len(texts))["context"] for i in indices])
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), latent_shape) for i in indices])
    latents = np.asarray(sample(params, noise, context))
    for row in range(len(indices)):
      yield {"latents": latents[row], "context": context[row]}


def check(args: Args) -> None:
  config = args.config
  validate_model(config)
  require = checker(config)
  for axis, name in enumerate(("frames", "height", "width")):
    patch = config.model.patch_size[axis]
    require(
      getattr(config, name) >= 1 and getattr(config, name) % patch == 0,
      name,
      f"must be a positive multiple of the patch size {patch}",
    )
  grid = patch_grid(config.model, config.frames, config.height, config.width)
  require(max(grid) <= config.model.rope_max_seq_len, "model.rope_max_seq_len", f"must cover the patch grid {grid}")
  require(config.text_len >= 3, "text_len", "must be >= 3")
  require(config.batch_size >= 1, "batch_size", "must be >= 1")
  require(config.seed >= 0, "seed", "must be >= 0")
  for name in ("num_examples", "examples_per_shard", "num_steps"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.shift <= 0:
    raise ValueError(f"--shift must be > 0, got {args.shift}")


@errors.command
def main(argv: list[str] | None = None) -> int:
  args, code = cli.parse(
    Args,
    argv,
    prog="train.make_dataset",
    description=__doc__,
    presets=PRESETS,
    default="tiny",
    project=DatasetConfig.from_config,
    check=check,
  )
  if code is not None:
    return code
  check_new_directory(args.out, "--out")  # before the sampling, which is the long part
  config, n = args.config, args.num_examples
  if args.source == "teacher" and config.teacher == "random":
    print("note: --config.teacher=random samples an untrained model; pass a diffusers folder or a workdir")
  if args.source == "synthetic":
    shapes = synthetic(config, n)
    examples = (shapes.get(i) for i in range(n))
  else:
    examples = teacher_examples(config, n, num_steps=args.num_steps, shift=args.shift)
  manifest = write_dataset(args.out, tqdm(examples, total=n, unit="video"), examples_per_shard=args.examples_per_shard)
  print(
    f"wrote {manifest['num_examples']} examples in {len(manifest['shards'])} shards to {args.out} "
    f"(latents {manifest['latent_shape']}, text {manifest['text_shape']})"
  )
  print(f"train on it: {cli.command('train.distill')} --config.data.path={args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
