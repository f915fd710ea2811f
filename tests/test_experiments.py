"""Experiment scripts run end to end at a tiny size."""

import json

from experiments import mask_rules


def test_mask_rules_tunes_rules_to_equal_sparsity(tmp_path):
  out, figure = tmp_path / "rules.json", tmp_path / "rules.png"
  mask_rules.main(["--seq-len", "1280", "--heads", "2", "--sparsity", "0.9", "--out", str(out),
                   "--figure", str(figure)])
  rows = json.loads(out.read_text())["rows"]
  assert {(r["distribution"], r["rule"]) for r in rows} == {
      (d, r) for d in ("near-uniform", "skewed") for r in mask_rules.RULES}
  for row in rows:
    assert abs(row["sparsity"] - 0.9) < 0.02  # 20 kv blocks: Top-k keeps exactly 2
    assert 0.0 < row["rel_l1"] < 1.0
  assert figure.stat().st_size > 10_000
