"""Timing for the PyTorch peers (FlexAttention, diffusers' Wan model), as close as torch allows to how
`timing.device_ms` times ours: device time per call, medians of samples of back-to-back calls.

torch is imported inside the functions, so importing any benchmark module never imports it.
"""

from __future__ import annotations

import statistics
import time


def median_ms(fn, *, warmup: int = 3, samples: int = 9, calls_per_sample: int = 10) -> float:
  """Median time of one `fn()` call in milliseconds, by CUDA events on a GPU (wall clock on a CPU).

  After warm-up, the samples run back to back and are read after one synchronisation, so each start event
  waits on the stream behind the previous sample's work and host dispatch stays hidden as long as the host
  runs ahead of the GPU, as it does for calls of a millisecond or more. Calls over 20 ms run once per
  sample, 5 samples at most.
  """
  import torch

  cuda = torch.cuda.is_available()
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  for _ in range(warmup):
    fn()
  sync()
  start = time.perf_counter()
  fn()
  sync()
  if time.perf_counter() - start > 0.02:
    samples, calls_per_sample = min(samples, 5), 1
  if not cuda:
    times = []
    for _ in range(samples):
      start = time.perf_counter()
      for _ in range(calls_per_sample):
        fn()
      times.append((time.perf_counter() - start) * 1e3 / calls_per_sample)
    return statistics.median(times)
  events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(samples)]
  for begin, end in events:
    begin.record()
    for _ in range(calls_per_sample):
      fn()
    end.record()
  sync()
  return statistics.median(begin.elapsed_time(end) / calls_per_sample for begin, end in events)


def device_name() -> str:
  """torch's name of the current CUDA device (the name jax reports as its device kind), or "cpu"."""
  import torch

  return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def versions() -> dict:
  """torch, its CUDA and cuDNN, and Triton versions (None where absent)."""
  import torch

  try:
    import triton

    triton_version = triton.__version__
  except ImportError:
    triton_version = None
  cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
  return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn, "triton": triton_version}
