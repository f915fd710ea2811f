"""Timing and results-file helpers shared by the benchmarks."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time

import jax


def median_ms(fn, *args, warmup: int = 3, samples: int = 15, calls_per_sample: int = 5) -> float:
  """Median wall time of one `fn(*args)` call in milliseconds.

  fn must be jitted. Each sample dispatches several calls back to back and waits for the last, so host
  launch overhead overlaps device work as it does in a real program.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  if time.perf_counter() - start > 0.02:  # long calls: launch overhead is noise, keep the run short
    samples, calls_per_sample = min(samples, 7), 1
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    for _ in range(calls_per_sample):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / calls_per_sample)
  return statistics.median(times)


def device_name() -> str:
  device = jax.devices()[0]
  return getattr(device, "device_kind", device.platform)


def device_slug() -> str:
  return "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-")


def write_results(path: str, payload: dict) -> None:
  """Write `payload` (plus device, jax version, date) as JSON atomically: temp file, then rename."""
  payload = {"device": device_name(), "jax_version": jax.__version__,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **payload}
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path) or ".", suffix=".tmp", delete=False) as f:
    json.dump(payload, f, indent=2)
    tmp = f.name
  os.replace(tmp, path)
