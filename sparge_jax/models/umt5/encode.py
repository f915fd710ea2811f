"""Prompt embeddings for Wan: tokenize, encode, and zero everything past each prompt's tokens."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparge_jax.models.umt5.model import UMT5Encoder
from sparge_jax.models.umt5.tokenizer import WanTokenizer


@nnx.jit
def _encode_trimmed(encoder: UMT5Encoder, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  hidden = encoder(input_ids, attention_mask)
  lengths = jnp.sum(attention_mask != 0, axis=1)
  kept = jnp.arange(input_ids.shape[1])[None, :] < lengths[:, None]
  return jnp.where(kept[..., None], hidden, jnp.zeros((), hidden.dtype))


def encode_prompts(
  tokenizer: WanTokenizer, encoder: UMT5Encoder, prompts: str | Sequence[str], max_length: int = 512
) -> jax.Array:
  """Text embeddings [batch, max_length, d_model] in the encoder's dtype, as diffusers'
  `WanPipeline._get_t5_prompt_embeds`: the encoder's output for each prompt's tokens (its `</s>` included),
  then zeros up to `max_length`. Compiles once per (batch, max_length).
  """
  # Any tokenizer with WanTokenizer's call signature will do (benchmarks use fixed ids of real lengths).
  if not callable(tokenizer):
    raise ValueError(f"tokenizer must be a WanTokenizer (load_tokenizer) or alike, got {type(tokenizer).__name__}")
  if not isinstance(encoder, UMT5Encoder):
    raise ValueError(f"encoder must be a UMT5Encoder (load_umt5_encoder), got {type(encoder).__name__}")
  input_ids, attention_mask = tokenizer(prompts, max_length)
  return _encode_trimmed(encoder, jnp.asarray(input_ids), jnp.asarray(attention_mask))
