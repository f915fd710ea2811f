"""Damaged and hostile files given to the loaders: every fault is a one-line ValueError naming the file.

`SafetensorsFolder` (the shared safetensors reader of the model loaders) and the dataset shards of
`train.data`. The diffusers config.json cases are in tests/test_wan_diffusers_io.py.
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from sparge_jax.models.safetensors_io import SafetensorsFolder
from train import data

WEIGHTS = "model.safetensors"
INDEX = WEIGHTS + ".index.json"


def _tensors(seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"a.weight": rng.normal(size=(7, 5)).astype(np.float32), "b.bias": rng.normal(size=(3,)).astype(np.float32)}


@pytest.fixture
def single(tmp_path):
  folder = tmp_path / "single"
  folder.mkdir()
  save_file(_tensors(), folder / WEIGHTS)
  return folder


@pytest.fixture
def sharded(tmp_path):
  folder = tmp_path / "sharded"
  folder.mkdir()
  tensors = _tensors(1)
  save_file({"a.weight": tensors["a.weight"]}, folder / "shard-1.safetensors")
  save_file({"b.bias": tensors["b.bias"]}, folder / "shard-2.safetensors")
  index = {"weight_map": {"a.weight": "shard-1.safetensors", "b.bias": "shard-2.safetensors"}}
  (folder / INDEX).write_text(json.dumps(index))
  return folder, tensors


def _raises(folder, message):
  with pytest.raises(ValueError) as e:
    SafetensorsFolder(folder, WEIGHTS)
  assert "\n" not in str(e.value)
  assert message in str(e.value), str(e.value)


def test_intact_folders_read_back_exactly(single, sharded):
  with SafetensorsFolder(single, WEIGHTS) as weights:
    assert weights.shapes == {"a.weight": (7, 5), "b.bias": (3,)}
    np.testing.assert_array_equal(weights.get("a.weight"), _tensors()["a.weight"])
    with pytest.raises(KeyError, match=f"{single} has no tensor 'c'"):
      weights.get("c")
  folder, tensors = sharded
  with SafetensorsFolder(folder, WEIGHTS) as weights:
    for key, value in tensors.items():
      np.testing.assert_array_equal(weights.get(key), value)


@pytest.mark.parametrize(
  "damage, message",
  [
    (lambda b: b[: len(b) - 40], "incomplete metadata, file not fully covered"),  # the data section cut short
    (lambda b: b[:20], "invalid header length"),  # the header cut
    (lambda b: b"", "header too small"),
    (lambda b: bytes(np.random.default_rng(0).integers(0, 256, len(b), dtype=np.uint8)), "header too large"),
    (lambda b: b[:8] + b"#" + b[9:], "Error while deserializing header"),  # garbled JSON header
  ],
)
def test_a_truncated_or_garbled_file_is_named_when_opened(single, damage, message):
  path = single / WEIGHTS
  path.write_bytes(damage(path.read_bytes()))
  _raises(single, f"{path}: not a readable safetensors file (")
  _raises(single, message)


@pytest.mark.parametrize(
  "index, message",
  [
    ("{not json", "not valid JSON"),
    (b"\xff\xfe", "cannot be read"),
    ("[1, 2]", "has no 'weight_map' object"),
    ('{"metadata": {}}', "has no 'weight_map' object"),
    ('{"weight_map": {}}', "has no 'weight_map' object"),
    ('{"weight_map": {"a.weight": 3}}', "'weight_map' values must be file names, got [3]"),
    ('{"weight_map": {"a.weight": "/etc/passwd"}}', "shard path '/etc/passwd' must be a relative path inside"),
    ('{"weight_map": {"a.weight": "../single/model.safetensors"}}', "must be a relative path inside"),
    ('{"weight_map": {"a.weight": "shard-1.safetensors", "c": "shard-3.safetensors"}}', "['shard-3.safetensors']"),
    ('{"weight_map": {"a.weight": "shard-1.safetensors", "b.bias": "shard-1.safetensors"}}', "puts 'b.bias' in"),
  ],
)
def test_a_bad_index_is_named_and_paths_stay_inside_the_folder(sharded, single, index, message):
  folder, _ = sharded
  path = folder / INDEX
  path.write_bytes(index if isinstance(index, bytes) else index.encode())
  _raises(folder, f"{path}: ")
  _raises(folder, message)


def test_a_link_out_of_the_folder_is_refused_and_a_damaged_shard_named(sharded, single):
  folder, _ = sharded
  os.symlink(single / WEIGHTS, folder / "link.safetensors")
  (folder / INDEX).write_text(json.dumps({"weight_map": {"a.weight": "link.safetensors"}}))
  _raises(folder, "shard path 'link.safetensors' leads outside")
  (folder / INDEX).write_text(
    json.dumps({"weight_map": {"a.weight": "shard-1.safetensors", "b.bias": "shard-2.safetensors"}})
  )
  shard = folder / "shard-2.safetensors"
  shard.write_bytes(shard.read_bytes()[:-4])
  _raises(folder, f"{shard}: not a readable safetensors file")


# ----------------------------------------------------------------------------- dataset shards


@pytest.fixture
def dataset(tmp_path):
  shapes = data.MovingShapes(6, (2, 4, 4, 3), (3, 5), seed=1)
  path = str(tmp_path / "dataset")
  data.write_dataset(path, (shapes.get(i) for i in range(6)), examples_per_shard=4)
  return path


def _edit_manifest(path, edit):
  file = os.path.join(path, data.MANIFEST)
  with open(file) as f:
    manifest = json.load(f)
  edit(manifest)
  with open(file, "w") as f:
    json.dump(manifest, f)


def _shard(manifest, **changes):
  manifest["shards"][0].update(changes)


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda m: _shard(m, file="../outside.safetensors"), "shards[0].file '../outside.safetensors' must be a file name"),
    (lambda m: _shard(m, file="/etc/passwd"), "shards[0].file '/etc/passwd' must be a file name inside"),
    (lambda m: m["shards"][0].pop("file"), "shards[0] has no 'file' name"),
    (lambda m: _shard(m, num_examples="4"), "shards[0].num_examples must be a positive integer, got '4'"),
    (lambda m: _shard(m, bytes=None), "shards[0].bytes must be an integer, got None"),
    (lambda m: _shard(m, sha256="abc"), "shards[0].sha256 must be 64 hex digits, got 'abc'"),
    (lambda m: m.update(shards=[m["shards"][0], m["shards"][0]], num_examples=8), "two shards name the same file"),
    (lambda m: m.update(num_examples=7), "num_examples 7 is not the sum of the shards' num_examples"),
    (lambda m: m.update(latent_shape=[2, 4, 4]), "latent_shape must be 4 positive integers, got [2, 4, 4]"),
    (lambda m: m.update(text_shape=[3, "5"]), "text_shape must be 2 positive integers"),
    (lambda m: m.update(shards={}), "shards must be a non-empty list"),
    (lambda m: m.update(version=2), "format 'sparge-jax-latents' version 2, expected"),
  ],
)
def test_a_bad_manifest_names_the_field(dataset, edit, message):
  _edit_manifest(dataset, edit)
  with pytest.raises(ValueError) as e:
    data.ShardedDataset(dataset)
  assert str(e.value).startswith(f"corrupt manifest {os.path.join(dataset, data.MANIFEST)}: {message}")


def test_a_manifest_that_is_not_json_or_not_an_object(dataset):
  manifest = os.path.join(dataset, data.MANIFEST)
  for text, message in ((b"\xff\xfe{", "not valid JSON"), (b"[1]", "a JSON list, not an object")):
    with open(manifest, "wb") as f:
      f.write(text)
    with pytest.raises(ValueError, match=f"^corrupt manifest {manifest}: {message}"):
      data.ShardedDataset(dataset)


def test_a_shard_replaced_by_another_valid_file_is_caught_at_first_read(dataset):
  """Same size and shapes, other values: only the sha256 can tell, and it does before any example is used."""
  reference = data.ShardedDataset(dataset)
  first = reference.get(0)
  path = os.path.join(dataset, "shard-00000.safetensors")
  with data.safetensors.safe_open(path, "numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  size = os.path.getsize(path)
  save_file({k: v[::-1].copy() for k, v in tensors.items()}, path)
  assert os.path.getsize(path) == size
  dataset_again = data.ShardedDataset(dataset)  # size and header agree
  np.testing.assert_array_equal(dataset_again.get(5)["latents"], reference.get(5)["latents"])  # the other shard
  with pytest.raises(ValueError, match=f"^corrupt dataset shard {path}: sha256 does not match the manifest$"):
    dataset_again.get(0)
  assert first["latents"].shape == (2, 4, 4, 3)
