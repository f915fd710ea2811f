"""Benchmark helpers that run without a GPU: the results file and the speedup plot."""

import json

import pytest

from benchmarks import plot, timing


def _record(backend, sparsity, fwd, fwd_bwd):
  return dict(backend=backend, seq_len=32760, heads=12, head_dim=128, sparsity=sparsity,
              fwd_speedup=fwd, fwd_bwd_speedup=fwd_bwd)


def test_results_file_is_written_whole_with_provenance(tmp_path):
  path = tmp_path / "results" / "device.json"
  timing.write_results(str(path), {"records": [_record("mosaic", 0.95, 16.0, 14.0)]})
  payload = json.loads(path.read_text())
  assert {"device", "jax_version", "date", "records"} <= payload.keys()
  assert [p.name for p in path.parent.iterdir()] == ["device.json"]  # no temp file left behind


def test_plot_writes_a_figure(tmp_path):
  results = tmp_path / "r.json"
  timing.write_results(str(results), {"records": [_record("mosaic", s, 1 / (1.1 - s), 0.8 / (1.1 - s))
                                                  for s in (0.0, 0.8, 0.9, 0.95)]})
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
