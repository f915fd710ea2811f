"""The grain input pipeline (train/loader.py): order, epochs, seeds, process rows, resume by state or
position, worker processes."""

import pickle

import numpy as np
import pytest

from train import data, loader, sources

LATENT_SHAPE, TEXT_SHAPE = (4, 8, 8, 4), (6, 12)


@pytest.fixture(scope="module")
def shapes():
  return data.MovingShapes(23, LATENT_SHAPE, TEXT_SHAPE, seed=3)


def example_ids(source, batch):
  """The source index of each row of a batch (by content)."""
  ids = []
  for latents in batch["latents"]:
    ids.append(next(i for i in range(len(source)) if np.array_equal(source.get(i)["latents"], latents)))
  return ids


def test_every_example_once_per_epoch_in_a_seeded_order(shapes):
  batches = loader.Batches(shapes, batch_size=4, seed=11)
  iterator = batches.iterator()
  run = [next(iterator) for _ in range(12)]  # 48 examples: two epochs of 23 and two more
  iterator.close()
  order = [i for batch in run for i in example_ids(shapes, batch)]
  first, second = order[:23], order[23:46]
  assert sorted(first) == sorted(second) == list(range(23))
  assert first != list(range(23)) and first != second  # shuffled, and again each epoch
  for batch in run:  # latents and context stay paired
    for i, context in zip(example_ids(shapes, batch), batch["context"]):
      np.testing.assert_array_equal(context, shapes.get(i)["context"])
  other_seed = loader.Batches(shapes, batch_size=4, seed=12).batch(0)
  assert example_ids(shapes, other_seed) != order[:4]
  # Seeds s and s + 1 do not share epochs (grain seeds epoch e with seed + e; the run's seed is hashed first).
  next_seed = [
    i for p in range(0, 24, 4) for i in example_ids(shapes, loader.Batches(shapes, batch_size=4, seed=12).batch(p))
  ]
  assert next_seed[:23] != second
  unshuffled = loader.Batches(shapes, batch_size=4, seed=11, shuffle=False)
  assert example_ids(shapes, unshuffled.batch(20)) == [20, 21, 22, 0]
  # Random access gives what iteration gives.
  for k in (0, 5, 11):
    np.testing.assert_array_equal(batches.batch(4 * k)["latents"], run[k]["latents"])


def test_a_resumed_iterator_continues_at_the_same_example(shapes):
  batches = loader.Batches(shapes, batch_size=4, seed=11, prefetch=3)
  iterator = batches.iterator()
  expected = [next(iterator) for _ in range(10)]
  iterator.close()
  interrupted = batches.iterator()
  for _ in range(4):
    next(interrupted)
  state = interrupted.get_state()
  interrupted.close()
  assert state["position"] == 16 and state["workers"] == 0 and state["grain"] == {"next_index": 4}
  for resumed in (batches.iterator(state), batches.iterator(position=16)):
    for want in expected[4:]:
      got = next(resumed)
      for key in loader.KEYS:
        np.testing.assert_array_equal(got[key], want[key])
    assert resumed.position == 40
    resumed.close()
  with pytest.raises(ValueError, match="multiple of 4"):
    batches.iterator(position=6)


def test_process_rows_together_are_the_global_batch(shapes):
  whole = loader.Batches(shapes, batch_size=6, seed=0)
  parts = [loader.Batches(shapes, batch_size=6, seed=0, rows=r) for r in ((0, 2), (2, 6))]
  for position in (0, 18, 42):  # across the epoch boundary at 23
    joined = np.concatenate([p.batch(position)["latents"] for p in parts])
    np.testing.assert_array_equal(joined, whole.batch(position)["latents"])
  iterators = [p.iterator(position=18) for p in parts]
  joined = np.concatenate([next(it)["context"] for it in iterators])
  np.testing.assert_array_equal(joined, whole.batch(18)["context"])
  for it in iterators:
    it.close()
  with pytest.raises(ValueError, match="rows"):
    loader.Batches(shapes, batch_size=6, seed=0, rows=(4, 8))


def test_worker_processes_read_the_same_batches_and_resume(shapes, tmp_path):
  """Two worker processes over a shard folder (it travels to them as its path) and held-out split."""
  path = str(tmp_path / "ds")
  data.write_dataset(path, (shapes.get(i) for i in range(len(shapes))), examples_per_shard=5)
  dataset = data.ShardedDataset(path)
  dataset.get(0)  # an open, verified shard does not travel: the worker opens and verifies its own
  assert len(pickle.loads(pickle.dumps(dataset))._open) == 0
  train = sources.Subset(dataset, 0, 20)
  threads = loader.Batches(train, batch_size=4, seed=5)
  expected = [threads.batch(4 * k) for k in range(8)]
  workers = loader.Batches(train, batch_size=4, seed=5, workers=2, prefetch=1)
  iterator = workers.iterator(position=8)
  for want in expected[2:5]:
    np.testing.assert_array_equal(next(iterator)["latents"], want["latents"])
  state = iterator.get_state()
  iterator.close()
  assert state["workers"] == 2 and state["start"] == 2 and state["position"] == 20
  resumed = workers.iterator(state)
  np.testing.assert_array_equal(next(resumed)["latents"], expected[5]["latents"])
  resumed.close()
  # Another worker count cannot use the state's grain part: it starts at the state's position.
  elsewhere = threads.iterator(state)
  for want in expected[5:8]:
    np.testing.assert_array_equal(next(elsewhere)["context"], want["context"])
  elsewhere.close()


def test_held_out_examples_are_never_trained_on(tmp_path):
  import dataclasses  # noqa: PLC0415

  from train.configs import PRESETS  # noqa: PLC0415
  from train.models import model_configs  # noqa: PLC0415

  config = PRESETS["tiny"]()
  model = model_configs(config)[1]
  held = dataclasses.replace(config, data=dataclasses.replace(config.data, synthetic_examples=20, heldout_examples=5))
  train, heldout = sources.make_sources(held, model)
  assert (len(train), len(heldout)) == (20, 5)
  # Synthetic: the training videos do not depend on how many are held out.
  fewer = dataclasses.replace(held, data=dataclasses.replace(held.data, heldout_examples=1))
  np.testing.assert_array_equal(sources.make_sources(fewer, model)[0].get(19)["latents"], train.get(19)["latents"])
  # A shard folder: the last examples are held out.
  path = str(tmp_path / "ds")
  data.write_dataset(path, (train.get(i) for i in range(20)))
  on_disk = dataclasses.replace(held, data=dataclasses.replace(held.data, path=path))
  train, heldout = sources.make_sources(on_disk, model)
  assert (len(train), len(heldout)) == (15, 5)
  np.testing.assert_array_equal(heldout.get(0)["latents"], data.ShardedDataset(path).get(15)["latents"])
  too_many = dataclasses.replace(on_disk, data=dataclasses.replace(on_disk.data, heldout_examples=20))
  with pytest.raises(ValueError, match="heldout_examples=20: the dataset .* has only 20 examples"):
    sources.make_sources(too_many, model)
