"""Write frames as a video file, whole or not at all.

    export_video(frames, "out.mp4", fps=16)    # H.264 through imageio-ffmpeg's bundled ffmpeg
    export_video(frames, "out.gif", fps=8)     # GIF through imageio
    export_video(frames, "frames", fps=16)     # a folder of PNG frames, frame_00000.png, ...

frames: uint8 [frames, height, width, 3]. Each file is written under a temporary name in the target's
folder and renamed when complete, with the permissions a plain `open` would give it.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sparge_jax.files import creation_mode, write_bytes_atomic

VIDEO_SUFFIXES = (".mp4",)
IMAGE_SUFFIXES = (".gif",)


def check_output_path(path: str | os.PathLike) -> Path:
  """`path` as a Path if `export_video` can write there: a known suffix (or none, for PNG frames), an
  existing writable folder to hold it, and for frames no non-empty folder in the way. ValueError otherwise."""
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix and suffix not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
    raise ValueError(f"path {path}: unknown video format {suffix!r}; use one of {VIDEO_SUFFIXES + IMAGE_SUFFIXES}")
  folder = path.parent
  if not folder.is_dir():
    raise ValueError(f"path {path}: the folder {folder} does not exist")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise ValueError(f"path {path}: the folder {folder} is not writable")
  if path.is_dir() and (suffix or any(path.iterdir())):
    raise ValueError(f"path {path} is a folder that is not empty")
  if suffix and path.exists() and not path.is_file():
    raise ValueError(f"path {path} exists and is not a file")
  return path


def _check_frames(frames) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
    raise ValueError(f"frames must be uint8 [frames >= 1, height, width, 3], got {frames.dtype} {frames.shape}")
  return frames


def export_video(frames, path: str | os.PathLike, fps: float = 16) -> Path:
  """Write `frames` (uint8 [frames, height, width, 3]) to `path` at `fps`; returns the path.

  .mp4: H.264 (yuv420p, so height and width must be even); .gif: GIF; no suffix: a folder of PNG frames.
  """
  frames = _check_frames(frames)
  if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0):
    raise ValueError(f"fps must be a positive number, got {fps!r}")
  path = check_output_path(path)
  suffix = path.suffix.lower()
  if suffix in VIDEO_SUFFIXES:
    if frames.shape[1] % 2 or frames.shape[2] % 2:
      raise ValueError(f"frames: H.264 needs an even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    _write_mp4(frames, path, fps)
  elif suffix in IMAGE_SUFFIXES:
    import imageio.v3 as iio  # noqa: PLC0415 (an optional format's dependency)

    buffer = io.BytesIO()
    iio.imwrite(buffer, frames, extension=".gif", duration=1000 / fps, loop=0)
    write_bytes_atomic(path, buffer.getvalue())
  else:
    _write_png_frames(frames, path)
  return path


def _write_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
  import imageio_ffmpeg  # noqa: PLC0415 (only needed here)

  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
  os.close(fd)
  try:
    writer = imageio_ffmpeg.write_frames(
      tmp,
      (frames.shape[2], frames.shape[1]),
      fps=fps,
      codec="libx264",
      pix_fmt_out="yuv420p",
      quality=8,
      macro_block_size=1,
      ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in frames:
      writer.send(np.ascontiguousarray(frame))
    writer.close()
    with contextlib.suppress(OSError):  # file systems without permissions
      os.chmod(tmp, creation_mode())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def _write_png_frames(frames: np.ndarray, path: Path) -> None:
  import imageio.v3 as iio  # noqa: PLC0415

  staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
  try:
    for i, frame in enumerate(frames):
      iio.imwrite(staging / f"frame_{i:05d}.png", frame)
    with contextlib.suppress(OSError):
      os.chmod(staging, creation_mode(0o777))
    if path.is_dir():
      path.rmdir()  # empty (checked); os.replace cannot replace a folder
    os.replace(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
