"""UMT5 text encoder (Wan2.1's): the model (`model`), transformers folder loading (`loading`), the prompt
tokenizer (`tokenizer`) and Wan's prompt embeddings (`encode`)."""

from sparge_jax.models.umt5.encode import encode_prompts
from sparge_jax.models.umt5.loading import config_from_transformers, load_umt5_encoder
from sparge_jax.models.umt5.model import UMT5Config, UMT5Encoder, relative_position_buckets, umt5_xxl
from sparge_jax.models.umt5.tokenizer import WanTokenizer, load_tokenizer, prompt_clean

__all__ = [
  "UMT5Config",
  "UMT5Encoder",
  "WanTokenizer",
  "config_from_transformers",
  "encode_prompts",
  "load_tokenizer",
  "load_umt5_encoder",
  "prompt_clean",
  "relative_position_buckets",
  "umt5_xxl",
]
