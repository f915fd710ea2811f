"""Training clips from video files: find them, pair them with captions, decode, sample in time, resize and crop.

    videos = list_videos("clips/")                       # or a text file listing one path per line
    captions = read_captions("captions.jsonl")            # or .json / .csv
    clip = read_clip(videos[0].path, ClipSpec(frames=81, height=480, width=832))   # uint8 [81, 480, 832, 3]

Sources: mp4, webm, mov, mkv and avi files (decoded by imageio-ffmpeg's ffmpeg), gif files (Pillow, with each
frame's own duration) and folders of frames (png, jpg, jpeg, webp or bmp, in natural name order, at
``folder_fps``).

Time: frame ``i`` of a clip is the source frame on screen at ``start + i / fps`` seconds (``fps``: the model's
rate, 16 for Wan2.1), so a 30 fps source has its frames 0, 1, 3, 5, 7, 9, 11, 13, 15, 16, ... taken (a stride of
1.875 source frames) and a 16 fps source every frame. The clip is the first ``frames / fps`` seconds of the
video (``start = 0``); the rest of a longer video is not used. A video that ends before that is too short and
is skipped (``TooShort``). Wan's VAE needs ``1 + 4k`` frames (81 = 1 + 4 * 20 gives 21 latent frames).

Space: the largest centred region with the target's aspect ratio is cut out and resized (Pillow, bicubic with
antialiasing) to exactly ``height x width``; both must be multiples of the VAE's factor 8.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterator

import numpy as np

# ffmpeg runs as a child process, started by subprocess with fork and an immediate exec, which is safe in a
# multithreaded program; JAX's warning about forking cannot tell that apart.
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning, module="subprocess")

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Browsers show GIF frames with a delay of 0 or 1 centiseconds for 100 ms.
_GIF_MIN_DURATION_MS, _GIF_DEFAULT_DURATION_MS = 20, 100


class VideoError(Exception):
  """A video that cannot be used; the message says why (the caller skips it)."""


class TooShort(VideoError):
  """A video shorter than the clip."""


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """The clip the model trains on: ``frames`` frames at ``fps``, ``height x width`` pixels."""

  frames: int
  height: int
  width: int
  fps: float = 16.0

  def __post_init__(self):
    for name in ("frames", "height", "width"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not self.fps > 0:
      raise ValueError(f"fps must be > 0, got {self.fps}")

  @property
  def seconds(self) -> float:
    return self.frames / self.fps


@dataclasses.dataclass(frozen=True)
class Video:
  """One source: ``name`` (its path relative to the listed folder or list file, the key for captions)."""

  name: str
  path: str


def _natural_key(text: str) -> list:
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _frame_files(folder: str) -> list[str]:
  return sorted((f for f in os.listdir(folder) if f.lower().endswith(FRAME_SUFFIXES)), key=_natural_key)


def list_videos(spec: str) -> list[Video]:
  """The videos of a folder (searched recursively; a folder holding frame images is one video), or of a
  text file listing one video file or frame folder per line (relative paths are relative to the file; blank
  lines and lines starting with # are ignored). Sorted by name, so the order never depends on the file system.
  """
  if os.path.isdir(spec):
    videos = []
    for root, dirs, files in os.walk(spec):
      dirs.sort()
      if _frame_files(root) and root != spec:
        videos.append(Video(os.path.relpath(root, spec), root))
        dirs.clear()  # a frame folder is one video; nothing below it is searched
        continue
      for file in files:
        if file.lower().endswith(VIDEO_SUFFIXES):
          path = os.path.join(root, file)
          videos.append(Video(os.path.relpath(path, spec), path))
    return sorted(videos, key=lambda v: _natural_key(v.name))
  if os.path.isfile(spec):
    base = os.path.dirname(os.path.abspath(spec))
    with open(spec, encoding="utf-8") as f:
      lines = [line.strip() for line in f]
    names = [line for line in lines if line and not line.startswith("#")]
    return [Video(name, name if os.path.isabs(name) else os.path.join(base, name)) for name in names]
  raise ValueError(f"--videos {spec!r}: no such folder or list file")


def read_captions(path: str) -> dict[str, str]:
  """Captions by video name from ``path``: a JSON object ``{name: caption}``, JSON lines
  ``{"video": name, "caption": text}``, or a CSV file with ``video`` and ``caption`` columns.
  Raises ValueError naming the file and the line for anything else."""
  if not os.path.isfile(path):
    raise ValueError(f"--captions {path!r}: no such file")
  suffix = os.path.splitext(path)[1].lower()
  captions: dict[str, str] = {}
  try:
    with open(path, encoding="utf-8", newline="") as f:
      if suffix == ".json":
        captions = json.load(f)
        if not isinstance(captions, dict):
          raise ValueError("expected a JSON object {video: caption}")
      elif suffix == ".jsonl":
        for number, line in enumerate(f, 1):
          if line.strip():
            record = json.loads(line)
            if not isinstance(record, dict) or "video" not in record or "caption" not in record:
              raise ValueError(f"line {number}: expected {{'video': ..., 'caption': ...}}")
            captions[str(record["video"])] = record["caption"]
      elif suffix == ".csv":
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"video", "caption"} <= set(reader.fieldnames):
          raise ValueError(f"expected the columns video and caption, got {reader.fieldnames}")
        captions = {row["video"]: row["caption"] for row in reader}
      else:
        raise ValueError("unknown format; use .json, .jsonl or .csv")
  except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
    raise ValueError(f"--captions {path!r}: {e}") from None
  except ValueError as e:
    raise ValueError(f"--captions {path!r}: {e}") from None
  bad = [name for name, text in captions.items() if not isinstance(text, str)]
  if bad:
    raise ValueError(f"--captions {path!r}: the caption of {bad[0]!r} is not a string")
  return captions


def caption_for(captions: dict[str, str], video: Video) -> str | None:
  """The caption of ``video``: by its name, else its file name, else its file name without the suffix."""
  base = os.path.basename(video.name.rstrip("/"))
  for key in (video.name, base, os.path.splitext(base)[0]):
    if key in captions:
      return captions[key]
  return None


# ----------------------------------------------------------------------------- decoding


def _ffmpeg_frames(path: str) -> Iterator[tuple[float, float, np.ndarray]]:
  import imageio_ffmpeg  # noqa: PLC0415 (only for video files)

  reader = imageio_ffmpeg.read_frames(path)
  try:
    try:
      meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as e:
      raise VideoError(f"cannot be decoded ({str(e).strip().splitlines()[-1] if str(e).strip() else e})") from None
    width, height = meta["size"]
    fps = meta.get("fps") or 0
    if not (width and height and fps > 0):
      raise VideoError(f"cannot be decoded (size {width}x{height}, fps {fps})")
    index = 0
    while True:
      try:
        data = next(reader)
      except StopIteration:
        return
      except (OSError, RuntimeError) as e:
        raise VideoError(f"cannot be decoded at frame {index} ({e})") from None
      frame = np.frombuffer(data, np.uint8).reshape(height, width, 3)
      yield index / fps, (index + 1) / fps, frame
      index += 1
  finally:
    reader.close()


def _gif_frames(path: str) -> Iterator[tuple[float, float, np.ndarray]]:
  from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

  try:
    image = Image.open(path)
  except (OSError, UnidentifiedImageError) as e:
    raise VideoError(f"cannot be decoded ({e})") from None
  with image:
    start_ms, index = 0, 0
    while True:
      try:
        image.seek(index)
        frame = np.asarray(image.convert("RGB"))
      except EOFError:
        return
      except OSError as e:
        raise VideoError(f"cannot be decoded at frame {index} ({e})") from None
      duration = image.info.get("duration") or _GIF_DEFAULT_DURATION_MS
      duration = duration if duration >= _GIF_MIN_DURATION_MS else _GIF_DEFAULT_DURATION_MS
      yield start_ms / 1000, (start_ms + duration) / 1000, frame
      start_ms += duration
      index += 1


def _folder_frames(path: str, fps: float) -> Iterator[tuple[float, float, np.ndarray]]:
  from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

  for index, file in enumerate(_frame_files(path)):
    try:
      with Image.open(os.path.join(path, file)) as image:
        frame = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
      raise VideoError(f"frame {file} cannot be decoded ({e})") from None
    yield index / fps, (index + 1) / fps, frame


def timed_frames(path: str, *, folder_fps: float = 16.0) -> Iterator[tuple[float, float, np.ndarray]]:
  """``(start_s, end_s, frame uint8 [H, W, 3])`` of each source frame, decoded lazily."""
  if os.path.isdir(path):
    return _folder_frames(path, folder_fps)
  if not os.path.isfile(path):
    raise VideoError("no such file")
  if path.lower().endswith(".gif"):
    return _gif_frames(path)
  return _ffmpeg_frames(path)


def crop_box(source_width: int, source_height: int, width: int, height: int) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of the largest centred region of the source with the aspect ``width / height``
  (to the nearest pixel)."""
  if source_width * height > width * source_height:  # wider than the target: cut the sides
    kept = round(source_height * width / height)
    left = (source_width - kept) // 2
    return (left, 0, left + kept, source_height)
  kept = round(source_width * height / width)
  top = (source_height - kept) // 2
  return (0, top, source_width, top + kept)


def resize_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [height, width, 3]: the centred crop of the target's aspect, resized (cut before
  resizing, so nothing outside the crop leaks in through the filter)."""
  from PIL import Image  # noqa: PLC0415

  image = Image.fromarray(frame).crop(crop_box(frame.shape[1], frame.shape[0], width, height))
  return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))


def sample_clip(frames: Iterator[tuple[float, float, np.ndarray]], spec: ClipSpec) -> np.ndarray:
  """The clip of ``spec`` from timed source frames (see the module docstring): uint8 [frames, height, width, 3].

  Reads only as far as the clip needs. Raises ``TooShort`` if the source ends first.
  """
  clip = np.empty((spec.frames, spec.height, spec.width, 3), np.uint8)
  current, resized, duration = None, None, 0.0
  for i in range(spec.frames):
    t = i / spec.fps
    while current is None or current[1] <= t:
      current = next(frames, None)
      if current is None:
        raise TooShort(f"too short: {duration:.3g} s, the clip needs {spec.seconds:.3g} s")
      duration, resized = current[1], None
    if resized is None:
      resized = resize_crop(current[2], spec.height, spec.width)
    clip[i] = resized
  return clip


def read_clip(path: str, spec: ClipSpec, *, folder_fps: float = 16.0) -> np.ndarray:
  """The clip of ``spec`` from the video at ``path``: uint8 [frames, height, width, 3]; ``VideoError`` if the
  video cannot be decoded or is too short."""
  frames = timed_frames(path, folder_fps=folder_fps)
  try:
    return sample_clip(frames, spec)
  finally:
    close = getattr(frames, "close", None)
    if close is not None:
      close()
