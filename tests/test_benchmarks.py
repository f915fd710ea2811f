"""Benchmark pieces that run without a GPU: inputs and masks, the calls the suites time, the results file,
the targets, the plots, and the PyTorch peers' inputs (where torch is installed)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention as attention_benchmark
from benchmarks import inputs, plot, results, timing
from pallas_kernels.block_sparse_attention.reference import token_mask
from sparge_jax import attention
from sparge_jax import backends as backend_table


def _record(backend, sparsity, fwd, fwd_bwd):
  return dict(
    backend=backend, seq_len=32760, heads=12, head_dim=128, sparsity=sparsity, fwd_speedup=fwd, fwd_bwd_speedup=fwd_bwd
  )


def test_results_file_is_written_whole_with_provenance(tmp_path):
  path = tmp_path / "results" / "device.json"
  results.write_results(str(path), {"records": [_record("mosaic", 0.95, 16.0, 14.0)]})
  payload = json.loads(path.read_text())
  assert {"device", "jax_version", "date", "git_commit", "records"} <= payload.keys()
  assert payload["device"] == results.device_name() and payload["records"][0]["fwd_speedup"] == 16.0
  assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", payload["git_commit"])  # the tests run in a checkout
  assert [p.name for p in path.parent.iterdir()] == ["device.json"]  # no temp file left behind
  results.write_results(str(path), {"records": []}, device="NVIDIA H200")  # a peer names its device
  assert json.loads(path.read_text())["device"] == "NVIDIA H200"


def test_results_files_are_named_by_what_and_device():
  assert results.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
  path = results.results_path("attention", "NVIDIA H200")
  assert path.endswith("benchmarks/results/attention-nvidia-h200.json")
  assert results.results_path("mask") == results.results_path("mask", results.device_name())


def test_plot_writes_a_figure(tmp_path):
  results_file = tmp_path / "r.json"
  records = [_record("mosaic", s, 1 / (1.1 - s), 0.8 / (1.1 - s)) for s in (0.0, 0.8, 0.9, 0.95)]
  records.append(dict(_record("mosaic", 0.95, 19.0, 15.0), case="32760x32x128 GQA 32/8", heads=32, kv_heads=8))
  flex = [dict(_record("flex", s, 0.7 / (1.1 - s), 0.7 / (1.1 - s)), case="32760x12x128") for s in (0.0, 0.95)]
  results.write_results(str(results_file), {"records": records, "flex_attention": {"records": flex}})
  out = tmp_path / "speedup.png"
  plot.main([str(results_file), "--out", str(out)])
  assert out.stat().st_size > 10_000
  with pytest.raises(SystemExit):
    plot.main([str(tmp_path / "missing.json"), "--out", str(out)])


def test_index_table_variants_agree_with_the_library(tmp_path):
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
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  x = jnp.ones((64, 64))
  f(x).block_until_ready()
  events = timing.trace_events(lambda: f(x).block_until_ready())
  host = timing.device_events(events, "/host:CPU")
  assert host and all(e["ph"] == "X" and e["dur"] >= 0 for e in host)


def test_mask_stages_are_the_librarys_mask():
  import math

  from benchmarks import mask as mask_benchmark

  kept = {}
  for kind in ("random", "structured"):
    q, k = inputs.qk_inputs(kind, (1, 4000, 2, 64))
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
    inputs.qk_inputs("uniform", (1, 8, 1, 4))


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
  results_file = tmp_path / "mask.json"
  results.write_results(
    str(results_file),
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
  plot.main([str(results_file), "--out", str(out)])
  assert out.stat().st_size > 10_000
  with pytest.raises(SystemExit):  # one mask file at a time
    plot.main([str(results_file), str(results_file), "--out", str(out)])


def test_random_masks_keep_the_same_count_in_every_row():
  mask = inputs.random_block_mask(jax.random.key(0), 2, 3, 5, 37, inputs.kept_count(0.9, 37))
  assert mask.shape == (2, 3, 5, 37) and bool(jnp.all(mask.sum(-1) == 4))  # round(0.1 * 37)
  assert inputs.kept_count(0.999, 37) == 1 and inputs.kept_count(0.0, 37) == 37
  assert list(inputs.kept_count(0.5, np.array([1, 4, 9]))) == [1, 2, 4]
  assert not bool(jnp.all(mask[0, 0] == mask[0, 1]))  # rows draw their own blocks


@pytest.mark.parametrize("q_len, block_q, block_kv", [(200, 64, 32), (200, 32, 64), (256, 64, 64)])
def test_causal_masks_keep_only_allowed_blocks_and_their_own(q_len, block_q, block_kv):
  allowed, own = inputs.causal_blocks(q_len, q_len, block_q=block_q, block_kv=block_kv)
  # A block is allowed iff some query of the q block may see some key of the kv block (key <= query).
  tokens = np.tril(np.ones((q_len, q_len), bool))
  n_q, n_kv = allowed.shape
  for i in range(n_q):
    for j in range(n_kv):
      assert allowed[i, j] == tokens[i * block_q : (i + 1) * block_q, j * block_kv : (j + 1) * block_kv].any()
      assert own[i, j] == (i * block_q // block_kv == j)  # holds the q block's first query
  for sparsity in (0.0, 0.5, 0.95):
    mask = np.asarray(
      inputs.causal_block_mask(
        jax.random.key(1), 2, 3, q_len, q_len, block_q=block_q, block_kv=block_kv, sparsity=sparsity
      )
    )
    assert not (mask & ~allowed).any() and (mask | ~own).all()
    assert (mask.sum(-1) == inputs.kept_count(sparsity, allowed.sum(-1))).all()
    if sparsity == 0.5:
      assert (mask[0, 0] != mask[1, 2]).any()  # the other blocks are drawn per row


def _reference(q, k, v, mask, case, *, block_q, block_kv):
  allowed = token_mask(mask, q.shape[1], k.shape[1], block_q=block_q, block_kv=block_kv)
  return jax.nn.dot_product_attention(q, k, v, mask=allowed, is_causal=case.is_causal, implementation="xla")


@pytest.mark.parametrize(
  "case, backend",
  [
    (inputs.Case(200, 4, 32, (0.5,)), "xla"),
    (inputs.Case(200, 4, 32, (0.5,)), "triton"),  # the Pallas kernels, interpreted
    (inputs.Case(200, 4, 32, (0.5,), kv_heads=2), "xla"),
    (inputs.Case(200, 4, 32, (0.5, 0.0), is_causal=True), "xla"),
    (inputs.Case(200, 4, 32, (0.5,), kv_heads=1, is_causal=True), "xla"),
  ],
  ids=lambda x: x.label if isinstance(x, inputs.Case) else x,
)
def test_suite_calls_compute_the_attention_they_time(case, backend):
  """What the suite times is the attention it claims: its masks, on the public API, against jax.nn."""
  block_q, block_kv = 64, 32
  causal_option = {"is_causal": True} if case.is_causal else {}
  q, k, v, d_out = inputs.random_qkv(
    jax.random.key(2), batch=1, seq_len=case.seq_len, heads=case.heads, head_dim=case.head_dim,
    kv_heads=case.kv_heads, dtype=jnp.float32,
  )  # fmt: skip
  assert k.shape == (1, case.seq_len, case.kv_heads, case.head_dim) and d_out.shape == q.shape
  dense_forward, dense_forward_backward = attention_benchmark.dense_fns(case, implementation="xla")
  for sparsity in case.sparsities:
    mask = inputs.suite_mask(jax.random.key(3), case, sparsity, batch=1, block_q=block_q, block_kv=block_kv)
    forward, forward_backward = attention_benchmark.sparse_fns(
      case, backend, block_q=block_q, block_kv=block_kv, interpret=backend != "xla"
    )
    reason = attention_benchmark.why_unsupported(forward, q, k, v, mask)
    if reason is not None:
      assert case.is_causal or case.is_gqa, reason  # only the new rows may be unsupported
      pytest.skip(f"the library cannot run this row yet: {reason}")
    expected = _reference(q, k, v, mask, case, block_q=block_q, block_kv=block_kv)
    np.testing.assert_allclose(forward(q, k, v, mask), expected, atol=2e-5, rtol=2e-5)
    grads = forward_backward(q, k, v, d_out, mask)
    expected_grads = jax.vjp(
      lambda q, k, v: _reference(q, k, v, mask, case, block_q=block_q, block_kv=block_kv), q, k, v
    )[1](d_out)
    for got, want in zip(grads, expected_grads):
      assert got.shape == want.shape
      np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)
    if sparsity == 0.0:  # every allowed block kept: dense attention, as cuDNN computes it
      np.testing.assert_allclose(expected, dense_forward(q, k, v), atol=2e-5, rtol=2e-5)
      for got, want in zip(expected_grads, dense_forward_backward(q, k, v, d_out)):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)
  interpret = backend != "xla"
  mask_forward = attention_benchmark.sparse_attention_fn(
    case, backend, topk=0.5, block_q=block_q, block_kv=block_kv, interpret=interpret
  )
  options = dict(block_q=block_q, block_kv=block_kv, backend=backend, interpret=interpret)
  topk_mask = attention.block_mask(q, k, topk=0.5, topp=0.0, mode="topk", **options, **causal_option)
  np.testing.assert_allclose(mask_forward(q, k, v), forward(q, k, v, topk_mask), atol=1e-6, rtol=1e-6)


def test_unsupported_rows_give_the_librarys_reason():
  def picky(x):
    if x.shape[0] != 3:
      raise ValueError(f"x must have 3 rows, got {x.shape[0]}\nmore detail")
    return x * 2

  assert attention_benchmark.why_unsupported(picky, jnp.ones((3,))) is None
  assert attention_benchmark.why_unsupported(picky, jnp.ones((4,))) == "ValueError: x must have 3 rows, got 4"
  assert attention_benchmark.why_unsupported(lambda x: picky(x, flag=True), jnp.ones((3,))).startswith("TypeError")


def _suite_record(backend, case, target, fwd, fwd_bwd):
  return dict(
    backend=backend, case=case.label, seq_len=case.seq_len, heads=case.heads, kv_heads=case.kv_heads,
    head_dim=case.head_dim, is_causal=case.is_causal, target_sparsity=target, fwd_speedup=fwd, fwd_bwd_speedup=fwd_bwd,
  )  # fmt: skip


def test_targets_hold_gqa_and_causal_rows_against_mha_and_dense_rows_against_cudnn():
  mha, gqa, causal = inputs.SUITE[0], inputs.SUITE[3], inputs.SUITE[4]
  assert (gqa.heads, gqa.kv_heads, causal.is_causal) == (32, 8, True)
  records = [
    _suite_record("mosaic", mha, 0.95, 20.0, 16.0),
    _suite_record("mosaic", mha, 0.0, 1.0, 0.85),
    _suite_record("mosaic", gqa, 0.95, 19.0, 12.0),
    _suite_record("mosaic", causal, 0.95, 17.0, 15.0),
    _suite_record("mosaic", causal, 0.0, 0.95, 0.92),
    _suite_record("triton", gqa, 0.95, 5.0, 4.0),  # no triton MHA row to compare with
  ]
  rows = {t["what"]: t for t in attention_benchmark.targets(records)}
  gqa_row = rows["mosaic 32760x32x128 GQA 32/8 at 0.95: forward ratio over 32760x12x128's"]
  assert gqa_row["value"] == pytest.approx(0.95) and gqa_row["met"]
  assert gqa_row["fwd_bwd_over_reference"] == pytest.approx(0.75)
  causal_row = rows["mosaic 32760x12x128 causal at 0.95: forward ratio over 32760x12x128's"]
  assert causal_row["value"] == pytest.approx(0.85) and not causal_row["met"]
  assert rows["mosaic 32760x12x128 causal at 0.0: forward ratio over 32760x12x128's"]["value"] == pytest.approx(0.95)
  assert not rows["mosaic 32760x12x128 dense: forward+backward over cuDNN"]["met"]
  assert rows["mosaic 32760x12x128 causal dense: forward+backward over cuDNN"]["met"]
  assert len(rows) == 7 and not any(w.startswith("triton") for w in rows)


def test_shape_arguments_are_shared_and_checked():
  import argparse

  parser = argparse.ArgumentParser()
  inputs.add_shape_arguments(parser)
  args = parser.parse_args(["--heads", "40"])
  assert (args.seq_len, args.heads, args.head_dim) == (32760, 40, 128)
  inputs.check_positive(parser, args, "seq_len", "heads")
  with pytest.raises(SystemExit):
    inputs.check_positive(parser, parser.parse_args(["--heads", "0"]), "heads")
  with pytest.raises(ValueError, match="kv_heads"):
    inputs.Case(100, 12, 64, (0.5,), kv_heads=5)


def test_importing_the_benchmarks_imports_no_torch(tmp_path):
  """Only the PyTorch peers' functions import torch: a torch that raises on import must not matter."""
  (tmp_path / "torch").mkdir()
  (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch imported at module import')\n")
  modules = ["attention", "dit", "dit_diffusers", "distill", "flex_attention", "index_tables", "mask", "profile"]
  modules += ["plot", "results", "inputs", "timing", "torch_timing"]
  code = "; ".join(f"import benchmarks.{m}" for m in modules)
  root = str(pathlib.Path(__file__).parents[1])
  env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{root}", "JAX_PLATFORMS": "cpu"}
  child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
  assert child.returncode == 0, child.stderr[-2000:]


def test_flex_masks_follow_the_suites_kept_count_law():
  from benchmarks import flex_attention

  assert [c.label for c in flex_attention.flex_cases()] == ["32760x12x128", "32760x12x64", "75600x40x128"]
  case = inputs.Case(1000, 3, 64, (0.9,))
  count, index, mask = flex_attention.kv_block_lists(jax.random.key(0), case, 0.9)
  n = 8  # ceil(1000 / 128)
  assert mask.shape == (1, 3, n, n) and index.shape == (1, 3, n, n) and count.dtype == np.int32
  assert (count == inputs.kept_count(0.9, n)).all() and (mask.sum(-1) == count).all()
  for row_index, row_count, row_mask in zip(index.reshape(-1, n), count.reshape(-1), mask.reshape(-1, n)):
    assert list(row_index[:row_count]) == list(np.flatnonzero(row_mask))  # kept blocks, ascending


def test_flex_block_mask_lists_the_kept_blocks_in_full():
  torch = pytest.importorskip("torch")
  from benchmarks import flex_attention

  count, index, mask = flex_attention.kv_block_lists(jax.random.key(1), inputs.Case(1000, 2, 64, (0.5,)), 0.5)
  block_mask = flex_attention.flex_block_mask(count, index, seq_len=1000, device="cpu")
  assert (block_mask.to_dense().numpy().astype(bool) == mask).all()
  assert (block_mask.full_kv_num_blocks.numpy() == count).all() and not block_mask.kv_num_blocks.any()
  assert block_mask.seq_lengths == (1000, 1000) and torch.is_tensor(block_mask.full_kv_indices)


def test_flex_comparison_is_ours_over_flex_at_the_same_case_and_sparsity():
  from benchmarks import flex_attention

  flex = [
    dict(case="32760x12x128", target_sparsity=s, fwd_ms=f, fwd_bwd_ms=fb, fwd_speedup=12.0, fwd_bwd_speedup=13.0)
    for s, f, fb in ((0.95, 0.9, 3.2), (0.8, 2.0, 7.0))
  ]
  ours = [
    dict(_record("mosaic", 0.949, 20.0, 16.0), case="32760x12x128", target_sparsity=0.95, fwd_ms=0.5, fwd_bwd_ms=2.5),
    dict(_record("mosaic", 0.8, 5.0, 4.0), case="32760x12x128", target_sparsity=0.8, fwd_ms=1.0, fwd_bwd_ms=5.0),
    dict(_record("mosaic", 0.9, 10.0, 8.0), case="32760x12x128", target_sparsity=0.9, fwd_ms=1.0, fwd_bwd_ms=5.0),
  ]
  rows = flex_attention.compare(ours, flex)
  assert len(rows) == 2  # no flex row at 0.9
  at_95, at_80 = rows
  assert at_95["fwd_ours_over_flex"] == pytest.approx(1.8) and at_95["fwd_bwd_ours_over_flex"] == pytest.approx(1.28)
  assert at_95["fwd_speedup_ours_over_flex"] == pytest.approx(20 / 12) and at_95["met"] is False
  assert "met" not in at_80 and at_80["fwd_ours_over_flex"] == pytest.approx(2.0)


def test_flex_rows_join_ours_in_one_results_file(tmp_path):
  path = tmp_path / "attention-device.json"
  results.write_results(path, {"records": [_record("mosaic", 0.95, 20.0, 16.0)]})
  ours = json.loads(path.read_text())
  results.add_sections(path, {"flex_attention": {**results.provenance("NVIDIA H200"), "records": []}})
  payload = json.loads(path.read_text())
  assert payload["records"] == ours["records"] and payload["date"] == ours["date"]
  assert payload["flex_attention"]["device"] == "NVIDIA H200" and payload["flex_attention"]["records"] == []
  results.add_sections(tmp_path / "new" / "file.json", {"flex_attention": {}})  # no file of ours yet
  assert json.loads((tmp_path / "new" / "file.json").read_text()) == {"flex_attention": {}}


def test_dit_runs_ours_and_records_why_the_peer_did_not_run(tmp_path):
  from benchmarks import dit

  out = tmp_path / "dit.json"
  dit.main(["--config", "tiny", "--tokens", "small", "--runs", "1", "--diffusers", "none", "--out", str(out)])
  payload = json.loads(out.read_text())
  assert payload["dense_ms"] > 0 and payload["sparse_ms"] > 0 and payload["tokens"] == 3 * 8 * 8
  assert payload["diffusers"] == {"skipped": "--diffusers none"}
  assert payload["ratios"] == {"dense_over_sparse": pytest.approx(payload["dense_ms"] / payload["sparse_ms"])}


def test_dit_peer_runs_in_a_child_with_the_same_model(tmp_path, monkeypatch):
  """The child gets the architecture, latents and text length of ours, and its last stdout line is read."""
  import importlib.util

  from benchmarks import dit
  from sparge_jax.models.wan.diffusers_io import config_to_diffusers

  python, fake = sys.executable, tmp_path / "python"
  fake.write_text(
    f"#!{python}\nimport json, sys\nopen({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv))\n"
    "print('progress')\nprint(json.dumps({'eager_ms': 600.0, 'compiled_ms': 500.0}))\n"
  )
  fake.chmod(0o755)
  monkeypatch.setattr(sys, "executable", str(fake))
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: object() if name in ("torch", "diffusers") else real_find_spec(name)
  )
  peer = dit.diffusers_peer("wan2_1_1_3b", "480p", 3, compile=False)
  assert peer == {"eager_ms": 600.0, "compiled_ms": 500.0}
  argv = json.loads((tmp_path / "argv.json").read_text())
  assert argv[1:3] == ["-m", "benchmarks.dit_diffusers"] and "--no-compile" in argv
  fields = json.loads(argv[argv.index("--config-json") + 1])
  assert fields["num_layers"] == 30 and fields["ffn_dim"] == 8960 and fields["num_attention_heads"] == 12
  assert fields == {k: v for k, v in config_to_diffusers(dit.CONFIGS["wan2_1_1_3b"]()).items() if k[0] != "_"}
  assert argv[argv.index("--latent") + 1 : argv.index("--latent") + 4] == ["21", "60", "104"]
  assert dit.ratios({"dense_ms": 500.0, "sparse_ms": 200.0}, peer) == {
    "dense_over_sparse": 2.5,
    "dense_over_diffusers_eager": 1.2,
    "sparse_over_diffusers_eager": 3.0,
    "dense_over_diffusers_compiled": 1.0,
    "sparse_over_diffusers_compiled": 2.5,
  }
  fake.write_text(f"#!{python}\nimport sys\nsys.exit(3)\n")
  assert "exit status 3" in dit.diffusers_peer("tiny", "small", 1, compile=True)["skipped"]


def test_diffusers_step_runs_where_torch_and_diffusers_are_installed():
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from benchmarks import dit, dit_diffusers
  from sparge_jax.models.wan.diffusers_io import config_to_diffusers

  fields = {k: v for k, v in config_to_diffusers(dit.CONFIGS["tiny"]()).items() if not k.startswith("_")}
  result = dit_diffusers.run(fields, latent=(3, 8, 8), text_len=8, runs=1, compile=False)
  assert result["output_shape"] == [1, 4, 3, 8, 8] and result["eager_ms"] > 0
  assert "norm2" in result["kept_in_float32"] and "compiled_ms" not in result


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["--kv-heads", "1"], ["--causal"]], ids=["mha", "gqa", "causal"])
def test_attention_command_times_every_backend_or_says_why_not(tmp_path, extra):
  out = tmp_path / "attention.json"
  argv = ["--seq-len", "2040", "--heads", "2", "--sparsity", "0.5", "0.0", "--out", str(out), *extra]
  attention_benchmark.main(argv)
  payload = json.loads(out.read_text())
  backends = ["mosaic", "triton"] if backend_table.on_hopper() else ["triton"]
  for backend in backends:
    for target in (0.5, 0.0):
      timed = [r for r in payload["records"] if r["backend"] == backend and r["target_sparsity"] == target]
      why_not = [s for s in payload["skipped"] if s["backend"] == backend and s["target_sparsity"] == target]
      assert len(timed) == 1 or why_not, (backend, target)
      for r in timed:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > r["fwd_ms"] and r["cudnn_fwd_ms"] > 0
        assert r["sparsity"] == pytest.approx(target, abs=0.05) and r["is_causal"] == ("--causal" in extra)
  if not extra:  # MHA, non-causal: every backend runs today, and the dense rows have targets
    assert len(payload["records"]) == 2 * len(backends) and not payload["skipped"]
    assert {t["what"] for t in payload["targets"]} >= {f"{b} 2040x2x128 dense: forward over cuDNN" for b in backends}


@pytest.mark.parametrize("scheme", ["ulysses", "ring", "usp"])
def test_sequence_parallel_calls_equal_plain_sparse_attention(scheme):
  from benchmarks import sequence_parallel

  devices = jax.devices()[:1]
  q, k, v, d_out = inputs.random_qkv(jax.random.key(4), batch=1, seq_len=256, heads=2, head_dim=32, dtype=jnp.float32)
  settings = dict(topk=0.25, block_q=64, block_kv=32)
  plain_forward, plain_forward_backward, no_sharding = sequence_parallel.scheme_fns("plain", devices, **settings)
  assert no_sharding is None
  try:
    forward, forward_backward, sharding = sequence_parallel.scheme_fns(scheme, devices, **settings)
  except (ImportError, AttributeError) as e:
    pytest.skip(f"sparge_jax.parallel has no {scheme} attention yet: {e}")
  placed = [jax.device_put(x, sharding) for x in (q, k, v, d_out)]
  np.testing.assert_allclose(forward(*placed[:3]), plain_forward(q, k, v), atol=1e-5, rtol=1e-5)
  for got, want in zip(forward_backward(*placed), plain_forward_backward(q, k, v, d_out)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_sequence_parallel_overheads_are_over_plain_sparse_attention():
  from benchmarks import sequence_parallel

  times = {("plain", "fwd"): 1.0, ("plain", "fwd_bwd"): 4.0, ("ring", "fwd"): 1.01, ("ring", "fwd_bwd"): 4.2}
  rows = {(r["scheme"], r["what"]): r for r in sequence_parallel.overheads(times)}
  assert rows.keys() == {("ring", "fwd"), ("ring", "fwd_bwd")}
  assert rows[("ring", "fwd")]["over_plain"] == pytest.approx(1.01) and rows[("ring", "fwd")]["met"]
  assert rows[("ring", "fwd_bwd")]["over_plain"] == pytest.approx(1.05) and not rows[("ring", "fwd_bwd")]["met"]
