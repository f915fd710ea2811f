"""Where training videos come from: a shard folder (``train.data.ShardedDataset``) or synthetic shapes."""

from __future__ import annotations

from sparge_jax.models.wan import WanConfig

from .configs import Config
from .data import MovingShapes, ShardedDataset, Source


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


def make_source(config: Config, model_config: WanConfig) -> Source:
  """The run's training data: ``config.data.path`` if set, else synthetic moving shapes seeded by ``config.seed``."""
  d = config.data
  if d.path:
    return dataset(d.path, model_config)
  return synthetic(d.synthetic_examples, d.frames, d.height, d.width, d.text_len, model_config, config.seed)
