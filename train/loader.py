"""The training input pipeline on grain: shuffled global batches, this process's rows of each, read ahead.

    batches = Batches(source, batch_size=8, seed=0, rows=(0, 4), workers=2)
    iterator = batches.iterator()                 # or batches.iterator(state) to resume
    batch = next(iterator)                        # {"latents": [4, F, H, W, C], "context": [4, L, D]}
    state = iterator.get_state()                  # JSON, saved with each checkpoint

The examples form one endless stream (``grain.MapDataset``: the source, shuffled, repeated): epoch ``e`` is a
permutation of all examples seeded by ``(seed, e)``, so every example comes once per epoch. Global batch
``k`` is stream elements ``k * batch_size .. (k + 1) * batch_size - 1``, whatever the number of processes,
and each process reads only its own rows of it (``rows``, from ``train.sharding.process_rows``): the
batches are a pure function of (seed, position), and several processes together read exactly what one
reads alone.

Reading ahead: ``prefetch`` batches in threads of this process, or, with ``workers > 0``, in that many
worker processes (grain's ``mp_prefetch``; each reads every ``workers``-th batch, in order). The iterator
state (grain's, plus where the stream started and how many workers read it) resumes at the same example;
a resume with another worker count, or from a checkpoint without a state, starts at the saved position.
"""

from __future__ import annotations

import sys
from typing import Any

import grain
import numpy as np

from .data import Source

KEYS = ("latents", "context")


def _stream_seed(seed: int) -> int:
  """A 32-bit shuffle seed from the run's seed. grain seeds epoch e with (seed + e), so seeds s and s + 1
  would share all epochs but one; hashing the seed first keeps different runs' orders unrelated."""
  return int(np.random.SeedSequence([seed, 0x6A41]).generate_state(1)[0])


class _Examples:
  """A ``Source`` as a grain random-access data source."""

  def __init__(self, source: Source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.source.get(int(index))


class _ReadRows(grain.transforms.Map):
  """Global batch index -> this process's rows of that batch, stacked."""

  def __init__(self, stream: grain.MapDataset, batch_size: int, rows: tuple[int, int]):
    self.stream, self.batch_size, self.rows = stream, batch_size, rows

  def map(self, batch_index: int) -> dict[str, np.ndarray]:
    first = int(batch_index) * self.batch_size
    examples = [self.stream[first + row] for row in range(*self.rows)]
    return {k: np.stack([e[k] for e in examples]) for k in KEYS}


class Batches:
  """This process's rows of the global batches of ``source``; see the module docstring.

  rows: ``(start, stop)`` within ``batch_size`` (default all). shuffle: False keeps the source's order.
  """

  def __init__(
    self,
    source: Source,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    rows: tuple[int, int] | None = None,
    workers: int = 0,
    prefetch: int = 2,
  ):
    start, stop = (0, batch_size) if rows is None else rows
    if batch_size < 1 or not 0 <= start < stop <= batch_size:
      raise ValueError(f"rows {rows} must be a non-empty range within batch_size {batch_size}")
    if workers < 0 or prefetch < 0:
      raise ValueError(f"workers ({workers}) and prefetch ({prefetch}) must be >= 0")
    if len(source) < 1:
      raise ValueError("the source has no examples")
    self.batch_size, self.rows, self.workers, self.prefetch = batch_size, (start, stop), workers, prefetch
    stream = grain.MapDataset.source(_Examples(source))
    if shuffle:
      stream = stream.shuffle(seed=_stream_seed(seed))
    self._read = _ReadRows(stream.repeat(), batch_size, self.rows)

  def batch(self, position: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch starting at ``position`` (a multiple of batch_size)."""
    if position < 0 or position % self.batch_size:
      raise ValueError(f"position must be a non-negative multiple of {self.batch_size}, got {position}")
    return self._read.map(position // self.batch_size)

  def iterator(self, state: dict | None = None, *, position: int = 0) -> BatchIterator:
    """Batches from the saved ``state`` (``BatchIterator.get_state``), else from ``position``."""
    if state is not None and state.get("workers") == self.workers:
      iterator = BatchIterator(self, state["start"])
      iterator.set_state(state)
      return iterator
    if state is not None:
      position = state["position"]
    if position < 0 or position % self.batch_size:
      raise ValueError(f"position must be a non-negative multiple of {self.batch_size}, got {position}")
    return BatchIterator(self, position // self.batch_size)


class BatchIterator:
  """Iterates over ``Batches`` from global batch ``start`` on; ``position``: examples consumed, globally."""

  def __init__(self, batches: Batches, start: int):
    self.batches, self.start = batches, start
    dataset = grain.MapDataset.range(start, sys.maxsize).map(batches._read)
    read = grain.ReadOptions(num_threads=batches.prefetch, prefetch_buffer_size=batches.prefetch)
    dataset = dataset.to_iter_dataset(read)
    if batches.workers:
      _absl_flags_parsed()
      options = grain.MultiprocessingOptions(num_workers=batches.workers, per_worker_buffer_size=batches.prefetch)
      dataset = dataset.mp_prefetch(options)
    self._iterator = iter(dataset)
    self.position = start * batches.batch_size

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.position += self.batches.batch_size
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON: grain's iterator state, the stream's start and worker count, and the position."""
    return {
      "position": self.position,
      "start": self.start,
      "workers": self.batches.workers,
      "grain": self._iterator.get_state(),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if state["start"] != self.start or state["workers"] != self.batches.workers:
      raise ValueError(
        f"state {state} is not of an iterator from batch {self.start} with {self.batches.workers} workers"
      )
    self._iterator.set_state(state["grain"])
    self.position = state["position"]

  def close(self) -> None:
    """Stops the worker processes and threads (also done when the iterator is garbage collected)."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def _absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; a program that never parses any (ours) takes their defaults."""
  from absl import flags  # noqa: PLC0415 (a dependency of grain)

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
