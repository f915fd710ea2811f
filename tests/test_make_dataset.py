"""train.make_dataset from videos (train/videos.py, train/make_dataset.py): sampling, cropping, the encoders,
the skip report, resuming, byte-identical shards, and its errors."""

import json
import os

import numpy as np
import pytest
import video_fixtures

from train import make_dataset, videos
from train.data import ShardedDataset


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """(videos folder, captions file, model folder)."""
  root = tmp_path_factory.mktemp("inputs")
  captions = video_fixtures.write_videos(str(root / "videos"))
  return (
    str(root / "videos"),
    video_fixtures.write_captions(str(root / "captions.jsonl"), captions),
    video_fixtures.model_folder(str(root / "model")),
  )


@pytest.fixture(scope="module")
def made(inputs, tmp_path_factory):
  """An uninterrupted make_dataset run: (its out folder, its stdout)."""
  out = str(tmp_path_factory.mktemp("made") / "ds")
  assert make_dataset.main(video_fixtures.dataset_args(*inputs, out)) == 0
  return out


# ----------------------------------------------------------------------------- sampling and cropping


def timed(count, fps, height=6, width=8):
  """Source frames whose pixels hold their index."""
  for i in range(count):
    yield i / fps, (i + 1) / fps, np.full((height, width, 3), i, np.uint8)


def test_clip_frames_are_the_source_frames_on_screen_at_the_model_rate():
  spec = videos.ClipSpec(frames=9, height=6, width=8, fps=16)
  # 30 fps: frame i is source frame floor(i * 30 / 16), a stride of 1.875.
  assert list(videos.sample_clip(timed(40, 30), spec)[:, 0, 0, 0]) == [0, 1, 3, 5, 7, 9, 11, 13, 15]
  assert list(videos.sample_clip(timed(9, 16), spec)[:, 0, 0, 0]) == list(range(9))  # 16 fps: every frame
  assert list(videos.sample_clip(timed(5, 8), spec)[:, 0, 0, 0]) == [0, 0, 1, 1, 2, 2, 3, 3, 4]  # 8 fps: twice each
  with pytest.raises(videos.TooShort, match="too short: 0.5 s, the clip needs 0.562 s"):
    videos.sample_clip(timed(8, 16), spec)


def test_only_the_centred_region_of_the_targets_aspect_is_kept():
  frame = np.zeros((40, 80, 3), np.uint8)
  frame[:, :20] = 255  # a white band on each side of a wide frame, outside the centred square
  frame[:, 60:] = 255
  frame[10:30, 30:50] = 128  # and a grey square in the middle
  resized = videos.resize_crop(frame, 16, 16)
  assert resized.shape == (16, 16, 3) and resized.max() < 140  # bicubic overshoots a little, the bands are gone
  assert resized[8, 8, 0] == 128 and not resized[[0, 0, -1, -1], [0, -1, 0, -1]].any()
  assert videos.crop_box(80, 40, 16, 16) == (20, 0, 60, 40)
  assert videos.crop_box(60, 90, 16, 8) == (0, 30, 60, 60)
  assert videos.crop_box(1920, 1080, 832, 480) == (24, 0, 1896, 1080)


def test_every_source_kind_is_read_and_listed_in_name_order(inputs):
  folder, _, _ = inputs
  listed = videos.list_videos(folder)
  assert [v.name for v in listed] == [
    "a.mp4", "b.mp4", "broken.mp4", "c.mp4", "d.webm", "e.gif", "f_frames", "short.mp4", "uncaptioned.mp4",
  ]  # fmt: skip
  spec = videos.ClipSpec(frames=5, height=32, width=48)
  square = video_fixtures.moving_square(8, 48, 64, 0)
  for video in listed:
    if video.name in ("broken.mp4", "short.mp4"):
      continue
    clip = videos.read_clip(video.path, spec)
    assert clip.shape == (5, 32, 48, 3) and clip.std() > 10
  # The decoded mp4 is its source, cropped (64 x 48 is the target's aspect: only resized), up to H.264's loss.
  expected = np.stack([videos.resize_crop(f, 32, 48) for f in square[:5]])
  assert np.abs(videos.read_clip(listed[0].path, spec).astype(float) - expected).mean() < 6
  # The png folder is exact.
  frames = video_fixtures.moving_square(6, 48, 64, 5)[:5]
  expected = np.stack([videos.resize_crop(f, 32, 48) for f in frames])
  np.testing.assert_array_equal(videos.read_clip(listed[6].path, spec), expected)
  with pytest.raises(videos.VideoError, match="cannot be decoded"):
    videos.read_clip(listed[2].path, spec)
  with pytest.raises(videos.TooShort):
    videos.read_clip(listed[7].path, spec)


def test_captions_files_and_their_errors(tmp_path):
  (tmp_path / "c.json").write_text(json.dumps({"x.mp4": "one", "y": "two"}))
  (tmp_path / "c.csv").write_text('video,caption\nx.mp4,"one, with a comma"\n')
  assert videos.read_captions(str(tmp_path / "c.json")) == {"x.mp4": "one", "y": "two"}
  assert videos.read_captions(str(tmp_path / "c.csv")) == {"x.mp4": "one, with a comma"}
  captions = {"x.mp4": "by name", "y": "by stem"}
  assert videos.caption_for(captions, videos.Video("x.mp4", "")) == "by name"
  assert videos.caption_for(captions, videos.Video("sub/y.webm", "")) == "by stem"
  assert videos.caption_for(captions, videos.Video("z.mp4", "")) is None
  (tmp_path / "bad.jsonl").write_text('{"video": "a", "caption": "b"}\n{"video": "a"}\n')
  with pytest.raises(ValueError, match="bad.jsonl.*line 2"):
    videos.read_captions(str(tmp_path / "bad.jsonl"))
  (tmp_path / "c.txt").write_text("a: b\n")
  with pytest.raises(ValueError, match="unknown format"):
    videos.read_captions(str(tmp_path / "c.txt"))


# ----------------------------------------------------------------------------- the command


def test_videos_become_normalised_latents_and_caption_embeddings(made, inputs):
  from flax import nnx  # noqa: PLC0415

  from sparge_jax.models import umt5, wan_vae  # noqa: PLC0415

  folder, _, model = inputs
  dataset = ShardedDataset(made)
  assert len(dataset) == 6 and dataset.latent_shape == (2, 8, 12, 4) and dataset.text_shape == (16, 32)
  report = json.load(open(os.path.join(made, make_dataset.REPORT)))
  assert [e["video"] for e in report["examples"]] == ["a.mp4", "b.mp4", "c.mp4", "d.webm", "e.gif", "f_frames"]
  assert report["examples"][1]["caption"] == "a square at thirty frames per second"  # matched by stem
  reasons = {s["video"]: s["reason"] for s in report["skipped"]}
  assert sorted(reasons) == ["broken.mp4", "short.mp4", "uncaptioned.mp4"] and report["videos"] == 9
  assert "cannot be decoded" in reasons["broken.mp4"] and "too short" in reasons["short.mp4"]
  assert reasons["uncaptioned.mp4"] == "no caption in --captions"
  assert not os.path.exists(made + make_dataset.PARTIAL_SUFFIX)
  # Example 4 (e.gif) against the VAE and the text encoder run here on the same clip and caption.
  vae = wan_vae.load_wan_vae(os.path.join(model, "vae"))
  clip = videos.read_clip(os.path.join(folder, "e.gif"), videos.ClipSpec(frames=5, height=64, width=96))
  mean = nnx.jit(lambda vae, v: vae.encode(v))(vae, clip[None].astype(np.float32) / 127.5 - 1)
  np.testing.assert_allclose(
    dataset.get(4)["latents"], np.asarray(wan_vae.normalize_latents(mean, vae.config))[0], rtol=1e-4, atol=1e-5
  )
  tokenizer = umt5.load_tokenizer(os.path.join(model, "tokenizer"))
  encoder = umt5.load_umt5_encoder(os.path.join(model, "text_encoder"), dtype=np.float32)
  context = np.asarray(umt5.encode_prompts(tokenizer, encoder, ["an animated gif"], 16))[0]
  np.testing.assert_allclose(dataset.get(4)["context"], context, rtol=1e-4, atol=1e-5)
  assert np.abs(context).sum(-1).astype(bool).sum() < 16  # zeros past the caption's tokens


def test_a_resumed_run_writes_byte_identical_shards(made, inputs, tmp_path, monkeypatch):
  out = str(tmp_path / "ds")
  put = make_dataset.ClipStore.put
  calls = []

  def put_then_die(self, *args):
    put(self, *args)
    calls.append(1)
    if len(calls) == 3:  # in the middle of the second batch
      raise KeyboardInterrupt

  monkeypatch.setattr(make_dataset.ClipStore, "put", put_then_die)
  assert make_dataset.main(video_fixtures.dataset_args(*inputs, out)) == 130  # as after Ctrl-C
  monkeypatch.setattr(make_dataset.ClipStore, "put", put)
  partial = out + make_dataset.PARTIAL_SUFFIX
  assert sorted(f for f in os.listdir(partial) if f.startswith("clip")) == [
    "clip-0000000.safetensors", "clip-0000001.safetensors", "clip-0000003.safetensors",
  ]  # fmt: skip
  assert not os.path.exists(out)
  # The rerun encodes only what is missing (batches whose clips are all done or skipped are not read again).
  read, original = [], make_dataset._read
  monkeypatch.setattr(make_dataset, "_read", lambda video, *rest: read.append(video.name) or original(video, *rest))
  assert make_dataset.main(video_fixtures.dataset_args(*inputs, out)) == 0
  assert "a.mp4" not in read and "c.mp4" not in read and "d.webm" in read
  assert sorted(os.listdir(out)) == sorted(os.listdir(made))
  for name in os.listdir(made):
    assert open(os.path.join(out, name), "rb").read() == open(os.path.join(made, name), "rb").read(), name


def test_resuming_with_other_settings_is_refused(inputs, tmp_path, capsys):
  out = str(tmp_path / "ds")
  os.makedirs(out + make_dataset.PARTIAL_SUFFIX)
  with open(os.path.join(out + make_dataset.PARTIAL_SUFFIX, "settings.json"), "w") as f:
    json.dump({"videos": ["x.mp4"], "text_len": 8}, f)
  assert make_dataset.main(video_fixtures.dataset_args(*inputs, out)) == 1
  err = capsys.readouterr().err
  assert "holds clips made with other settings" in err and "videos" in err and "text_len" in err


@pytest.mark.parametrize(
  "change, message",
  [
    (["--config.model.text_dim=24"], "--config.model.text_dim=24: the text encoder is 32 wide"),
    (["--config.model.in_channels=16"], "--config.model.in_channels=16: the VAE makes 4-channel latents"),
    (["--captions", ""], "--captions is required with --source videos"),
    (["--fps", "0"], "--fps must be > 0"),
  ],
)
def test_bad_input_stops_with_one_line(inputs, tmp_path, capsys, change, message):
  args = video_fixtures.dataset_args(*inputs, str(tmp_path / "ds")) + change
  assert make_dataset.main(args) == 1
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1 and "Traceback" not in err
  assert not os.path.exists(tmp_path / "ds")


def test_a_model_folder_without_a_vae_and_no_usable_video(inputs, tmp_path, capsys):
  folder, captions, model = inputs
  assert make_dataset.main(video_fixtures.dataset_args(folder, captions, str(tmp_path), str(tmp_path / "o"))) == 1
  assert "not a Wan diffusers folder (vae/config.json is missing)" in capsys.readouterr().err
  only_broken = tmp_path / "list.txt"
  only_broken.write_text(f"# one bad video\n{os.path.join(folder, 'broken.mp4')}\n")
  assert make_dataset.main(video_fixtures.dataset_args(str(only_broken), captions, model, str(tmp_path / "o"))) == 1
  err = capsys.readouterr().err
  assert "none of the 1 videos could be used" in err
  report = json.load(open(tmp_path / ("o" + make_dataset.PARTIAL_SUFFIX) / make_dataset.REPORT))
  assert report["skipped"][0]["video"].endswith("broken.mp4")


# ----------------------------------------------------------------------------- the throughput benchmark


def test_the_throughput_benchmark_runs_on_a_model_folder_and_writes_its_results(inputs, tmp_path, capsys):
  from benchmarks import make_dataset as benchmark

  out = tmp_path / "make_dataset-cpu.json"
  argv = ["--model", inputs[2], "--latents", "2", "8", "12", "--clips", "3", "--source", "128x96", "--fps", "16"]
  assert benchmark.main([*argv, "--seconds", "1", "--read_workers", "2", "--out", str(out)]) == 0
  saved = json.loads(out.read_text())
  assert saved["device"] == "cpu" and saved["encoders"] == os.path.abspath(inputs[2])
  assert saved["clip"] == "5 frames of 96x64 from 128x96 at 16 fps" and saved["clips"] == 3
  assert saved["clips_per_s"] == pytest.approx(3 / saved["seconds_total"])
  assert [p.name for p in tmp_path.iterdir()] == [out.name]  # written whole, nothing beside it
  with pytest.raises(SystemExit):
    benchmark.main(["--model", str(tmp_path), "--out", str(tmp_path / "x.json")])
  assert "not a Wan diffusers folder" in capsys.readouterr().err
