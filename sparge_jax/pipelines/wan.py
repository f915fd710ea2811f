"""Wan2.1 text-to-video in JAX: prompt -> UMT5 -> denoising with classifier-free guidance -> VAE decode -> frames.

    pipe = WanPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")
    frames = pipe("a corgi surfing a wave", num_steps=50, seed=0)          # uint8 [1, 81, 480, 832, 3]
    export_video(frames[0], "corgi.mp4", fps=16)
    frames = pipe(prompt, schedule=AttentionSchedule(topk=0.05, topp=0.0, dense_steps=10))  # sparse

As diffusers' `WanPipeline`: the prompt and the negative prompt (Wan's by default) are encoded to 512
tokens; the latents [batch, (frames - 1) / 4 + 1, height / 8, width / 8, 16] start as float32 noise from
`seed`; each step evaluates the transformer on the conditional and unconditional text in one batch of 2 *
batch and combines them as uncond + guidance * (cond - uncond) (only the conditional branch when guidance
<= 1); the scheduler (the folder's, UniPC with flow_shift 3.0 for Wan2.1) steps in float32; the VAE decodes
the denormalized latents. The step is one jitted function, compiled once per run shape and reused for
every step; the schedule's per-step sparsity, the guidance and the step index are its array arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sparge_jax import schedulers
from sparge_jax.config import AttentionConfig
from sparge_jax.models import umt5, wan_vae
from sparge_jax.models.wan import LayerSparsity, WanModel, load_diffusers
from sparge_jax.pipelines.schedule import AttentionSchedule

# The negative prompt of diffusers' Wan2.1 examples (an English rendering of Wan's own).
DEFAULT_NEGATIVE_PROMPT = (
  "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
  "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
  "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
  "background, three legs, many people in the background, walking backwards"
)
MAX_TEXT_LENGTH = 512
SUBFOLDERS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")


def default_flow_shift(height: int, width: int) -> float:
  """Wan2.1's time shift for a video size: 5.0 from 720p up, 3.0 below (as diffusers' Wan examples)."""
  return 5.0 if height * width >= 720 * 1280 else 3.0


def check_folder(folder: str | os.PathLike, *, transformer: bool = True) -> Path:
  """`folder` as a Path if it looks like a Wan diffusers folder (its subfolders exist), else ValueError."""
  folder = Path(folder)
  if not folder.is_dir():
    raise ValueError(f"model folder {folder} does not exist")
  needed = [s for s in SUBFOLDERS if transformer or s != "transformer"]
  missing = [s for s in needed if not (folder / s).is_dir()]
  if missing:
    raise ValueError(
      f"model folder {folder} is not a Wan diffusers folder: it has no {', '.join(m + '/' for m in missing)}"
    )
  return folder


def _as_prompts(name: str, value) -> list[str]:
  prompts = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
  return prompts


def _check_guidance(guidance) -> None:
  if isinstance(guidance, bool) or not (isinstance(guidance, (int, float)) and np.isfinite(guidance)):
    raise ValueError(f"guidance must be a finite number, got {guidance!r}")


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return int(value)


class WanPipeline:
  """Text-to-video with a Wan2.1 transformer (dense, sparse, or a distilled student).

  tokenizer, text_encoder: `sparge_jax.models.umt5`'s; vae: a `sparge_jax.models.wan_vae.WanVAE`;
  scheduler: a `sparge_jax.schedulers` scheduler (its shift is replaced per call, see `flow_shift`).
  """

  def __init__(self, *, tokenizer, text_encoder, transformer: WanModel, vae, scheduler: schedulers.Scheduler):
    config = transformer.config
    if text_encoder.config.d_model != config.text_dim:
      raise ValueError(
        f"text_encoder: its width d_model={text_encoder.config.d_model} is not the transformer's "
        f"text_dim={config.text_dim}"
      )
    if not vae.config.z_dim == config.in_channels == config.out_channels:
      raise ValueError(
        f"vae: its z_dim={vae.config.z_dim} must equal the transformer's in_channels={config.in_channels} "
        f"and out_channels={config.out_channels}"
      )
    self.tokenizer, self.text_encoder, self.transformer, self.vae = tokenizer, text_encoder, transformer, vae
    self.scheduler = scheduler
    self._vae_graphdef, self._vae_state = nnx.split(vae)
    self._steps = {}
    self.temporal_factor, self.spatial_factor = vae.config.temporal_compression, vae.config.spatial_compression

  @classmethod
  def from_pretrained(
    cls,
    folder: str | os.PathLike,
    *,
    dtype=jnp.bfloat16,
    vae_dtype=jnp.float32,
    transformer: WanModel | None = None,
    attention: AttentionConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, str | None]] = (),
  ) -> WanPipeline:
    """Load a Wan2.1 diffusers folder (transformer/, text_encoder/, tokenizer/, vae/, scheduler/).

    dtype: the transformer's and text encoder's parameters and compute; vae_dtype: the VAE's (diffusers'
    Wan examples keep it in float32). transformer: use this model (e.g. a distilled student) instead of
    the folder's transformer/. attention: the loaded transformer's self-attention settings (the rule's
    mode, block sizes and implementation also serve `AttentionSchedule`s). mesh, rules: shard every
    model's parameters over `mesh` (with `AxisType.Auto` axes: XLA places the activations) by their
    logical axis names mapped through `rules`, e.g. `[("embed", "fsdp")]`.
    """
    folder = check_folder(folder, transformer=transformer is None)
    if transformer is None:
      overrides = {} if attention is None else {"attention": attention}
      transformer = load_diffusers(folder / "transformer", dtype=dtype, mesh=mesh, rules=rules, **overrides)
    elif attention is not None:
      transformer.set_attention(attention)
    return cls(
      tokenizer=umt5.load_tokenizer(folder / "tokenizer"),
      text_encoder=umt5.load_umt5_encoder(folder / "text_encoder", dtype=dtype, mesh=mesh, rules=rules),
      transformer=transformer,
      vae=wan_vae.load_wan_vae(folder / "vae", dtype=vae_dtype, mesh=mesh, rules=rules),
      scheduler=schedulers.load_scheduler(folder / "scheduler"),
    )

  # ------------------------------------------------------------------------------------------- stages

  def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
    """[batch, (num_frames - 1) / 4 + 1, height / 8, width / 8, z_dim] (Wan's VAE factors), checked."""
    _check_int("batch", batch, 1)
    t, s = self.temporal_factor, self.spatial_factor
    patch = self.transformer.config.patch_size
    for name, size, multiple in (("height", height, s * patch[1]), ("width", width, s * patch[2])):
      if _check_int(name, size, multiple) % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple} (VAE {s}x times patch {multiple // s}), got {size}")
    if _check_int("num_frames", num_frames, 1) % t != 1 % t:
      raise ValueError(f"num_frames must be {t} * n + 1 (the VAE's temporal factor {t}), got {num_frames}")
    latent_frames = (num_frames - 1) // t + 1
    if latent_frames % patch[0]:
      raise ValueError(f"num_frames gives {latent_frames} latent frames, not a multiple of patch {patch[0]}")
    return (batch, latent_frames, height // s, width // s, self.vae.config.z_dim)

  def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
    """prompts -> text embeddings [len(prompts), 512, d_model] in the transformer's compute dtype, padded
    with zeros past each prompt's tokens (as diffusers' Wan pipeline)."""
    embeddings = umt5.encode_prompts(self.tokenizer, self.text_encoder, list(prompts), max_length=MAX_TEXT_LENGTH)
    return jnp.asarray(embeddings).astype(self.transformer.config.compute_dtype)

  def _step(self, scheduler: schedulers.Scheduler, guided: bool, attention: str):
    """The jitted denoising step. attention: "own" (`config.attention`), "dense", or "scheduled" (per-layer
    sparsity read from the tables at the step index)."""
    key = (scheduler, guided, attention)
    if key in self._steps:
      return self._steps[key]
    model = self.transformer
    if attention == "dense" and model.config.attention.sparse:
      model = nnx.merge(*nnx.split(model))  # new Variables over the same arrays
      model.set_attention(dataclasses.replace(model.config.attention, kind="dense"))
    graphdef = nnx.graphdef(model)
    dtype = model.config.compute_dtype

    def step(params, state, latents, context, guidance, tables):
      model = nnx.merge(graphdef, params)
      x = latents.astype(dtype)
      if guided:
        x = jnp.concatenate([x, x])
      t = jnp.full((x.shape[0],), state.timestep, jnp.float32)
      sparsity = LayerSparsity(*(a[state.step_index] for a in tables)) if attention == "scheduled" else None
      velocity = model(x, t, context, layer_sparsity=sparsity).astype(jnp.float32)
      if guided:
        cond, uncond = jnp.split(velocity, 2)
        velocity = uncond + guidance * (cond - uncond)
      latents, state = scheduler.step(state, velocity, latents)
      return latents, state, state.step_index

    self._steps[key] = jax.jit(step, donate_argnums=(1, 2))
    return self._steps[key]

  def _denoise_call(self, noise, context, negative_context, num_steps, guidance, schedule, flow_shift):
    """(the jitted step, its first arguments) for `denoise`, every argument checked."""
    num_steps = _check_int("num_steps", num_steps, 1)
    _check_guidance(guidance)
    config = self.transformer.config
    if jnp.ndim(noise) != 5 or jnp.shape(noise)[-1] != config.in_channels:
      raise ValueError(f"noise must be [batch, frames, height, width, {config.in_channels}], got {jnp.shape(noise)}")
    batch = noise.shape[0]
    for name, c in (("context", context), ("negative_context", negative_context)):
      if c is not None and (c.ndim != 3 or c.shape[0] != batch or c.shape[2] != config.text_dim):
        raise ValueError(f"{name} must be [batch={batch}, text_len, {config.text_dim}], got {c.shape}")
    if schedule is None:
      attention, tables = "own", ()
    elif schedule.is_dense(num_steps, config.num_layers, config.attention.mode):
      attention, tables = "dense", ()
    else:
      attention = "scheduled"
      tables = schedule.tables(num_steps, config.num_layers, config.num_attention_heads)

    timesteps, sigmas = schedulers.with_shift(self.scheduler, flow_shift).set_timesteps(num_steps)
    latents = jnp.array(noise, jnp.float32)  # a copy: the step donates it, the caller keeps its noise
    state = self.scheduler.init_state(timesteps, sigmas, latents)
    guided = negative_context is not None
    if guided:
      context = jnp.concatenate([context, negative_context])
    # The shift only places the sigmas (host side): one compiled step serves every shift.
    step = self._step(self.scheduler, guided, attention)
    return step, (nnx.state(self.transformer), state, latents, context, jnp.float32(guidance), tables)

  def denoise(
    self,
    noise: jax.Array,
    context: jax.Array,
    negative_context: jax.Array | None = None,
    *,
    num_steps: int = 50,
    guidance: float = 5.0,
    schedule: AttentionSchedule | None = None,
    flow_shift: float = 3.0,
    progress: bool = True,
  ) -> jax.Array:
    """Integrate from `noise` (float32 latents [batch, f, h, w, z_dim]) to clean latents, float32.

    context, negative_context: [batch, 512, text_dim]; without negative_context only the conditional
    branch runs (guidance is then unused). schedule: per step and layer sparsity; None runs the
    transformer's own `config.attention` (and a schedule that is dense throughout runs it dense).
    """
    step, (params, state, latents, context, guidance, tables) = self._denoise_call(
      noise, context, negative_context, num_steps, guidance, schedule, flow_shift
    )
    # The bar waits for the step before the one just dispatched, so the device always has work queued.
    with tqdm(total=num_steps, desc="denoising", unit="step", disable=not progress) as bar:
      previous = None
      for _ in range(num_steps):
        latents, state, done = step(params, state, latents, context, guidance, tables)
        if previous is not None:
          previous.block_until_ready()
          bar.update()
        previous = done
      previous.block_until_ready()
      bar.update()
    return latents

  def compile(
    self,
    noise: jax.Array,
    context: jax.Array,
    negative_context: jax.Array | None = None,
    *,
    num_steps: int = 50,
    schedule: AttentionSchedule | None = None,
    flow_shift: float = 3.0,
    decode: bool = True,
  ) -> None:
    """Compile the denoising step (and with `decode` the decoder) for these shapes ahead of `denoise` and
    `decode`, which then start at once, without running them. Arguments as `denoise`'s."""
    step, args = self._denoise_call(noise, context, negative_context, num_steps, 1.0, schedule, flow_shift)
    step.lower(*args).compile()
    if decode:
      self._decode.lower(self._vae_state, jax.ShapeDtypeStruct(noise.shape, jnp.float32)).compile()

  @functools.cached_property
  def _decode(self):
    graphdef, config = self._vae_graphdef, self.vae.config

    def decode(vae_state, latents):
      vae = nnx.merge(graphdef, vae_state)
      video = vae.decode(wan_vae.denormalize_latents(latents.astype(jnp.float32), config).astype(vae.dtype))
      return jnp.round((jnp.clip(video.astype(jnp.float32), -1, 1) + 1) * 127.5).astype(jnp.uint8)

    return jax.jit(decode)

  def decode(self, latents: jax.Array) -> np.ndarray:
    """Latents (as the transformer sees them) -> uint8 frames [batch, 4 (f - 1) + 1, 8 h, 8 w, 3]."""
    return np.asarray(self._decode(self._vae_state, latents))

  # ---------------------------------------------------------------------------------------------- all

  def __call__(
    self,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    *,
    height: int = 480,
    width: int = 832,
    num_frames: int = 81,
    num_steps: int = 50,
    guidance: float = 5.0,
    seed: int = 0,
    schedule: AttentionSchedule | None = None,
    flow_shift: float | None = None,
    progress: bool = True,
  ) -> np.ndarray:
    """Generate one video per prompt: uint8 frames [len(prompt), num_frames, height, width, 3].

    negative_prompt: one, or one per prompt; default Wan's (`DEFAULT_NEGATIVE_PROMPT`). guidance <= 1
    skips the unconditional branch. flow_shift: default `default_flow_shift(height, width)`.
    """
    prompts = _as_prompts("prompt", prompt)
    negatives = _as_prompts("negative_prompt", DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt)
    if len(negatives) == 1:
      negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
      raise ValueError(f"negative_prompt: {len(negatives)} prompts for {len(prompts)} prompts")
    shape = self.latent_shape(len(prompts), height, width, num_frames)
    _check_int("seed", seed, 0)
    flow_shift = default_flow_shift(height, width) if flow_shift is None else flow_shift
    _check_guidance(guidance)
    guided = guidance > 1
    embeddings = self.encode_prompts(prompts + negatives if guided else prompts)
    context, negative_context = (
      (embeddings[: len(prompts)], embeddings[len(prompts) :]) if guided else (embeddings, None)
    )
    noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    latents = self.denoise(
      noise,
      context,
      negative_context,
      num_steps=num_steps,
      guidance=guidance,
      schedule=schedule,
      flow_shift=flow_shift,
      progress=progress,
    )
    return self.decode(latents)
