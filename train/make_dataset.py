"""Write a latent-video dataset in the shard format of ``train.data``.

    python -m train.make_dataset --out data/shapes --num_examples 512                  # synthetic
    python -m train.make_dataset --out data/teacher --source teacher --config.teacher=PATH \\
        --num_examples 256 --num_steps 30                                               # teacher samples

``synthetic``: procedural moving shapes with matching captions (``train.data.MovingShapes``), at the
latent size of ``--config`` (``data.frames/height/width``, the model's channels and text width).
``teacher``: the published recipes fine-tune on teacher-generated latents; this integrates the dense
teacher (``--config.teacher``) with the Euler sampler from seeded noise, conditioned on the captions
of ``--config.data.path`` if set, else on the synthetic captions.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from . import flow, sharding, sources
from .configs import PRESETS, Config, cli, validate
from .data import MovingShapes, Source, write_dataset
from .models import abstract_model, model_configs
from .teacher import load_teacher

FLAGS = {
  "out": None,
  "source": "synthetic",
  "num_examples": 256,
  "examples_per_shard": 64,
  "num_steps": 30,
  "shift": 5.0,
  "seed": 0,
}


def synthetic(config: Config, num_examples: int) -> MovingShapes:
  d = config.data
  return sources.synthetic(num_examples, d.frames, d.height, d.width, d.text_len, config.model, config.seed)


def captions(config: Config, num_examples: int) -> Source:
  """Where teacher samples get their text: ``config.data.path`` if set, else synthetic captions."""
  return sources.dataset(config.data.path, config.model) if config.data.path else synthetic(config, num_examples)


def teacher_examples(
  config: Config, num_examples: int, *, num_steps: int, shift: float, seed: int
) -> Iterator[dict[str, np.ndarray]]:
  """Teacher samples, ``config.batch_size`` at a time; noise for example i depends on (seed, i) only."""
  teacher_config, _ = model_configs(config)
  mesh = sharding.make_mesh(-1, 1)
  graphdef, state = abstract_model(teacher_config)
  shardings = sharding.param_shardings(state, mesh)
  params, description = load_teacher(config.teacher, teacher_config, state.to_pure_dict(), shardings, config.seed)
  print(f"teacher: {description}")
  texts = captions(config, num_examples)
  latent_shape = (config.data.frames, config.data.height, config.data.width, config.model.in_channels)
  dtype = teacher_config.compute_dtype

  @jax.jit
  def sample(params, noise, context):
    def velocity(x, t):
      return nnx.merge(graphdef, params)(x.astype(dtype), t, context.astype(dtype)).astype(x.dtype)

    return flow.euler_sample(velocity, noise, num_steps=num_steps, shift=shift)

  key = jax.random.key(seed)
  for start in range(0, num_examples, config.batch_size):
    indices = range(start, min(start + config.batch_size, num_examples))
    context = np.stack([texts.get(i % len(texts))["context"] for i in indices])
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), latent_shape) for i in indices])
    latents = np.asarray(sample(params, noise, context))
    for row in range(len(indices)):
      yield {"latents": latents[row], "context": context[row]}


def _check(config: Config, flags) -> None:
  validate(config)
  if not flags["out"]:
    raise ValueError("--out is required: the dataset directory to create")
  if flags["source"] not in ("synthetic", "teacher"):
    raise ValueError(f"--source must be synthetic or teacher, got {flags['source']!r}")
  for name in ("num_examples", "examples_per_shard", "num_steps"):
    if flags[name] < 1:
      raise ValueError(f"--{name} must be >= 1, got {flags[name]}")


def main(argv: list[str] | None = None) -> int:
  config, flags, code = cli.parse_or_exit_code(__doc__, argv, FLAGS, _check, presets=PRESETS, default="tiny")
  if code is not None:
    return code
  if flags["source"] == "teacher" and config.teacher == "random":
    print("note: --config.teacher=random samples an untrained model; pass a diffusers folder or a workdir")
  n = flags["num_examples"]
  try:  # a teacher folder that cannot be loaded, or an --out that cannot be written
    if flags["source"] == "synthetic":
      shapes = synthetic(config, n)
      examples = (shapes.get(i) for i in range(n))
    else:
      examples = teacher_examples(config, n, num_steps=flags["num_steps"], shift=flags["shift"], seed=flags["seed"])
    manifest = write_dataset(
      flags["out"], tqdm(examples, total=n, unit="video"), examples_per_shard=flags["examples_per_shard"]
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(
    f"wrote {manifest['num_examples']} examples in {len(manifest['shards'])} shards to {flags['out']} "
    f"(latents {manifest['latent_shape']}, text {manifest['text_shape']})"
  )
  print(f"train on it: python -m train.distill --config.data.path={flags['out']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
