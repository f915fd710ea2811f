"""Training data: latent-video shards on disk and a synthetic moving-shapes source (``train.loader`` batches them).

On-disk format (a directory, written atomically by ``write_dataset``)::

    DIR/manifest.json          {"format": "sparge-jax-latents", "version": 1,
                                "num_examples": N,
                                "latent_shape": [frames, height, width, channels],
                                "text_shape": [text_len, text_dim], "dtype": "float32",
                                "shards": [{"file": "shard-00000.safetensors",
                                            "num_examples": n, "bytes": b, "sha256": "..."}, ...]}
    DIR/shard-00000.safetensors  tensors "latents": [n, frames, height, width, channels]
                                         "context": [n, text_len, text_dim]

Latents are VAE latents already normalised the way the model expects (Wan: per-channel mean/std);
``context`` is the text encoder's output (Wan: umT5, zero-padded to 512 tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import safetensors
import safetensors.numpy

FORMAT = "sparge-jax-latents"
VERSION = 1
MANIFEST = "manifest.json"


class Source(Protocol):
  """Random access to examples; ``get(i)`` returns ``{"latents": [F, H, W, C], "context": [L, D]}``."""

  latent_shape: tuple[int, ...]
  text_shape: tuple[int, ...]

  def __len__(self) -> int: ...

  def get(self, index: int) -> dict[str, np.ndarray]: ...


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def write_dataset(path: str, examples: Iterable[dict[str, np.ndarray]], *, examples_per_shard: int = 64) -> dict:
  """Write ``examples`` (dicts with "latents" and "context") as a shard directory at ``path``.

  Everything goes to a temporary sibling directory that is renamed at the end, so ``path``
  either does not exist or holds a complete dataset. Returns the manifest.
  """
  if examples_per_shard < 1:
    raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
  if os.path.exists(path):
    raise ValueError(f"path {path!r} already exists; choose a new dataset directory")
  tmp = f"{path.rstrip(os.sep)}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  shards, pending = [], []
  latent_shape = text_shape = dtype = None

  def flush():
    name = f"shard-{len(shards):05d}.safetensors"
    file = os.path.join(tmp, name)
    safetensors.numpy.save_file(
      {
        "latents": np.stack([e["latents"] for e in pending]),
        "context": np.stack([e["context"] for e in pending]),
      },
      file,
    )
    shards.append({"file": name, "num_examples": len(pending), "bytes": os.path.getsize(file), "sha256": _sha256(file)})
    pending.clear()

  try:
    for i, example in enumerate(examples):
      latents = np.asarray(example["latents"])
      context = np.asarray(example["context"])
      if latent_shape is None:
        latent_shape, text_shape, dtype = latents.shape, context.shape, latents.dtype
      if latents.shape != latent_shape or context.shape != text_shape or latents.dtype != dtype:
        raise ValueError(
          f"example {i}: latents {latents.shape} {latents.dtype} / context {context.shape} do not "
          f"match the first example's {latent_shape} {dtype} / {text_shape}"
        )
      pending.append({"latents": latents, "context": context.astype(dtype)})
      if len(pending) == examples_per_shard:
        flush()
    if pending:
      flush()
    if not shards:
      raise ValueError("examples is empty; a dataset needs at least one example")
    manifest = {
      "format": FORMAT,
      "version": VERSION,
      "num_examples": sum(s["num_examples"] for s in shards),
      "latent_shape": list(latent_shape),
      "text_shape": list(text_shape),
      "dtype": str(dtype),
      "shards": shards,
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _positive_ints(value, length: int) -> bool:
  return (
    isinstance(value, list)
    and len(value) == length
    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
  )


def _count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _shard_problem(index: int, shard) -> str | None:
  if not isinstance(shard, dict):
    return f"shards[{index}] is not an object"
  file = shard.get("file")
  if not isinstance(file, str) or not file:
    return f"shards[{index}] has no 'file' name"
  # Shards live in the dataset directory itself: no absolute paths, no way out of it.
  if os.path.isabs(file) or os.path.basename(file) != file or file in (".", ".."):
    return f"shards[{index}].file {file!r} must be a file name inside the dataset directory"
  if not _count(shard.get("num_examples")):
    return f"shards[{index}].num_examples must be a positive integer, got {shard.get('num_examples')!r}"
  if not (isinstance(shard.get("bytes"), int) and not isinstance(shard.get("bytes"), bool)):
    return f"shards[{index}].bytes must be an integer, got {shard.get('bytes')!r}"
  digest = shard.get("sha256")
  if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
    return f"shards[{index}].sha256 must be 64 hex digits, got {digest!r}"
  return None


def read_manifest(path: str) -> dict:
  """The manifest of the dataset directory `path`, every field checked.

  Raises ``FileNotFoundError`` when there is none and ``ValueError`` naming the manifest and the
  field when it is unreadable, not JSON, of another format, or inconsistent.
  """
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(
      f"no dataset at {path!r}: {MANIFEST} is missing (create one with `python -m train.make_dataset`)"
    )
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
  except ValueError as e:  # invalid JSON or UTF-8
    raise ValueError(f"corrupt manifest {manifest_path}: not valid JSON ({e})") from None
  if not isinstance(manifest, dict):
    problem = f"a JSON {type(manifest).__name__}, not an object"
  elif manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    problem = f"format {manifest.get('format')!r} version {manifest.get('version')!r}, expected {FORMAT!r} {VERSION}"
  elif not _positive_ints(manifest.get("latent_shape"), 4):
    problem = f"latent_shape must be 4 positive integers, got {manifest.get('latent_shape')!r}"
  elif not _positive_ints(manifest.get("text_shape"), 2):
    problem = f"text_shape must be 2 positive integers, got {manifest.get('text_shape')!r}"
  elif not isinstance(manifest.get("shards"), list) or not manifest["shards"]:
    problem = "shards must be a non-empty list"
  else:
    problem = next((p for i, s in enumerate(manifest["shards"]) if (p := _shard_problem(i, s))), None)
    if problem is None and manifest.get("num_examples") != sum(s["num_examples"] for s in manifest["shards"]):
      problem = f"num_examples {manifest.get('num_examples')!r} is not the sum of the shards' num_examples"
    files = [s["file"] for s in manifest["shards"]] if problem is None else []
    if len(set(files)) != len(files):
      problem = "two shards name the same file"
  if problem:
    raise ValueError(f"corrupt manifest {manifest_path}: {problem}")
  return manifest


class ShardedDataset:
  """A shard directory written by ``write_dataset``.

  Opening checks the manifest and that every shard exists with the recorded size and tensor
  shapes; the first read of a shard checks its sha256. Problems raise ``FileNotFoundError``
  (missing) or ``ValueError`` (corrupt) naming the file.
  """

  def __init__(self, path: str):
    manifest = read_manifest(path)
    self.path = path
    self.latent_shape = tuple(manifest["latent_shape"])
    self.text_shape = tuple(manifest["text_shape"])
    self._shards = manifest["shards"]
    self._starts = np.cumsum([0] + [s["num_examples"] for s in self._shards])
    self._verified: set[int] = set()
    self._open: dict[int, safetensors.safe_open] = {}
    for shard in self._shards:
      self._check_header(shard)

  def _check_header(self, shard: dict) -> None:
    file = os.path.join(self.path, shard["file"])
    if not os.path.isfile(file):
      raise FileNotFoundError(f"dataset shard {file} is missing")
    if os.path.getsize(file) != shard["bytes"]:
      raise ValueError(f"corrupt dataset shard {file}: {os.path.getsize(file)} bytes, manifest says {shard['bytes']}")
    try:
      with safetensors.safe_open(file, framework="numpy") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged header
      raise ValueError(f"corrupt dataset shard {file}: {e}") from None
    n = shard["num_examples"]
    want = {"latents": (n, *self.latent_shape), "context": (n, *self.text_shape)}
    if shapes != want:
      raise ValueError(f"corrupt dataset shard {file}: tensors {shapes}, expected {want}")

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getstate__(self):  # for the loader's worker processes: open files stay behind, shards are re-verified
    return {k: v for k, v in self.__dict__.items() if k not in ("_verified", "_open")}

  def __setstate__(self, state):
    self.__dict__.update(state, _verified=set(), _open={})

  def _shard(self, index: int) -> safetensors.safe_open:
    if index not in self._verified:
      file = os.path.join(self.path, self._shards[index]["file"])
      if _sha256(file) != self._shards[index]["sha256"]:
        raise ValueError(f"corrupt dataset shard {file}: sha256 does not match the manifest")
      try:
        self._open[index] = safetensors.safe_open(file, framework="numpy")
      except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"corrupt dataset shard {file}: {e}") from None
      self._verified.add(index)
    return self._open[index]

  def get(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(f"example {index} out of range for {len(self)} examples")
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    row = index - int(self._starts[shard])
    f = self._shard(shard)
    try:
      return {k: f.get_slice(k)[row : row + 1][0] for k in ("latents", "context")}
    except Exception as e:  # a shard changed on disk after it was verified
      file = os.path.join(self.path, self._shards[shard]["file"])
      raise ValueError(f"corrupt dataset shard {file}: example {row} cannot be read ({e})") from None


class MovingShapes:
  """Procedural latent videos of 1–3 shapes moving in straight lines, with a matching "caption".

  Each shape (disk, square or ring) has one of 8 palette colours (a vector over the latent
  channels) and one of 8 directions; it wraps around the frame edges. The context has one
  token per shape, the sum of fixed random embeddings of its kind, colour and direction, and
  zeros after (like Wan's zero-padded text), so text and motion are correlated and attention
  has real spatial/temporal structure to find. ``get(i)`` depends only on ``(seed, i)``.
  """

  KINDS, COLOURS, DIRECTIONS = 3, 8, 8

  def __init__(
    self, num_examples: int, latent_shape: tuple[int, int, int, int], text_shape: tuple[int, int], seed: int = 0
  ):
    if num_examples < 1:
      raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if len(latent_shape) != 4 or min(latent_shape) < 1:
      raise ValueError(f"latent_shape must be (frames, height, width, channels), got {latent_shape}")
    if len(text_shape) != 2 or text_shape[0] < 3 or text_shape[1] < 1:
      raise ValueError(f"text_shape must be (text_len >= 3, text_dim), got {text_shape}")
    self.latent_shape, self.text_shape = tuple(latent_shape), tuple(text_shape)
    self.num_examples, self.seed = num_examples, seed
    tables = np.random.default_rng([seed, 0x5EED])
    channels, text_dim = latent_shape[-1], text_shape[-1]
    self._palette = tables.normal(size=(self.COLOURS, channels)).astype(np.float32)
    n_attributes = self.KINDS + self.COLOURS + self.DIRECTIONS
    self._attribute_embeddings = (tables.normal(size=(n_attributes, text_dim)) / np.sqrt(3.0)).astype(np.float32)

  def __len__(self) -> int:
    return self.num_examples

  def get(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"example {index} out of range for {self.num_examples} examples")
    frames, height, width, channels = self.latent_shape
    rng = np.random.default_rng([self.seed, index])
    y = (np.arange(height, dtype=np.float32) + 0.5) / height
    x = (np.arange(width, dtype=np.float32) + 0.5) / width
    f = np.arange(frames, dtype=np.float32)[:, None, None]
    # A dim smooth background so empty regions are not constant.
    ramp = 0.6 * (
      np.cos(2 * np.pi * (y[:, None] * rng.uniform(0.5, 1.5) + x[None, :] * rng.uniform(0.5, 1.5) + rng.uniform()))
    )
    video = ramp[None, :, :, None] * rng.normal(size=channels).astype(np.float32)
    context = np.zeros(self.text_shape, np.float32)
    for token in range(rng.integers(1, 4)):
      kind, colour, direction = (rng.integers(self.KINDS), rng.integers(self.COLOURS), rng.integers(self.DIRECTIONS))
      radius = rng.uniform(0.12, 0.25)
      angle = 2 * np.pi * direction / self.DIRECTIONS
      speed = rng.uniform(0.03, 0.08)  # frame-widths per frame
      cy = rng.uniform() + speed * np.sin(angle) * f
      cx = rng.uniform() + speed * np.cos(angle) * f
      # Wrapped distances: shapes leave one edge and come back at the other.
      dy = (y[None, :, None] - cy + 0.5) % 1.0 - 0.5
      dx = (x[None, None, :] - cx + 0.5) % 1.0 - 0.5
      if kind == 0:
        inside = np.hypot(dy, dx) < radius
      elif kind == 1:
        inside = np.maximum(abs(dy), abs(dx)) < radius * 0.8
      else:
        inside = abs(np.hypot(dy, dx) - radius * 0.75) < radius * 0.25
      video = np.where(inside[..., None], self._palette[colour], video)
      context[token] = self._attribute_embeddings[
        [kind, self.KINDS + colour, self.KINDS + self.COLOURS + direction]
      ].sum(0)
    return {"latents": video.astype(np.float32), "context": context}
