"""Teacher against student during distillation: videos both generate from the same noise and text, their PSNR
and SSIM, and the videos themselves (a GIF per eval in ``<workdir>/eval/`` and in TensorBoard).

Both models integrate ``eval.videos`` latents of the eval size with the Euler flow-matching sampler
(``train.flow``, ``eval.num_steps`` steps, ``eval.shift``) without guidance, conditioned on the held-out
examples' captions or, with ``eval.model``, on ``eval.prompts`` through that folder's UMT5. The frozen teacher's
videos are made once. With ``eval.model`` its VAE decodes both to pixels; without (the toy preset: no VAE),
the latents are shown through a fixed RGB projection (``train.sample.rgb_projection`` of the teacher's), as
``train.sample`` does. PSNR and SSIM compare the frames in [0, 1]: the student's against the teacher's.
"""

from __future__ import annotations

import functools
import io
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparge_jax.files import write_bytes_atomic

from . import flow, sharding
from .configs import Config
from .data import Source
from .models import abstract_model, model_configs
from .sample import rgb_projection


def psnr_unit_range(reference: np.ndarray, other: np.ndarray) -> float:
  """PSNR in dB of frames in [0, 1] (peak 1; `train.sample.psnr` takes the reference's range as the peak)."""
  mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(other, np.float64)) ** 2))
  return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _gaussian_window(size: int, sigma: float) -> jax.Array:
  x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  window = jnp.exp(-(x**2) / (2 * sigma**2))
  return window / window.sum()


@functools.partial(jax.jit, static_argnames=("data_range", "window", "sigma"))
def _ssim_per_image(a, b, *, data_range: float, window: int, sigma: float):
  channels = a.shape[-1]
  images = lambda x: jnp.moveaxis(x.reshape(-1, *x.shape[-3:]), -1, 1).reshape(-1, 1, *x.shape[-3:-1])
  a, b = images(a.astype(jnp.float32)), images(b.astype(jnp.float32))  # [images * channels, 1, H, W]
  g = _gaussian_window(window, sigma)

  def blur(x):  # separable Gaussian, valid positions only
    x = jax.lax.conv_general_dilated(x, g.reshape(1, 1, window, 1), (1, 1), "VALID")
    return jax.lax.conv_general_dilated(x, g.reshape(1, 1, 1, window), (1, 1), "VALID")

  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mean_a, mean_b = blur(a), blur(b)
  var_a, var_b = blur(a * a) - mean_a**2, blur(b * b) - mean_b**2
  covariance = blur(a * b) - mean_a * mean_b
  ssim_map = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / (
    (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
  )
  return ssim_map.reshape(-1, channels, *ssim_map.shape[-2:]).mean(axis=(1, 2, 3))


def ssim_per_image(reference, other, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> np.ndarray:
  """SSIM (Wang et al. 2004) of images ``[..., height, width, channels]``, one value per image: a Gaussian
  window (``window`` taps, ``sigma``), valid positions only, each channel separately, then averaged, as
  ``tf.image.ssim``. Images smaller than the window use the largest odd window that fits."""
  reference, other = np.asarray(reference), np.asarray(other)
  if reference.shape != other.shape or reference.ndim < 3:
    raise ValueError(f"reference {reference.shape} and other {other.shape} must be [..., height, width, channels]")
  size = min(window, *reference.shape[-3:-1])
  size -= 1 - size % 2
  values = _ssim_per_image(reference, other, data_range=float(data_range), window=size, sigma=float(sigma))
  return np.asarray(values).reshape(reference.shape[:-3])


def side_by_side(teacher: np.ndarray, student: np.ndarray, *, min_height: int = 128) -> np.ndarray:
  """uint8 frames [frames, videos * H, 3 * W, 3]: per video a row teacher | student | 4 x |difference|, from
  frames in [0, 1] ``[videos, frames, H, W, 3]``, enlarged by a whole factor to at least ``min_height`` rows."""
  difference = np.clip(4 * np.abs(teacher - student).mean(-1, keepdims=True), 0, 1).repeat(3, -1)
  rows = np.concatenate([teacher, student, difference], axis=-2)
  scale = max(1, -(-min_height // teacher.shape[2]))
  rows = rows.repeat(scale, axis=-2).repeat(scale, axis=-3)
  return (np.concatenate(list(rows), axis=-3) * 255).round().astype(np.uint8)


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
  import imageio.v3 as iio  # noqa: PLC0415 (only needed here)

  buffer = io.BytesIO()
  iio.imwrite(buffer, frames, extension=".gif", duration=1000 / fps, loop=0)
  return buffer.getvalue()


def add_gif(writer, tag: str, frames: np.ndarray, data: bytes, step: int) -> None:
  """A GIF as a TensorBoard image summary (its image tab plays it), as tensorboardX's add_video writes one."""
  from tensorboardX.proto.summary_pb2 import Summary  # noqa: PLC0415

  image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3, encoded_image_string=data)
  writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


class VideoEval:
  """Generates the eval videos of teacher and student; see the module docstring.

  heldout: the held-out examples (their captions condition the videos without ``eval.prompts``).
  teacher_params: the frozen teacher's, on ``mesh`` as the trainer placed them.
  """

  def __init__(self, config: Config, heldout: Source, teacher_params: Any, mesh: jax.sharding.Mesh, workdir: str):
    e = config.eval
    self.config, self.directory = config, os.path.join(workdir, "eval")
    self._replicated = sharding.replicated(mesh)
    frames, height, width = (
      getattr(e, n) or size for n, size in zip(("frames", "height", "width"), heldout.latent_shape)
    )
    if e.model:
      from sparge_jax.models import wan_vae  # noqa: PLC0415

      self.vae = wan_vae.load_wan_vae(os.path.join(e.model, "vae"), mesh=mesh)
      self.fps = 16.0
    else:
      self.vae, self.fps = None, 4.0
    context = self._contexts(heldout)
    shape = (e.videos, frames, height, width, config.model.in_channels)
    noise = np.asarray(jax.random.normal(jax.random.key(config.seed + 1), shape, jnp.float32))
    # Global replicated arrays, like the parameters they meet (every process holds the same values).
    noise, context = (jax.device_put(x, self._replicated) for x in (noise, context))
    self._noise, self._context = noise, context
    teacher_config, student_config = model_configs(config)
    self._student = self._sampler(student_config)
    teacher_latents = self._sampler(teacher_config)(teacher_params, noise, context)
    self._projection = None if self.vae is not None else rgb_projection(np.asarray(teacher_latents))
    self.teacher = self._frames(teacher_latents)

  def _contexts(self, heldout: Source) -> np.ndarray:
    e, n = self.config.eval, self.config.eval.videos
    if not e.prompts:
      return np.stack([heldout.get(i % len(heldout))["context"] for i in range(n)]).astype(np.float32)
    from sparge_jax.models import umt5  # noqa: PLC0415

    tokenizer = umt5.load_tokenizer(os.path.join(e.model, "tokenizer"))
    encoder = umt5.load_umt5_encoder(os.path.join(e.model, "text_encoder"))
    prompts = [e.prompts[i % len(e.prompts)] for i in range(n)]
    context = np.asarray(umt5.encode_prompts(tokenizer, encoder, prompts, self.config.data.text_len), np.float32)
    del encoder  # its memory is not needed during training
    return context

  def _sampler(self, model_config):
    graphdef = abstract_model(model_config)[0]
    dtype, e = model_config.compute_dtype, self.config.eval

    @functools.partial(jax.jit, out_shardings=self._replicated)
    def run(params, noise, context):
      def velocity(x, t):
        model = nnx.merge(graphdef, params)
        return model(x.astype(dtype), t, context.astype(dtype)).astype(x.dtype)

      return flow.euler_sample(velocity, noise, num_steps=e.num_steps, shift=e.shift)

    return run

  @functools.cached_property
  def _decode(self):
    from sparge_jax.models import wan_vae  # noqa: PLC0415

    graphdef, state = nnx.split(self.vae)
    config = self.vae.config

    @functools.partial(jax.jit, out_shardings=self._replicated)
    def decode(state, latents):
      video = nnx.merge(graphdef, state).decode(wan_vae.denormalize_latents(latents, config))
      return (jnp.clip(video.astype(jnp.float32), -1, 1) + 1) / 2

    return functools.partial(decode, state)

  def _frames(self, latents) -> np.ndarray:
    """Latents [videos, f, h, w, c] -> frames in [0, 1] [videos, frames, H, W, 3]."""
    if self.vae is not None:
      return np.asarray(self._decode(latents))
    basis, low, high = self._projection
    return np.clip((np.asarray(latents) @ basis - low) / (high - low), 0, 1)

  def __call__(self, student_params: Any, step: int, *, writer=None) -> dict[str, float]:
    """The student's videos at ``step`` against the teacher's: {"psnr", "ssim"} (means over the videos);
    with ``writer`` (process 0) also the GIF, to ``<workdir>/eval/step_NNNNNN.gif`` and TensorBoard."""
    student = self._frames(self._student(student_params, self._noise, self._context))
    metrics = {
      "psnr": float(np.mean([psnr_unit_range(t, s) for t, s in zip(self.teacher, student)])),
      "ssim": float(ssim_per_image(self.teacher, student).mean()),
    }
    if writer is not None:
      frames = side_by_side(self.teacher, student)
      data = gif_bytes(frames, self.fps)
      os.makedirs(self.directory, exist_ok=True)
      write_bytes_atomic(os.path.join(self.directory, f"step_{step:06d}.gif"), data)
      add_gif(writer, "eval/teacher_student_difference", frames, data, step)
    return metrics
