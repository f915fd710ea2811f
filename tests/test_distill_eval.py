"""Teacher against student during distillation (train/evaluate.py) and the exported student (train/export.py):
SSIM and PSNR against references, then videos -> make_dataset -> distillation with the eval on the tiny VAE and
UMT5 -> eval videos, metrics, TensorBoard and a diffusers folder; and the toy preset's latent-space eval."""

import json
import os

import jax
import numpy as np
import pytest
import video_fixtures

from train import distill, evaluate, make_dataset


def ssim_reference(a, b, window=11, sigma=1.5, data_range=1.0):
  """SSIM of two [H, W] images in float64 by explicit sums over each valid window position."""
  x = np.arange(window) - (window - 1) / 2
  g = np.exp(-(x**2) / (2 * sigma**2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  values = []
  for i in range(a.shape[0] - window + 1):
    for j in range(a.shape[1] - window + 1):
      pa, pb = a[i : i + window, j : j + window], b[i : i + window, j : j + window]
      ma, mb = (w * pa).sum(), (w * pb).sum()
      va, vb, cov = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum(), (w * (pa - ma) * (pb - mb)).sum()
      values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
  return float(np.mean(values))


def test_ssim_and_psnr_against_references():
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(2, 3, 19, 23, 3))  # [videos, frames, H, W, channels], not window multiples
  b = np.clip(a + rng.normal(scale=0.1, size=a.shape), 0, 1)
  values = evaluate.ssim_per_image(a, b)
  assert values.shape == (2, 3)
  for v in range(2):
    for f in range(3):
      expected = np.mean([ssim_reference(a[v, f, ..., c], b[v, f, ..., c]) for c in range(3)])
      np.testing.assert_allclose(values[v, f], expected, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(evaluate.ssim_per_image(a, a), 1.0, rtol=1e-6)
  noisier = np.clip(a + rng.normal(scale=0.3, size=a.shape), 0, 1)
  assert (evaluate.ssim_per_image(a, noisier) < values).all()
  np.testing.assert_allclose(evaluate.ssim_per_image(b, a), values, rtol=1e-5)  # symmetric
  small = rng.uniform(size=(4, 6, 1))  # smaller than the window: the largest odd window that fits (3)
  np.testing.assert_allclose(
    evaluate.ssim_per_image(small, small * 0.5), ssim_reference(small[..., 0], small[..., 0] * 0.5, window=3), rtol=2e-5
  )
  assert evaluate.psnr_unit_range(a, a) == float("inf")
  np.testing.assert_allclose(evaluate.psnr_unit_range(a, b), 10 * np.log10(1 / np.mean((a - b) ** 2)))
  with pytest.raises(ValueError, match="must be"):
    evaluate.ssim_per_image(a, b[0])


def tensorboard_tags(workdir):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

  events = EventAccumulator(str(workdir), size_guidance={"images": 0, "scalars": 0}).Reload()
  return events, events.Tags()


def test_videos_to_shards_to_distillation_with_pixel_eval_and_an_exported_student(tmp_path):
  from flax import nnx  # noqa: PLC0415

  from sparge_jax.models.wan import load_diffusers  # noqa: PLC0415
  from train import checkpoint  # noqa: PLC0415

  captions = video_fixtures.write_videos(str(tmp_path / "videos"))
  captions_file = video_fixtures.write_captions(str(tmp_path / "captions.jsonl"), captions)
  model = video_fixtures.model_folder(str(tmp_path / "model"))
  dataset = str(tmp_path / "ds")
  assert make_dataset.main(video_fixtures.dataset_args(str(tmp_path / "videos"), captions_file, model, dataset)) == 0

  workdir = tmp_path / "run"
  args = [
    *(f"--config.model.{k}={v}" for k, v in video_fixtures.MODEL.items()),
    f"--config.data.path={dataset}",
    "--config.data.heldout_examples=2",
    "--config.batch_size=2",
    "--config.attention.block_q=16",  # 48 tokens: 3 blocks, so the student's attention is sparse
    "--config.attention.block_kv=16",
    "--config.learning_rate=1e-3",
    "--config.pretrain_teacher.steps=0",
    "--config.steps=4",
    "--config.checkpoint_every=2",
    "--config.eval.every=2",
    "--config.eval.num_steps=3",
    f"--config.eval.model={model}",
    "--config.eval.prompts",
    "a red square",
    "a blue disk",
    "--workdir",
    str(workdir),
  ]
  assert distill.main(args) == 0
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 2, 4]
  for r in evals:
    assert np.isfinite(r["eval_loss"]) and 10 < r["eval_psnr"] < 100 and 0 < r["eval_ssim"] <= 1
  assert sorted(os.listdir(workdir / "eval")) == ["step_000000.gif", "step_000002.gif", "step_000004.gif"]
  import imageio.v3 as iio  # noqa: PLC0415

  frames = iio.imread(workdir / "eval" / "step_000004.gif", index=None)
  assert frames.shape == (5, 2 * 128, 3 * 192, 3)  # VAE frames 5 x 64 x 96, enlarged 2x; 2 videos; 3 panels
  events, tags = tensorboard_tags(workdir)
  assert {"eval/loss", "eval/psnr", "eval/ssim"} <= set(tags["scalars"])
  assert [e.step for e in events.Images("eval/teacher_student_difference")] == [0, 2, 4]
  # The grain iterator state travels with the checkpoint.
  meta = json.load(open(workdir / "checkpoints" / "4" / "meta" / "metadata"))
  assert meta["data_state"]["position"] == meta["data_position"] == 8 and meta["data_state"]["workers"] == 0
  # The student as a diffusers folder, beside the other parts of the eval model's folder.
  export = workdir / "export"
  assert sorted(os.listdir(export)) == ["text_encoder", "tokenizer", "transformer", "vae"]
  assert os.path.realpath(export / "vae") == os.path.realpath(os.path.join(model, "vae"))
  attention = json.load(open(export / "transformer" / "sparge_attention.json"))
  assert attention["kind"] == "sparse" and attention["topk"] == 0.1
  student = load_diffusers(export / "transformer")
  saved = checkpoint.load_params(str(workdir), jax.tree.map(np.asarray, nnx.state(student).to_pure_dict()))
  for a, b in zip(jax.tree.leaves(nnx.state(student).to_pure_dict()), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_toy_preset_evaluates_in_latent_space(tmp_path):
  """No VAE: Euler samples of teacher and student shown through the teacher's RGB projection."""
  import dataclasses  # noqa: PLC0415

  from tensorboardX import SummaryWriter  # noqa: PLC0415

  from train import models, sharding, sources  # noqa: PLC0415
  from train.configs import PRESETS  # noqa: PLC0415

  config = PRESETS["tiny"]()
  config = dataclasses.replace(
    config,
    data=dataclasses.replace(config.data, frames=2, height=12, width=12, synthetic_examples=4, heldout_examples=2),
    eval=dataclasses.replace(config.eval, videos=3, num_steps=2),
  )
  teacher_config, student_config = models.model_configs(config)
  mesh = sharding.make_mesh(-1, 1)
  shardings = sharding.param_shardings(models.abstract_model(teacher_config)[1], mesh)
  teacher = models.init_params(teacher_config, 0, shardings)
  heldout = sources.make_sources(config, student_config)[1]
  videos = evaluate.VideoEval(config, heldout, teacher, mesh, str(tmp_path))
  assert videos.teacher.shape == (3, 2, 12, 12, 3) and 0 <= videos.teacher.min() < videos.teacher.max() <= 1
  with SummaryWriter(str(tmp_path)) as writer:
    same = videos(teacher, 0, writer=writer)  # the student's attention is sparse, its weights the teacher's
    other = videos(models.init_params(teacher_config, 1, shardings), 7, writer=writer)
  assert 0.5 < same["ssim"] < 1 and same["psnr"] > 15
  assert other["ssim"] < same["ssim"] and other["psnr"] < same["psnr"]
  import imageio.v3 as iio  # noqa: PLC0415

  frames = iio.imread(tmp_path / "eval" / "step_000007.gif", index=None)
  assert frames.shape == (2, 3 * 132, 3 * 132, 3)  # 2 x 12 x 12 latents shown 11x; 3 videos; 3 panels
  events, tags = tensorboard_tags(tmp_path)
  assert [e.step for e in events.Images("eval/teacher_student_difference")] == [0, 7]
