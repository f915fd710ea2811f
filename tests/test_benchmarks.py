"""Benchmark helpers that run without a GPU: the results file and the speedup plot."""

import json

import pytest

from benchmarks import plot, timing


def _record(backend, sparsity, fwd, fwd_bwd):
  return dict(
    backend=backend, seq_len=32760, heads=12, head_dim=128, sparsity=sparsity, fwd_speedup=fwd, fwd_bwd_speedup=fwd_bwd
  )


def test_results_file_is_written_whole_with_provenance(tmp_path):
  path = tmp_path / "results" / "device.json"
  timing.write_results(str(path), {"records": [_record("mosaic", 0.95, 16.0, 14.0)]})
  payload = json.loads(path.read_text())
  assert {"device", "jax_version", "date", "records"} <= payload.keys()
  assert [p.name for p in path.parent.iterdir()] == ["device.json"]  # no temp file left behind


def test_plot_writes_a_figure(tmp_path):
  results = tmp_path / "r.json"
  timing.write_results(
    str(results), {"records": [_record("mosaic", s, 1 / (1.1 - s), 0.8 / (1.1 - s)) for s in (0.0, 0.8, 0.9, 0.95)]}
  )
  out = tmp_path / "speedup.png"
  plot.main([str(results), "--out", str(out)])
  assert out.stat().st_size > 10_000
  with pytest.raises(SystemExit):
    plot.main([str(tmp_path / "missing.json"), "--out", str(out)])


def test_index_table_variants_agree_with_the_library(tmp_path):
  import json

  from benchmarks import index_tables

  out = tmp_path / "tables.json"
  index_tables.main(["--heads", "2", "--rows", "9", "--cols", "37", "--sparsity", "0.9", "0.0", "--out", str(out)])
  rows = json.loads(out.read_text())["results"]
  assert len(rows) == 2 * len(index_tables.VARIANTS)
  assert all(r["equal"] and r["ms"] > 0 for r in rows)


def test_device_busy_periods_are_split_at_idle_gaps():
  events = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    {"ph": "X", "pid": 1, "ts": 12.0, "dur": 5.0, "name": "b"},  # out of order: sorted by start
    {"ph": "X", "pid": 1, "ts": 0.0, "dur": 10.0, "name": "a"},
    {"ph": "X", "pid": 2, "ts": 500.0, "dur": 900.0, "name": "host work, not device time"},
    {"ph": "X", "pid": 1, "ts": 1000.0, "dur": 3.0, "name": "c"},
  ]
  assert timing.busy_periods_us(events, device="/device:GPU:0", min_idle_us=100.0) == [(17.0, 15.0), (3.0, 3.0)]
  assert timing.busy_periods_us(events, device="/device:GPU:0", min_idle_us=2000.0) == [(1003.0, 18.0)]
  with pytest.raises(ValueError, match="device"):
    timing.busy_periods_us(events, device="/device:GPU:7", min_idle_us=1.0)


def test_trace_events_come_from_a_real_profiler_trace():
  import jax
  import jax.numpy as jnp

  f = jax.jit(lambda x: jnp.sin(x) @ x)
  x = jnp.ones((64, 64))
  f(x).block_until_ready()
  events = timing.trace_events(lambda: f(x).block_until_ready())
  host = timing.device_events(events, "/host:CPU")
  assert host and all(e["ph"] == "X" and e["dur"] >= 0 for e in host)


def test_mask_stages_are_the_librarys_mask():
  import math

  import jax.numpy as jnp

  from benchmarks import mask as mask_benchmark

  kept = {}
  for kind in ("random", "structured"):
    q, k = mask_benchmark.inputs(kind, (1, 4000, 2, 64))
    calls, mask = mask_benchmark.stage_calls(q, k, topk=0.03, topp=0.2, interpret=True)
    outs = {name: fn(*args) for name, (fn, args) in calls.items()}
    whole_mask, (forward_table, backward_table) = outs["mask + both tables"]
    assert bool(jnp.all(whole_mask == mask))
    for ours, library in ((outs["forward table"], forward_table), (outs["dK/dV table"], backward_table)):
      assert all(bool(jnp.all(a == b)) for a, b in zip(ours, library))
    kept[kind] = mask.sum(-1)
  n_kv = 63  # ceil(4000 / 64)
  # Structured rows are skewed: Top-k decides every row. Random rows are near uniform: Top-p keeps more.
  assert bool(jnp.all(kept["structured"] == math.ceil(0.03 * n_kv)))
  assert float(jnp.mean(kept["random"])) > 3 * math.ceil(0.03 * n_kv)
  with pytest.raises(ValueError, match="kind"):
    mask_benchmark.inputs("uniform", (1, 8, 1, 4))


def test_plot_draws_the_mask_stages(tmp_path):
  stages = {
    "read floor (XLA sum of Q and K)": 70.0,
    "pooling": 70.0,
    "pooled logits": 8.0,
    "selection": 12.0,
    "forward table": 4.0,
    "dK/dV table": 6.0,
    "mask + both tables": 101.0,
  }
  results = tmp_path / "mask.json"
  timing.write_results(
    str(results),
    {
      "command": "python -m benchmarks.mask",
      "seq_len": 32760,
      "heads": 12,
      "head_dim": 128,
      "forward_us": 560.0,
      "results": {
        kind: {"kept_fraction": 0.05, "kernel_us": stages, "share_of_forward": 0.18}
        for kind in ("random", "structured")
      },
    },
  )
  out = tmp_path / "mask.png"
  plot.main([str(results), "--out", str(out)])
  assert out.stat().st_size > 10_000
  with pytest.raises(SystemExit):  # one mask file at a time
    plot.main([str(results), str(results), "--out", str(out)])
