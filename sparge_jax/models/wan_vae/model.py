"""The Wan2.1 video VAE in Flax NNX, number for number with diffusers' `AutoencoderKLWan`. Channels last.

    vae = WanVAE(WanVAEConfig(), rngs=nnx.Rngs(0))         # or load_wan_vae(folder)
    mean = nnx.jit(lambda vae, video: vae.encode(video))(vae, video)        # video [B, F, H, W, 3] in [-1, 1]
    video = nnx.jit(lambda vae, z: vae.decode(z))(vae, denormalize_latents(z, vae.config))

Causality over time. Every 3x3x3 convolution is causal: frame t sees frames t-2..t of its input, with zeros
before the first. The video runs in chunks, as diffusers does (encode: the first frame, then 4 frames at a
time; decode: one latent frame at a time), and each causal convolution carries the last two frames of its
input from one chunk to the next: the cache, an explicit pytree threaded through a `jax.lax.scan` over
the chunks, so memory stays that of one chunk (plus the output) however long the video, and the network
is traced twice whatever the number of frames: once for the first chunk, which differs (the temporal
resamplers skip their time convolution there: one frame in, one out), and once for the scan's step.
A jitted call compiles once per input shape.

Caches are nested tuples mirroring the modules; `None` in place of a module's cache means "the start of
the video" (zeros for convolutions, and the first-chunk rule for the temporal resamplers).

Dtypes: parameters in `param_dtype`, activations in `dtype`; RMS norms and the attention softmax in
float32.

Logical axis names (`nnx.with_partitioning`, as in `sparge_jax.models.wan`): "vae_channels" on the output
channels of every kernel, bias and norm scale; all other axes replicated. A VAE of this size is usually
replicated whole (no rule for "vae_channels") and parallelised over the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# diffusers AutoencoderKLWan's defaults: the Wan2.1 VAE's per-channel latent statistics.
_WAN21_LATENTS_MEAN = (
  -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_WAN21_LATENTS_STD = (
  2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
# diffusers encodes a video as its first frame, then chunks of this many frames.
ENCODE_CHUNK_FRAMES = 4
# Frames of its own input a causal 3x3x3 convolution keeps between chunks (diffusers' CACHE_T).
CACHE_FRAMES = 2


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  """diffusers `AutoencoderKLWan` config.json fields (Wan2.1 defaults; `temperal` is diffusers' spelling)."""

  base_dim: int = 96
  decoder_base_dim: int | None = None
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] = _WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = _WAN21_LATENTS_STD
  in_channels: int = 3
  out_channels: int = 3

  def __post_init__(self):
    for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
      value = getattr(self, name)
      if isinstance(value, str) or not hasattr(value, "__len__"):
        raise ValueError(f"{name} must be a list, got {value!r}")
      object.__setattr__(self, name, tuple(value))
    if self.decoder_base_dim is None:
      object.__setattr__(self, "decoder_base_dim", self.base_dim)
    for name in ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not self.dim_mult or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in self.dim_mult):
      raise ValueError(f"dim_mult must be a non-empty list of positive ints, got {list(self.dim_mult)}")
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(
        f"temperal_downsample must have len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
        f"got {list(self.temperal_downsample)}"
      )
    if not all(isinstance(t, bool) for t in self.temperal_downsample):
      raise ValueError(f"temperal_downsample must be booleans, got {list(self.temperal_downsample)}")
    if ENCODE_CHUNK_FRAMES % self.temporal_compression:
      raise ValueError(
        f"temperal_downsample {list(self.temperal_downsample)}: at most 2 temporal halvings fit the "
        f"{ENCODE_CHUNK_FRAMES}-frame encoding chunks"
      )
    for name in ("latents_mean", "latents_std"):
      if len(getattr(self, name)) != self.z_dim:
        raise ValueError(f"{name} must have z_dim = {self.z_dim} entries, got {len(getattr(self, name))}")
    for name in ("latents_mean", "latents_std"):
      if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in getattr(self, name)):
        raise ValueError(f"{name} must be numbers, got {list(getattr(self, name))}")
    if not all(s > 0 for s in self.latents_std):
      raise ValueError(f"latents_std must be positive, got {list(self.latents_std)}")

  @property
  def temporal_compression(self) -> int:
    """Video frames per latent frame after the first."""
    return 2 ** sum(self.temperal_downsample)

  @property
  def spatial_compression(self) -> int:
    """Video pixels per latent pixel along height and width."""
    return 2 ** (len(self.dim_mult) - 1)


def normalize_latents(latents, config: WanVAEConfig):
  """The encoder's latents [..., z_dim] as the DiT sees them: (z - mean) * (1 / std), as diffusers writes it."""
  mean = jnp.asarray(config.latents_mean, jnp.float32)
  inv_std = 1.0 / jnp.asarray(config.latents_std, jnp.float32)
  return ((latents.astype(jnp.float32) - mean) * inv_std).astype(latents.dtype)


def denormalize_latents(latents, config: WanVAEConfig):
  """The DiT's latents [..., z_dim] as the decoder takes them: z / (1 / std) + mean (WanPipeline's expression)."""
  mean = jnp.asarray(config.latents_mean, jnp.float32)
  inv_std = 1.0 / jnp.asarray(config.latents_std, jnp.float32)
  return (latents.astype(jnp.float32) / inv_std + mean).astype(latents.dtype)


def _partitioned(initializer, axes):
  return nnx.with_partitioning(initializer, axes, eager_sharding=False)


@dataclasses.dataclass(frozen=True)
class _Dtypes:
  param: Any
  compute: Any


class Conv(nnx.Module):
  """A convolution over the trailing spatial axes, channels last; `kernel: [*window, in, out]`.

  3-D windows run over [batch, frames, height, width, channels], 2-D ones over [batch, height, width,
  channels], a 1x1 window is a matmul. Spatial padding is "same" for odd windows; time is never padded
  here (see `CausalConv3d`).
  """

  def __init__(self, in_channels, out_channels, window, dtypes: _Dtypes, rngs: nnx.Rngs, *, stride=None):
    self.window = tuple(window)
    self.stride = tuple(stride or (1,) * len(window))
    self.dtype = dtypes.compute
    kernel_init = nnx.initializers.lecun_normal(in_axis=tuple(range(len(window) + 1)), out_axis=len(window) + 1)
    axes = (None,) * (len(window) + 1) + ("vae_channels",)
    self.kernel = nnx.Param(
      _partitioned(kernel_init, axes)(rngs.params(), (*window, in_channels, out_channels), dtypes.param)
    )
    self.bias = nnx.Param(
      _partitioned(nnx.initializers.zeros_init(), ("vae_channels",))(rngs.params(), (out_channels,), dtypes.param)
    )

  def __call__(self, x, *, padding=None):
    """padding: explicit (low, high) pairs per window axis; default: "same" spatially, none in time."""
    kernel = self.kernel[...].astype(self.dtype)
    x = x.astype(self.dtype)
    if math.prod(self.window) == 1:
      y = jnp.einsum("...c,cd->...d", x, kernel.reshape(kernel.shape[-2:]))
    else:
      if padding is None:
        spatial = [((k - 1) // 2,) * 2 for k in self.window[-2:]]
        padding = [(0, 0)] * (len(self.window) - 2) + spatial
      spatial_dims = "DHW"[-len(self.window) :]
      layout = ("N" + spatial_dims + "C", spatial_dims + "IO", "N" + spatial_dims + "C")
      y = jax.lax.conv_general_dilated(x, kernel, self.stride, padding, dimension_numbers=layout)
    return y + self.bias[...].astype(self.dtype)


class CausalConv3d(Conv):
  """Conv3d causal in time: each output frame sees this and the previous `window[0] - 1` input frames."""

  def causal(self, x, cache):
    """x: [batch, frames, height, width, in]; cache: [batch, window[0] - 1, height, width, in], the input's
    previous frames (None: zeros, the start of the video). Returns (y [batch, frames, ..., out], cache)."""
    history = self.window[0] - 1
    if history == 0:
      return self(x), ()
    x = x.astype(self.dtype)
    if cache is None:
      cache = jnp.zeros((x.shape[0], history, *x.shape[2:]), x.dtype)
    full = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    return self(full), full[:, -history:]


class RMSNorm(nnx.Module):
  """diffusers' WanRMS_norm over channels: x / max(|x|_2, 1e-12) * sqrt(channels) * gamma, in float32."""

  def __init__(self, channels: int, dtypes: _Dtypes, rngs: nnx.Rngs):
    self.gamma = nnx.Param(
      _partitioned(nnx.initializers.ones_init(), ("vae_channels",))(rngs.params(), (channels,), dtypes.param)
    )

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    scale = math.sqrt(x.shape[-1]) * self.gamma[...].astype(jnp.float32)
    return (x32 / jnp.maximum(norm, 1e-12) * scale).astype(x.dtype)


class ResidualBlock(nnx.Module):
  """norm, SiLU, causal conv, twice, plus a (1x1x1-projected) shortcut. Cache: (conv1's, conv2's)."""

  def __init__(self, in_dim: int, out_dim: int, dtypes: _Dtypes, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(in_dim, dtypes, rngs)
    self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), dtypes, rngs)
    self.norm2 = RMSNorm(out_dim, dtypes, rngs)
    self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), dtypes, rngs)
    self.conv_shortcut = CausalConv3d(in_dim, out_dim, (1, 1, 1), dtypes, rngs) if in_dim != out_dim else None

  def __call__(self, x, cache):
    cache1, cache2 = cache or (None, None)
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    h, cache1 = self.conv1.causal(jax.nn.silu(self.norm1(x)), cache1)
    h, cache2 = self.conv2.causal(jax.nn.silu(self.norm2(h)), cache2)
    return h + shortcut, (cache1, cache2)


class AttentionBlock(nnx.Module):
  """Single-head self-attention over each frame's pixels, plus the input (diffusers' WanAttentionBlock)."""

  def __init__(self, dim: int, dtypes: _Dtypes, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim, dtypes, rngs)
    self.to_qkv = Conv(dim, 3 * dim, (1, 1), dtypes, rngs)
    self.proj = Conv(dim, dim, (1, 1), dtypes, rngs)

  def __call__(self, x):
    """x: [batch, frames, height, width, dim]."""
    batch, frames, height, width, dim = x.shape
    qkv = self.to_qkv(self.norm(x)).reshape(batch * frames, height * width, 1, 3 * dim)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    out = jax.nn.dot_product_attention(q, k, v).reshape(x.shape)
    return x + self.proj(out)


class MidBlock(nnx.Module):
  """Residual block, attention, residual block. Cache: the two residual blocks'."""

  def __init__(self, dim: int, dtypes: _Dtypes, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(dim, dim, dtypes, rngs) for _ in range(2)])
    self.attentions = nnx.List([AttentionBlock(dim, dtypes, rngs)])

  def __call__(self, x, cache):
    cache = cache or (None, None)
    x, first = self.resnets[0](x, cache[0])
    x, second = self.resnets[1](self.attentions[0](x), cache[1])
    return x, (first, second)


class Resample(nnx.Module):
  """Halve or double height and width, and for the "3d" modes also time.

  upsample: nearest 2x, then a 3x3 conv to dim / 2 channels; upsample3d first doubles the frames with
  a causal (3, 1, 1) conv to 2 * dim channels, the two halves being frames 2t and 2t + 1. Cache: that
  conv's. In the first chunk it is skipped (one frame stays one), and its cache stays zeros: the
  frames it later sees start after the first.
  downsample: pad bottom/right by one, a 3x3 conv of stride 2; downsample3d then a (3, 1, 1) conv of
  stride 2 over the previous chunk's last frame and this chunk's (no zeros). Cache: the last frame. In
  the first chunk it is skipped: one frame stays one.
  """

  def __init__(self, dim: int, mode: str, dtypes: _Dtypes, rngs: nnx.Rngs):
    self.mode = mode
    if mode.startswith("upsample"):
      self.resample = Conv(dim, dim // 2, (3, 3), dtypes, rngs)
      self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), dtypes, rngs) if mode == "upsample3d" else None
    elif mode.startswith("downsample"):
      self.resample = Conv(dim, dim, (3, 3), dtypes, rngs, stride=(2, 2))
      self.time_conv = Conv(dim, dim, (3, 1, 1), dtypes, rngs, stride=(2, 1, 1)) if mode == "downsample3d" else None
    else:
      raise ValueError(f"mode must be upsample2d/3d or downsample2d/3d, got {mode!r}")

  def __call__(self, x, cache):
    new_cache = ()
    if self.mode == "upsample3d":
      if cache is None:
        new_cache = jnp.zeros((x.shape[0], CACHE_FRAMES, *x.shape[2:]), self.time_conv.dtype)
      else:
        x, new_cache = self.time_conv.causal(x, cache)
        b, t, h, w, _ = x.shape
        x = x.reshape(b, t, h, w, 2, -1).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, -1)
    b, t, h, w, c = x.shape
    frames = x.reshape(b * t, h, w, c)
    if self.mode.startswith("upsample"):
      frames = jnp.broadcast_to(frames[:, :, None, :, None], (b * t, h, 2, w, 2, c)).reshape(b * t, 2 * h, 2 * w, c)
      frames = self.resample(frames)
    else:
      frames = self.resample(frames, padding=((0, 1), (0, 1)))
    x = frames.reshape(b, t, *frames.shape[1:])
    if self.mode == "downsample3d":
      new_cache = x[:, -1:]
      if cache is not None:
        x = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
    return x, new_cache


class Encoder(nnx.Module):
  """Video [batch, frames, H, W, in_channels] -> [batch, latent frames, H / s, W / s, 2 * z_dim]."""

  def __init__(self, config: WanVAEConfig, dtypes: _Dtypes, rngs: nnx.Rngs):
    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    self.conv_in = CausalConv3d(config.in_channels, dims[0], (3, 3, 3), dtypes, rngs)
    blocks = []
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(config.num_res_blocks):
        blocks.append(ResidualBlock(in_dim, out_dim, dtypes, rngs))
        in_dim = out_dim
      if level < len(config.temperal_downsample):
        mode = "downsample3d" if config.temperal_downsample[level] else "downsample2d"
        blocks.append(Resample(out_dim, mode, dtypes, rngs))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], dtypes, rngs)
    self.norm_out = RMSNorm(dims[-1], dtypes, rngs)
    self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, (3, 3, 3), dtypes, rngs)

  def __call__(self, x, cache=None):
    """One chunk; cache None for the first. Returns (out, cache)."""
    cache = cache or (None, (None,) * len(self.down_blocks), None, None)
    x, conv_in = self.conv_in.causal(x, cache[0])
    blocks = []
    for block, block_cache in zip(self.down_blocks, cache[1]):
      x, block_cache = block(x, block_cache)
      blocks.append(block_cache)
    x, mid = self.mid_block(x, cache[2])
    x, conv_out = self.conv_out.causal(jax.nn.silu(self.norm_out(x)), cache[3])
    return x, (conv_in, tuple(blocks), mid, conv_out)


class UpBlock(nnx.Module):
  """num_res_blocks + 1 residual blocks, then an optional upsampler. Cache: (residual blocks', upsampler's)."""

  def __init__(self, in_dim, out_dim, num_res_blocks, upsample_mode, dtypes: _Dtypes, rngs: nnx.Rngs):
    self.resnets = nnx.List(
      [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dtypes, rngs) for i in range(num_res_blocks + 1)]
    )
    self.upsampler = Resample(out_dim, upsample_mode, dtypes, rngs) if upsample_mode else None

  def __call__(self, x, cache):
    resnet_caches, upsampler_cache = cache or ((None,) * len(self.resnets), None)
    new_caches = []
    for resnet, resnet_cache in zip(self.resnets, resnet_caches):
      x, resnet_cache = resnet(x, resnet_cache)
      new_caches.append(resnet_cache)
    if self.upsampler is not None:
      x, upsampler_cache = self.upsampler(x, upsampler_cache)
    else:
      upsampler_cache = ()
    return x, (tuple(new_caches), upsampler_cache)


class Decoder(nnx.Module):
  """Latents [batch, frames, h, w, z_dim] -> video [batch, frames', h * s, w * s, out_channels]."""

  def __init__(self, config: WanVAEConfig, dtypes: _Dtypes, rngs: nnx.Rngs):
    mults = config.dim_mult
    dims = [config.decoder_base_dim * m for m in (mults[-1], *mults[::-1])]
    upsample_time = config.temperal_downsample[::-1]
    self.conv_in = CausalConv3d(config.z_dim, dims[0], (3, 3, 3), dtypes, rngs)
    self.mid_block = MidBlock(dims[0], dtypes, rngs)
    blocks = []
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if level > 0:
        in_dim //= 2  # the previous block's upsampler halved its channels
      mode = None
      if level < len(upsample_time):
        mode = "upsample3d" if upsample_time[level] else "upsample2d"
      blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks, mode, dtypes, rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], dtypes, rngs)
    self.conv_out = CausalConv3d(dims[-1], config.out_channels, (3, 3, 3), dtypes, rngs)

  def __call__(self, x, cache=None):
    """One chunk; cache None for the first. Returns (out, cache)."""
    cache = cache or (None, None, (None,) * len(self.up_blocks), None)
    x, conv_in = self.conv_in.causal(x, cache[0])
    x, mid = self.mid_block(x, cache[1])
    blocks = []
    for block, block_cache in zip(self.up_blocks, cache[2]):
      x, block_cache = block(x, block_cache)
      blocks.append(block_cache)
    x, conv_out = self.conv_out.causal(jax.nn.silu(self.norm_out(x)), cache[3])
    return x, (conv_in, mid, tuple(blocks), conv_out)


def _run_chunks(step, first, rest):
  """step(chunk, cache) -> (out, cache) on `first` [batch, ...] (cache None), then scanned over `rest`
  [chunks, batch, ...]. Returns the outputs joined along frames (axis 1)."""
  out, cache = step(first, None)
  if rest.shape[0] == 0:
    return out
  _, outs = jax.lax.scan(lambda cache, chunk: step(chunk, cache)[::-1], cache, rest)
  outs = jnp.moveaxis(outs, 0, 1)  # [batch, chunks, frames per chunk, ...]
  return jnp.concatenate([out, outs.reshape(outs.shape[0], -1, *outs.shape[3:])], axis=1)


class WanVAE(nnx.Module):
  """Encoder, decoder and the 1x1x1 quant convs of diffusers' AutoencoderKLWan. See the module docstring."""

  def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
    if not isinstance(config, WanVAEConfig):
      raise ValueError(f"config must be a WanVAEConfig, got {type(config).__name__}")
    self.config = config
    dtypes = _Dtypes(param_dtype, dtype)
    self.dtype = dtype
    self.encoder = Encoder(config, dtypes, rngs)
    self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, (1, 1, 1), dtypes, rngs)
    self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, (1, 1, 1), dtypes, rngs)
    self.decoder = Decoder(config, dtypes, rngs)

  def encode(self, video, *, return_logvar: bool = False):
    """video: [batch, frames, height, width, in_channels] in [-1, 1], frames = 1 + 4k, height and width
    multiples of `config.spatial_compression`.

    Returns the posterior's mean [batch, 1 + k * 4 / temporal_compression, height / s, width / s, z_dim]
    (for Wan2.1: (frames - 1) // 4 + 1 frames, s = 8) in `dtype`, and with `return_logvar` also its
    log-variance, clipped to [-30, 20] as diffusers does.
    """
    c, video = self.config, jnp.asarray(video)
    if video.ndim != 5 or video.shape[-1] != c.in_channels:
      raise ValueError(f"video must be [batch, frames, height, width, {c.in_channels}], got shape {video.shape}")
    frames, height, width = video.shape[1:4]
    if (frames - 1) % ENCODE_CHUNK_FRAMES:
      raise ValueError(f"video frames must be 1 + {ENCODE_CHUNK_FRAMES}k (the encoder's chunks), got {frames}")
    s = c.spatial_compression
    if height % s or width % s:
      raise ValueError(f"video height and width must be multiples of {s}, got {height}x{width}")
    video = video.astype(self.dtype)
    rest = video[:, 1:].reshape(video.shape[0], -1, ENCODE_CHUNK_FRAMES, *video.shape[2:])
    encoded = _run_chunks(self.encoder, video[:, :1], jnp.moveaxis(rest, 1, 0))
    mean, logvar = jnp.split(self.quant_conv(encoded), 2, axis=-1)
    return (mean, jnp.clip(logvar, -30.0, 20.0)) if return_logvar else mean

  def decode(self, latents):
    """latents: [batch, frames, height, width, z_dim], denormalized (see `denormalize_latents`).

    Returns the video [batch, 1 + (frames - 1) * temporal_compression, height * s, width * s,
    out_channels] (for Wan2.1: 4 * (frames - 1) + 1 frames, s = 8) in `dtype`, clipped to [-1, 1].
    """
    c, latents = self.config, jnp.asarray(latents)
    if latents.ndim != 5 or latents.shape[-1] != c.z_dim or latents.shape[1] < 1:
      raise ValueError(f"latents must be [batch, frames >= 1, height, width, {c.z_dim}], got shape {latents.shape}")
    z = self.post_quant_conv(latents)
    video = _run_chunks(self.decoder, z[:, :1], jnp.moveaxis(z[:, 1:, None], 1, 0))
    return jnp.clip(video, -1.0, 1.0)
