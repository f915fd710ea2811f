"""Tiny video files and a tiny Wan diffusers folder for the make_dataset and eval tests.

The folder holds the committed tiny VAE and UMT5 fixtures and a random 2-layer transformer of the widths they
fit (4 latent channels, text width 32). Clips are 5 frames of 64 x 96 pixels (latents 2 x 8 x 12).
"""

import json
import os
import shutil

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
# The make_dataset / distill options for the tiny folder: latents 2 x 8 x 12 x 4, captions 16 x 32.
SIZES = {"frames": 2, "height": 8, "width": 12, "text_len": 16}
MODEL = {"text_dim": 32, "in_channels": 4, "out_channels": 4}


def model_folder(path: str) -> str:
  """A Wan diffusers folder (transformer, vae, text_encoder, tokenizer) of tiny random models at ``path``."""
  from flax import nnx  # noqa: PLC0415

  from sparge_jax.models.wan import WanModel, save_diffusers  # noqa: PLC0415
  from sparge_jax.models.wan import tiny as tiny_wan  # noqa: PLC0415

  os.makedirs(path)
  shutil.copytree(os.path.join(FIXTURES, "wan_vae_tiny", "vae"), os.path.join(path, "vae"))
  for part in ("text_encoder", "tokenizer"):
    shutil.copytree(os.path.join(FIXTURES, "umt5_tiny", part), os.path.join(path, part))
  import dataclasses  # noqa: PLC0415

  config = dataclasses.replace(tiny_wan(), **MODEL)
  save_diffusers(WanModel(config, rngs=nnx.Rngs(3)), os.path.join(path, "transformer"))
  return path


def moving_square(frames: int, height: int, width: int, seed: int) -> np.ndarray:
  """uint8 [frames, height, width, 3]: a coloured square crossing a gradient, different per seed."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  background = (40 + 60 * (x / width) + 40 * rng.uniform() * (y / height)).astype(np.uint8)
  video = np.repeat(np.repeat(background[None, :, :, None], frames, 0), 3, -1)
  colour, size = rng.integers(60, 255, 3), height // 3
  for f in range(frames):
    top, left = (f * 2 + seed * 3) % (height - size), (f * 3 + seed * 5) % (width - size)
    video[f, top : top + size, left : left + size] = colour
  return video


def write_videos(folder: str) -> dict[str, str]:
  """Writes usable and unusable videos to ``folder``; returns the captions file's content by video name.

  Usable: 3 mp4 (16 and 30 fps), a webm, a gif and a folder of png frames, each long enough for 5 frames
  at 16 fps. Unusable: a file of random bytes (broken.mp4), a 2-frame mp4 (short.mp4), and uncaptioned.mp4
  (no caption).
  """
  import imageio.v3 as iio  # noqa: PLC0415

  os.makedirs(folder)
  write = lambda name, video, fps, codec: iio.imwrite(
    os.path.join(folder, name), video, fps=fps, codec=codec, macro_block_size=1
  )
  write("a.mp4", moving_square(8, 48, 64, 0), 16, "libx264")
  write("b.mp4", moving_square(12, 60, 60, 1), 30, "libx264")
  write("c.mp4", moving_square(8, 40, 80, 2), 16, "libx264")
  write("d.webm", moving_square(8, 48, 64, 3), 16, "libvpx-vp9")
  iio.imwrite(os.path.join(folder, "e.gif"), moving_square(6, 48, 64, 4), duration=60, loop=0)
  os.makedirs(os.path.join(folder, "f_frames"))
  for i, frame in enumerate(moving_square(6, 48, 64, 5)):
    iio.imwrite(os.path.join(folder, "f_frames", f"{i}.png"), frame)
  write("short.mp4", moving_square(2, 48, 64, 6), 16, "libx264")
  write("uncaptioned.mp4", moving_square(8, 48, 64, 7), 16, "libx264")
  with open(os.path.join(folder, "broken.mp4"), "wb") as f:
    f.write(np.random.default_rng(0).bytes(2000))
  captions = {
    "a.mp4": "a red square moves right",
    "b": "a square at thirty frames per second",
    "c.mp4": "a wide video",
    "d.webm": "a webm clip",
    "e.gif": "an animated gif",
    "f_frames": "a folder of frames",
    "short.mp4": "too short",
    "broken.mp4": "not a video",
  }
  return captions


def write_captions(path: str, captions: dict[str, str]) -> str:
  with open(path, "w") as f:
    for name, caption in captions.items():
      f.write(json.dumps({"video": name, "caption": caption}) + "\n")
  return path


def dataset_args(videos: str, captions: str, model: str, out: str, *extra: str) -> list[str]:
  """The make_dataset command line for the tiny folder."""
  sizes = [f"--config.{k}={v}" for k, v in SIZES.items()]
  model_fields = [f"--config.model.{k}={v}" for k, v in MODEL.items()]
  return [
    "--videos", videos, "--captions", captions, "--model", model, "--out", out,
    *sizes, *model_fields, "--config.batch_size=2", "--examples_per_shard=2", *extra,
  ]  # fmt: skip
