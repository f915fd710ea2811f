"""Where training videos come from: a shard folder (``train.data.ShardedDataset``) or synthetic shapes, each
split into the examples trained on and the held-out ones the eval measures."""

from __future__ import annotations

import numpy as np

from sparge_jax.models.wan import WanConfig

from .configs import Config
from .data import MovingShapes, ShardedDataset, Source


class Subset:
  """Examples ``start .. stop - 1`` of a source, as a source."""

  def __init__(self, source: Source, start: int, stop: int):
    if not 0 <= start < stop <= len(source):
      raise ValueError(f"subset [{start}, {stop}) is not a non-empty range of the {len(source)} examples")
    self.source, self.start, self.stop = source, start, stop
    self.latent_shape, self.text_shape = source.latent_shape, source.text_shape

  def __len__(self) -> int:
    return self.stop - self.start

  def get(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(f"example {index} out of range for {len(self)} examples")
    return self.source.get(self.start + index)


def synthetic(
  num_examples: int, frames: int, height: int, width: int, text_len: int, model_config: WanConfig, seed: int
) -> MovingShapes:
  """Moving shapes at the latent size ``frames x height x width`` with the model's channels and text width."""
  return MovingShapes(
    num_examples, (frames, height, width, model_config.in_channels), (text_len, model_config.text_dim), seed=seed
  )


def dataset(path: str, model_config: WanConfig, field: str = "--config.data.path") -> ShardedDataset:
  """The shard folder at ``path``; ValueError naming ``field`` if its latents or text do not fit the model."""
  source = ShardedDataset(path)
  if source.latent_shape[-1] != model_config.in_channels or source.text_shape[-1] != model_config.text_dim:
    raise ValueError(
      f"{field}={path!r}: latents {source.latent_shape} / text {source.text_shape} do not fit the model "
      f"(in_channels {model_config.in_channels}, text_dim {model_config.text_dim})"
    )
  return source


def make_sources(config: Config, model_config: WanConfig) -> tuple[Source, Source]:
  """(training examples, held-out examples) of the run.

  A shard folder (``config.data.path``) keeps its last ``data.heldout_examples`` examples out of training.
  Synthetic shapes (seeded by ``config.seed``) make that many more videos than ``data.synthetic_examples``,
  so the training set is the same whatever is held out.
  """
  d, heldout = config.data, config.data.heldout_examples
  if d.path:
    source = dataset(d.path, model_config)
    if heldout >= len(source):
      raise ValueError(
        f"--config.data.heldout_examples={heldout}: the dataset {d.path!r} has only {len(source)} examples; "
        "hold out fewer"
      )
    train = len(source) - heldout
  else:
    train = d.synthetic_examples
    source = synthetic(train + heldout, d.frames, d.height, d.width, d.text_len, model_config, config.seed)
  return Subset(source, 0, train), Subset(source, train, train + heldout)


def make_source(config: Config, model_config: WanConfig) -> Source:
  """The run's training examples (``make_sources``)."""
  return make_sources(config, model_config)[0]
