"""Experiment scripts run end to end at a tiny size."""

import json

from experiments import mask_rules


def test_mask_rules_tunes_rules_to_equal_sparsity(tmp_path):
  out, figure = tmp_path / "rules.json", tmp_path / "rules.png"
  mask_rules.main(
    ["--seq-len", "1280", "--heads", "2", "--sparsity", "0.9", "--out", str(out), "--figure", str(figure)]
  )
  rows = json.loads(out.read_text())["rows"]
  assert {(r["distribution"], r["rule"]) for r in rows} == {
    (d, r) for d in ("near-uniform", "skewed") for r in mask_rules.RULES
  }
  for row in rows:
    assert abs(row["sparsity"] - 0.9) < 0.02  # 20 kv blocks: Top-k keeps exactly 2
    assert 0.0 < row["rel_l1"] < 1.0
  assert figure.stat().st_size > 10_000
  assert (tmp_path / "mask_heatmaps.png").stat().st_size > 10_000  # P̄ and every rule's mask, side by side


TINY = [
  "--config.model.num_layers=1",
  "--config.model.num_attention_heads=2",
  "--config.model.attention_head_dim=16",
  "--config.model.ffn_dim=32",
  "--config.model.text_dim=8",
  "--config.model.freq_dim=16",
  "--config.data.frames=2",
  "--config.data.height=16",
  "--config.data.width=32",
  "--config.data.text_len=4",
  "--config.data.heldout_examples=2",
  "--config.batch_size=2",
  "--config.warmup_steps=0",
  "--config.steps=2",
]


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
  import numpy as np

  from experiments.evaluation import mean_ssim

  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, 16, 16, 3)).cumsum(axis=1)
  assert abs(mean_ssim(image, image) - 1.0) < 1e-9
  slightly, very = image + 0.1 * rng.normal(size=image.shape), image + 3.0 * rng.normal(size=image.shape)
  assert 0.0 < mean_ssim(image, very) < mean_ssim(image, slightly) < 1.0


def test_pipeline_runs_end_to_end_at_tiny_size(tmp_path):
  from experiments import concentration, finetune, report, train_teacher

  teacher, data, runs, results = tmp_path / "teacher", tmp_path / "data", tmp_path / "ft", tmp_path / "results"
  common = ["--teacher", str(teacher)]
  assert (
    train_teacher.main(
      [
        "--workdir",
        str(teacher),
        "--data_dir",
        str(data),
        "--num_examples",
        "8",
        "--num_videos",
        "2",
        "--num_steps",
        "2",
        *TINY,
      ]
    )
    == 0
  )
  assert (teacher / "samples.gif").stat().st_size > 1000
  assert (
    mask_rules.main(
      [
        "--teacher",
        str(teacher),
        "--times",
        "0.5",
        "--sparsity",
        "0.5",
        "--block-q",
        "32",
        "--block-kv",
        "16",
        "--out",
        str(results / "mask_rules_teacher.json"),
        "--figure",
        str(tmp_path / "figures" / "mask_rules_teacher.png"),
      ]
    )
    is None
  )
  teacher_rows = json.loads((results / "mask_rules_teacher.json").read_text())["rows"]
  assert {(r["layer"], r["rule"]) for r in teacher_rows} == {(0, rule) for rule in mask_rules.RULES}  # 1 layer
  assert all(r["t"] == 0.5 and 0 < r["rel_l1"] < 1 for r in teacher_rows)
  assert (tmp_path / "figures" / "mask_heatmaps_teacher.png").is_file()
  frames = tmp_path / "figures" / "sample_frames.png"
  finetune_args = [
    *common,
    "--workdir",
    str(runs),
    "--data_dir",
    str(data),
    "--seeds",
    "1",
    "--steps",
    "1",
    "--sparsities",
    "0.5",
    "--eval_examples",
    "2",
    "--sample_videos",
    "1",
    "--sample_steps",
    "2",
    "--block_q",
    "32",
    "--block_kv",
    "16",
    "--out",
    str(results / "finetune.json"),
    "--frames_figure",
    str(frames),
  ]
  # A budget too small for any run still writes what it has (nothing), marked incomplete; the next call resumes.
  assert finetune.main([*finetune_args, "--minutes", "1e-6"]) == 0
  assert json.loads((results / "finetune.json").read_text())["complete"] is False
  # Shard 1 of 2 runs every other run of the plan; a call without --shard does the rest and collects all.
  assert finetune.main([*finetune_args, "--shard", "1/2"]) == 0
  partial = json.loads((results / "finetune.json").read_text())
  plan = finetune.plan([0.5], 1)
  assert partial["complete"] is False and {r["name"] for r in partial["runs"]} == {
    finetune.run_name(r) for r in plan[1::2]
  }
  assert finetune.main([*finetune_args, "--shard", "2/2"]) == 1  # named error, before any work
  assert finetune.main(finetune_args) == 0
  out = json.loads((results / "finetune.json").read_text())
  assert out["complete"] is True and frames.stat().st_size > 5_000
  assert sorted(r["name"] for r in out["runs"]) == sorted(finetune.run_name(r) for r in plan)
  assert {r["condition"] for r in out["summary"]} == set(finetune.CONDITIONS) | {"full+diffusion-unlike"}
  for row in out["runs"]:
    assert row["velocity_mse"] >= 0 and -1 <= row["ssim"] <= 1 and 0 <= row["sparsity"] < 1
    if row["condition"] != "full+diffusion-unlike":
      assert row["attn_l1"] > 0 and row["sparsity"] > 0  # 16 kv blocks: a 50% mask skips some
  assert (
    concentration.main(
      [
        *common,
        "--finetune",
        str(runs),
        "--eval_examples",
        "2",
        "--times",
        "0.5",
        "--block_q",
        "32",
        "--block_kv",
        "16",
        "--out",
        str(results / "concentration.json"),
      ]
    )
    == 0
  )
  rows = json.loads((results / "concentration.json").read_text())["rows"]
  assert rows[0]["model"] == "teacher" and len(rows) == 2
  assert all(0 < r["blocks_needed"] <= 1 and 0 <= r["rel_l1"] < 1 for r in rows)
  assert (
    report.main(
      ["--results", str(results), "--out", str(tmp_path / "RESULTS.md"), "--figures", str(tmp_path / "figures")]
    )
    == 0
  )
  text = (tmp_path / "RESULTS.md").read_text()
  assert "distill-hybrid" in text and "Not run yet (`python -m experiments.mask_rules`)" in text
  assert "teacher's own attention" in text and "| 0.5 | 0.50 | hybrid |" in text
  assert "figures/sample_frames.png" in text and "Incomplete" not in text


def test_run_all_reads_the_teacher_step_from_finished_checkpoints_only(tmp_path):
  from experiments import run_all

  assert run_all.teacher_step(str(tmp_path)) == 0
  for name in ("500", "1000", "1500.orbax-checkpoint-tmp-3"):
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
  assert run_all.teacher_step(str(tmp_path)) == 1000
  assert run_all.main(["--minutes", "1"]) == 1  # named error, before any stage runs
