"""Wan2.1 video DiT: the model (`model`) and diffusers checkpoint loading/saving (`diffusers_io`)."""

from sparge_jax.models.wan.diffusers_io import load_diffusers, save_diffusers
from sparge_jax.models.wan.model import (
  AttentionConfig,
  LayerSparsity,
  WanConfig,
  WanModel,
  tiny,
  wan2_1_1_3b,
  wan2_1_14b,
)

__all__ = [
  "AttentionConfig",
  "LayerSparsity",
  "WanConfig",
  "WanModel",
  "tiny",
  "wan2_1_1_3b",
  "wan2_1_14b",
  "load_diffusers",
  "save_diffusers",
]
