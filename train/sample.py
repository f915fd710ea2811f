"""Sample teacher and student side by side from the same noise and text; print their PSNR.

    python -m train.sample --workdir runs/tiny-20260101-120000 [--num_videos 2] [--num_steps 30]

(``sparge-sample`` once installed.)
Reads ``<workdir>/config.json`` and the newest student checkpoint, integrates both models with the
Euler flow-matching sampler (``train.flow``, Wan's shift 5 by default) from identical noise and text
(the first captions of the run's data), and writes ``<workdir>/samples.gif``: one row per video,
teacher | student | 4 x |difference|. Latents are shown through a fixed 3-channel projection (the
top principal components of the teacher's samples), not a VAE decode.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparge_jax.files import write_bytes_atomic

from . import checkpoint, cli, errors, flow, sharding
from .configs import Config, from_dict
from .models import abstract_model, model_configs
from .sources import make_source
from .teacher import load_teacher, teacher_spec
from .workdir import check_output_file


@dataclasses.dataclass(frozen=True)
class Args:
  """The command line of ``train.sample``."""

  workdir: str
  """A distillation workdir: its config.json and newest student checkpoint are read."""
  num_videos: int = 2
  """Videos to sample (the first captions of the run's data)."""
  num_steps: int = 30
  """Euler steps per sample."""
  shift: float = 5.0
  """Timestep shift of the sampler (Wan samples with 5)."""
  seed: int = 0
  """Seeds the noise."""
  out: str | None = None
  """The GIF to write (default <workdir>/samples.gif)."""
  scale: int = 8
  """Pixels per latent pixel in the GIF."""


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
  """PSNR in dB, with the reference's value range as the peak."""
  peak = float(reference.max() - reference.min())
  mse = float(np.mean((reference.astype(np.float64) - other) ** 2))
  return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def to_rgb(latents: np.ndarray, basis: np.ndarray, low: np.ndarray, high: np.ndarray, scale: int) -> np.ndarray:
  """latents [..., frames, height, width, channels] -> uint8 [..., frames, height*scale, width*scale, 3]."""
  rgb = np.clip((latents @ basis - low) / (high - low), 0, 1)
  rgb = rgb.repeat(scale, axis=-2).repeat(scale, axis=-3)
  return (rgb * 255).round().astype(np.uint8)


class Models(NamedTuple):
  """A run's teacher and student, placed for sampling, and where each came from."""

  teacher_params: Any
  teacher_source: str
  student_params: Any
  student_checkpoint: str  # the params directory of the newest checkpoint that restores


def load_models(config: Config, workdir: str) -> Models:
  """The teacher of the run `config` and the student of its workdir's newest checkpoint that restores."""
  mesh = sharding.make_mesh(-1, 1) if jax.device_count() == 1 else sharding.make_mesh(1, jax.device_count())
  teacher_config = model_configs(config)[0]
  abstract = abstract_model(teacher_config)[1]
  shardings = sharding.param_shardings(abstract, mesh)
  teacher_params, teacher_source = load_teacher(
    teacher_spec(config, workdir), teacher_config, abstract.to_pure_dict(), shardings, config.seed
  )
  student_params, found = checkpoint.load_newest_params(
    workdir, checkpoint.abstract(abstract.to_pure_dict(), shardings)
  )
  return Models(teacher_params, teacher_source, student_params, found)


def sample_pair(
  config: Config, workdir: str, *, num_videos: int, num_steps: int, shift: float, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
  """Teacher and student samples, float32 [num_videos, frames, height, width, channels] each, and the
  teacher's description."""
  models = load_models(config, workdir)
  teacher, student = sample_models(config, models, num_videos=num_videos, num_steps=num_steps, shift=shift, seed=seed)
  return teacher, student, models.teacher_source


def sample_models(
  config: Config, models: Models, *, num_videos: int, num_steps: int, shift: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Teacher and student samples of `load_models`, float32 [num_videos, frames, height, width, channels] each."""
  teacher_config, student_config = model_configs(config)
  source = make_source(config, student_config)
  context = jnp.stack([source.get(i % len(source))["context"] for i in range(num_videos)])
  noise = jax.random.normal(jax.random.key(seed), (num_videos, *source.latent_shape), jnp.float32)

  def sampler(model_config):
    graphdef = abstract_model(model_config)[0]

    @jax.jit
    def run(params, noise, context):
      dtype = model_config.compute_dtype

      def velocity(x, t):  # merged inside the sampler's scan, where nnx needs it
        model = nnx.merge(graphdef, params)
        return model(x.astype(dtype), t, context.astype(dtype)).astype(x.dtype)

      return flow.euler_sample(velocity, noise, num_steps=num_steps, shift=shift)

    return run

  teacher = sampler(teacher_config)(models.teacher_params, noise, context)
  student = sampler(student_config)(models.student_params, noise, context)
  return np.asarray(teacher), np.asarray(student)


def rgb_projection(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(basis [channels, 3], low, high) for `to_rgb`: the reference latents' top 3 principal directions,
  scaled to their 1st-99th percentiles, so every video shown beside it uses the same colours."""
  pixels = reference.reshape(-1, reference.shape[-1])
  centred = pixels - pixels.mean(0)
  basis = np.linalg.svd(centred, full_matrices=False)[2][:3].T  # [channels, 3]
  if basis.shape[1] < 3:
    basis = np.pad(basis, ((0, 0), (0, 3 - basis.shape[1])))
  projected = pixels @ basis
  return basis, np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0) + 1e-6


def write_gif(path: str, teacher: np.ndarray, student: np.ndarray, scale: int) -> None:
  """Writes the side-by-side GIF (teacher | student | 4 x |difference|, one row per video) to ``path``."""
  import imageio.v3 as iio  # noqa: PLC0415 (only needed here)

  basis, low, high = rgb_projection(teacher)
  # Grey level: 4 x the mean absolute difference over channels, relative to the teacher's value range.
  difference = 4 * np.abs(teacher - student).mean(-1, keepdims=True) / (teacher.max() - teacher.min() + 1e-6)
  grey = (np.clip(difference, 0, 1).repeat(3, -1).repeat(scale, -2).repeat(scale, -3) * 255).astype(np.uint8)
  panels = [to_rgb(teacher, basis, low, high, scale), to_rgb(student, basis, low, high, scale), grey]
  rows = np.concatenate(panels, axis=-2)  # [videos, frames, H, 3W, 3]
  frames = np.concatenate(list(rows), axis=-3)  # [frames, videos*H, 3W, 3]
  buffer = io.BytesIO()
  iio.imwrite(buffer, frames, extension=".gif", duration=250, loop=0)
  write_bytes_atomic(path, buffer.getvalue())


def check(args: Args) -> None:
  if not os.path.isfile(os.path.join(args.workdir, "config.json")):
    raise ValueError(f"--workdir {args.workdir!r}: expected a distillation workdir with config.json")
  for name in ("num_videos", "num_steps", "scale"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.shift <= 0:
    raise ValueError(f"--shift must be > 0, got {args.shift}")


@errors.command
def main(argv: list[str] | None = None) -> int:
  args, code = cli.parse(Args, argv, prog="train.sample", description=__doc__, check=check)
  if code is not None:
    return code
  # Checked before the sampling, which is the long part.
  out = check_output_file(args.out or os.path.join(args.workdir, "samples.gif"), "--out")
  config_file = os.path.join(args.workdir, "config.json")
  try:
    with open(config_file) as f:
      config = from_dict(Config, json.load(f))
  except ValueError as e:  # not JSON, or not a config of this version
    raise ValueError(f"{config_file}: {e}") from None
  models = load_models(config, args.workdir)
  teacher, student = sample_models(
    config, models, num_videos=args.num_videos, num_steps=args.num_steps, shift=args.shift, seed=args.seed
  )
  write_gif(out, teacher, student, args.scale)
  print(f"teacher: {models.teacher_source}")
  print(
    f"student: {models.student_checkpoint} ({config.attention.kind} attention, "
    f"topk {config.attention.topk}, topp {config.attention.topp})"
  )
  print(f"{args.num_videos} videos, {args.num_steps} Euler steps, shift {args.shift}")
  print(
    f"PSNR student vs teacher: {psnr(teacher, student):.2f} dB "
    f"(per video: {', '.join(f'{psnr(t, s):.2f}' for t, s in zip(teacher, student))})"
  )
  print(f"wrote {out} (rows: videos; columns: teacher | student | 4x |difference|)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
