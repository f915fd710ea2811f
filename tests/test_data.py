"""Shard format and synthetic moving shapes (train/data.py); the loader is tested in test_grain_input.py."""

import json
import os

import numpy as np
import pytest

from train import data

LATENT_SHAPE, TEXT_SHAPE = (4, 8, 8, 4), (6, 12)


@pytest.fixture
def shapes():
  return data.MovingShapes(23, LATENT_SHAPE, TEXT_SHAPE, seed=3)


@pytest.fixture
def dataset_dir(tmp_path, shapes):
  path = str(tmp_path / "ds")
  data.write_dataset(path, (shapes.get(i) for i in range(len(shapes))), examples_per_shard=5)
  return path


def test_moving_shapes_are_deterministic_structured_and_captioned(shapes):
  a, b = shapes.get(7), shapes.get(7)
  np.testing.assert_array_equal(a["latents"], b["latents"])
  assert a["latents"].shape == LATENT_SHAPE and a["context"].shape == TEXT_SHAPE
  assert not np.allclose(shapes.get(7)["latents"], shapes.get(8)["latents"])
  # Moving shapes: consecutive frames differ, but far less than unrelated videos do.
  video = a["latents"]
  motion = np.abs(np.diff(video, axis=0)).mean()
  assert 0 < motion < np.abs(video - shapes.get(8)["latents"]).mean()
  # One caption token per shape (1 to 3), zero padding after.
  tokens = np.abs(a["context"]).sum(-1) > 0
  assert 1 <= tokens.sum() <= 3 and not tokens[3:].any()
  # The same seed gives the same videos in a fresh instance; another seed does not.
  np.testing.assert_array_equal(data.MovingShapes(23, LATENT_SHAPE, TEXT_SHAPE, seed=3).get(7)["latents"], video)
  assert not np.allclose(data.MovingShapes(23, LATENT_SHAPE, TEXT_SHAPE, seed=4).get(7)["latents"], video)


def test_write_and_read_round_trip(dataset_dir, shapes):
  dataset = data.ShardedDataset(dataset_dir)
  assert len(dataset) == 23 and dataset.latent_shape == LATENT_SHAPE and dataset.text_shape == TEXT_SHAPE
  manifest = json.load(open(os.path.join(dataset_dir, data.MANIFEST)))
  assert [s["num_examples"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
  for i in (0, 4, 5, 22):
    for key in ("latents", "context"):
      np.testing.assert_array_equal(dataset.get(i)[key], shapes.get(i)[key])


def test_write_refuses_existing_path_and_leaves_nothing_on_error(tmp_path, dataset_dir, shapes):
  with pytest.raises(ValueError, match="already exists"):
    data.write_dataset(dataset_dir, [shapes.get(0)])
  bad = [shapes.get(0), {"latents": np.zeros((2, 2, 2, 2), np.float32), "context": shapes.get(0)["context"]}]
  with pytest.raises(ValueError, match="example 1"):
    data.write_dataset(str(tmp_path / "bad"), bad)
  assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_missing_manifest_and_missing_shard(tmp_path, dataset_dir):
  with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
    data.ShardedDataset(str(tmp_path / "nowhere"))
  os.remove(os.path.join(dataset_dir, "shard-00002.safetensors"))
  with pytest.raises(FileNotFoundError, match="shard-00002.safetensors is missing"):
    data.ShardedDataset(dataset_dir)


def test_truncated_shard(dataset_dir):
  path = os.path.join(dataset_dir, "shard-00001.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 10)
  with pytest.raises(ValueError, match="corrupt dataset shard .*shard-00001.*bytes"):
    data.ShardedDataset(dataset_dir)


def test_corrupt_shard_bytes_are_caught_on_first_read(dataset_dir):
  path = os.path.join(dataset_dir, "shard-00003.safetensors")
  with open(path, "r+b") as f:  # flip bytes inside the tensor data, same size, valid header
    f.seek(-20, os.SEEK_END)
    f.write(b"\xff" * 8)
  dataset = data.ShardedDataset(dataset_dir)
  dataset.get(0)  # other shards are fine
  with pytest.raises(ValueError, match="corrupt dataset shard .*shard-00003.*sha256"):
    dataset.get(16)


def test_corrupt_header_and_manifest(dataset_dir):
  path = os.path.join(dataset_dir, "shard-00000.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.write(b"\x00" * 16)
  assert os.path.getsize(path) == size
  with pytest.raises(ValueError, match="corrupt dataset shard .*shard-00000"):
    data.ShardedDataset(dataset_dir)
  with open(os.path.join(dataset_dir, data.MANIFEST), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="corrupt manifest"):
    data.ShardedDataset(dataset_dir)
