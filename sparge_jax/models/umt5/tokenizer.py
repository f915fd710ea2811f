"""Wan's prompt tokenizer: a folder's `tokenizer.json` through the `tokenizers` package (no transformers).

    tokenizer = load_tokenizer("Wan2.1-T2V-1.3B-Diffusers/tokenizer")
    input_ids, attention_mask = tokenizer(["A cat walks on the grass"], max_length=512)

As diffusers' `WanPipeline` calls its tokenizer: each prompt is cleaned (`prompt_clean`), tokenized with the
end-of-sequence token `</s>` appended (T5's template), truncated to `max_length` tokens (the `</s>` kept)
and padded on the right with the pad token to exactly `max_length`.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

TOKENIZER_NAME = "tokenizer.json"
# Where a tokenizer folder names its special tokens, in order of precedence.
_SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_DEFAULT_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>"}


# Unicode White_Space, as the `regex` package's \s (diffusers' choice): Python's \s also takes \x1c-\x1f.
_WHITESPACE_RUN = re.compile(r"[^\S\x1c-\x1f]+")


def prompt_clean(text: str) -> str:
  """diffusers' Wan `prompt_clean` without ftfy (optional there): HTML entities unescaped twice, ends
  stripped, whitespace runs collapsed to one space."""
  text = html.unescape(html.unescape(text)).strip()
  return _WHITESPACE_RUN.sub(" ", text).strip()


class WanTokenizer:
  """Prompts -> (input_ids, attention_mask), int32 [batch, max_length]; see the module docstring."""

  def __init__(self, tokenizer: Tokenizer, *, pad_token: str = "<pad>", eos_token: str = "</s>"):
    ids = {}
    for name, token in (("pad_token", pad_token), ("eos_token", eos_token)):
      ids[name] = tokenizer.token_to_id(token)
      if ids[name] is None:
        raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
    self.pad_token, self.pad_id = pad_token, ids["pad_token"]
    self.eos_token, self.eos_id = eos_token, ids["eos_token"]
    self._tokenizer = tokenizer
    # transformers' T5Tokenizer always appends </s> with this template, whatever tokenizer.json says.
    self._tokenizer.post_processor = TemplateProcessing(
      single=f"$A {eos_token}", special_tokens=[(eos_token, self.eos_id)]
    )

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def __call__(self, prompts: str | Sequence[str], max_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """prompts: one prompt or a list. Returns input_ids, attention_mask: int32 [batch, max_length]."""
    if isinstance(prompts, str):
      prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
      raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    if not isinstance(max_length, int | np.integer) or isinstance(max_length, bool) or max_length < 2:
      raise ValueError(
        f"max_length must be an integer >= 2 (room for a token and {self.eos_token}), got {max_length!r}"
      )
    tokenizer = self._tokenizer
    tokenizer.enable_truncation(max_length=int(max_length), direction="right")
    tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_token=self.pad_token, length=int(max_length))
    encodings = tokenizer.encode_batch([prompt_clean(p) for p in prompts], add_special_tokens=True)
    input_ids = np.array([e.ids for e in encodings], np.int32)
    attention_mask = np.array([e.attention_mask for e in encodings], np.int32)
    return input_ids, attention_mask


def _special_tokens(folder: Path) -> dict[str, str]:
  """pad_token and eos_token as the folder's tokenizer_config.json (or special_tokens_map.json) names them."""
  tokens = dict(_DEFAULT_TOKENS)
  for name in reversed(_SPECIAL_TOKEN_FILES):
    path = folder / name
    if not path.is_file():
      continue
    try:
      fields = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: cannot be read as JSON ({e})") from None
    for key in tokens:
      value = fields.get(key) if isinstance(fields, dict) else None
      if isinstance(value, dict):  # an AddedToken: {"content": "<pad>", ...}
        value = value.get("content")
      if value is not None and not isinstance(value, str):
        raise ValueError(f"{path}: {key} must be a token string, got {value!r}")
      if value is not None:
        tokens[key] = value
  return tokens


def load_tokenizer(folder: str | os.PathLike) -> WanTokenizer:
  """The tokenizer of a diffusers Wan folder's `tokenizer/` (its tokenizer.json and special-token names)."""
  folder = Path(folder)
  path = folder / TOKENIZER_NAME
  if not path.is_file():
    raise ValueError(f"folder {folder} has no {TOKENIZER_NAME}")
  try:
    tokenizer = Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception for malformed files
    raise ValueError(f"{path}: not a readable tokenizers file ({e})") from None
  try:
    return WanTokenizer(tokenizer, **_special_tokens(folder))
  except ValueError as e:
    raise ValueError(f"{folder}: {e}") from None
