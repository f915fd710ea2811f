"""Timing shared by the benchmarks: wall-clock medians, and device time per call from a `jax.profiler` trace."""

from __future__ import annotations

import glob
import gzip
import json
import os
import statistics
import tempfile
import time
from typing import NamedTuple

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


class DeviceTime(NamedTuple):
  """Median device time per call, ms. span: from the first kernel's start to the last one's end, idle gaps
  included (a call shorter than its host dispatch shows the dispatch rate); busy: the kernels' own time
  (what the call costs inside a larger jitted program, where nothing waits for the host)."""

  span: float
  busy: float


def device_ms(
  calls: dict, *, samples: int = 9, calls_per_sample: int = 10, idle_s: float = 0.02, device: str = "/device:GPU:0"
) -> dict[object, DeviceTime]:
  """Device time per call of each jitted call (a `DeviceTime`), from one `jax.profiler` trace.

  calls: {label: (fn, args)}. Each call is compiled and warmed up first; one that raises is reported and
  left out of the result. Then every call runs `samples` times `calls_per_sample` back to back, each
  sample after an idle gap of `idle_s`; a sample's time is the span from its first kernel's start to its
  last kernel's end on `device`, over calls_per_sample. So the host's dispatch before the first kernel is
  not counted, any idle time between kernels once the device is busy is, and the clock is the device's
  own (what CUDA events around the calls would give). Calls longer than 20 ms run once per sample.
  """
  plan = []
  for label, (fn, args) in calls.items():
    try:
      for _ in range(2):
        jax.block_until_ready(fn(*args))
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
    except Exception as e:  # one call failing (say, out of memory) must not hide the others
      print(f"{label}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
      continue
    long_call = time.perf_counter() - start > 0.02
    plan.append((label, fn, args, min(samples, 5) if long_call else samples, 1 if long_call else calls_per_sample))

  def run_plan():
    for _, fn, args, n_samples, n_calls in plan:
      for _ in range(n_samples):
        time.sleep(idle_s)
        for _ in range(n_calls):
          out = fn(*args)
        jax.block_until_ready(out)

  events = trace_events(run_plan)
  periods = busy_periods_us(events, device=device, min_idle_us=idle_s * 1e6 / 4)
  expected = sum(n_samples for *_, n_samples, _ in plan)
  if len(periods) != expected:
    raise RuntimeError(f"found {len(periods)} busy periods on {device} in the trace, expected {expected} samples")
  result, i = {}, 0
  for label, _, _, n_samples, n_calls in plan:
    mine = periods[i : i + n_samples]
    result[label] = DeviceTime(
      span=statistics.median(span for span, _ in mine) / n_calls / 1e3,
      busy=statistics.median(busy for _, busy in mine) / n_calls / 1e3,
    )
    i += n_samples
  return result


def trace_events(run) -> list[dict]:
  """Chrome-trace events of a `jax.profiler` trace around `run()` (which should wait for its results)."""
  with tempfile.TemporaryDirectory() as log_dir:
    jax.profiler.start_trace(log_dir)
    try:
      run()
    finally:
      jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    with gzip.open(path) as f:
      return json.load(f)["traceEvents"]


def device_events(events, device: str) -> list[dict]:
  """The complete ("X") events of the trace processes named like `device` (kernels, memsets, copies)."""
  pids = {
    e["pid"]
    for e in events
    if e.get("ph") == "M" and e.get("name") == "process_name" and device in e["args"].get("name", "")
  }
  if not pids:
    raise ValueError(f"device: no process named like {device!r} in the trace")
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in pids]


def busy_periods_us(events, *, device: str, min_idle_us: float) -> list[tuple[float, float]]:
  """Chrome-trace events -> (span, summed duration) in µs of each busy period of `device`: runs of
  kernels, memsets and copies separated by idle gaps of at least min_idle_us, in time order."""
  work = sorted((float(e["ts"]), float(e.get("dur", 0.0))) for e in device_events(events, device))
  periods, begin, end, busy = [], None, None, 0.0
  for start, duration in work:
    if begin is not None and start - end >= min_idle_us:
      periods.append((end - begin, busy))
      begin = None
    if begin is None:
      begin, end, busy = start, start, 0.0
    end, busy = max(end, start + duration), busy + duration
  if begin is not None:
    periods.append((end - begin, busy))
  return periods
