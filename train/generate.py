"""Text to video with Wan2.1 in JAX, dense, sparse, on a schedule, or with a distilled student.

    python -m train.generate --model PATH/Wan2.1-T2V-1.3B-Diffusers --prompt "a corgi surfing" --out corgi.mp4
    python -m train.generate --model ... --prompt ... --sparse-topk 0.05 --sparse-topp 0 --dense-steps 12
    python -m train.generate --model ... --prompt ... --student runs/wan2_1_1_3b-20260101-120000

Loads the folder's text encoder, tokenizer, VAE and scheduler and its transformer (or the student: the
newest checkpoint of a distillation workdir with `--student`, a diffusers transformer folder with
`--student-diffusers`), generates with classifier-free guidance and writes an mp4 (or .gif, or a folder of
PNG frames when `--out` has no suffix). Attention: dense by default; a student runs the sparse attention it
was trained with; `--sparse-topk` (one value, or one per step) sets a sparse schedule, with `--dense-steps`,
`--dense-last-steps` and `--dense-layers` dense where they say.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import tyro
from flax import nnx

from sparge_jax import schedulers
from sparge_jax.config import AttentionConfig
from sparge_jax.models.wan import WanModel, load_diffusers
from sparge_jax.pipelines import AttentionSchedule, export_video
from sparge_jax.pipelines.video import check_output_path
from sparge_jax.pipelines.wan import DEFAULT_NEGATIVE_PROMPT, WanPipeline, check_folder, default_flow_shift

from . import checkpoint, errors, sharding
from .configs import Config, from_dict
from .models import model_configs

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Text-to-video generation with Wan2.1."""

  model: str
  """Wan2.1 diffusers folder (transformer/, text_encoder/, tokenizer/, vae/, scheduler/)."""
  prompt: str
  """What the video shows."""
  out: str = "video.mp4"
  """Output: .mp4, .gif, or a path without suffix for a folder of PNG frames."""
  negative_prompt: str | None = None
  """What to steer away from (default: Wan's negative prompt)."""
  student: str | None = None
  """A distillation workdir: its newest checkpoint's student replaces the folder's transformer."""
  student_diffusers: str | None = None
  """A diffusers transformer folder that replaces the folder's transformer."""
  steps: int = 50
  """Denoising steps."""
  guidance: float = 5.0
  """Classifier-free guidance scale (<= 1: the conditional branch only)."""
  height: int = 480
  width: int = 832
  frames: int = 81
  """Frame count, 4 n + 1."""
  seed: int = 0
  fps: int = 16
  flow_shift: float | None = None
  """Time shift of the sampler (default 3.0 below 720p, 5.0 from 720p)."""
  scheduler: Literal["folder", "unipc", "euler"] = "folder"
  """The folder's scheduler (Wan2.1's: UniPC), or UniPC, or flow-matching Euler."""
  sparse_topk: tuple[float, ...] | None = None
  """Sparse attention's Top-k fraction: one value, or one per step (turns on a sparse schedule)."""
  sparse_topp: float | None = None
  """Sparse attention's Top-p mass (default: the student's, else 0.2)."""
  sparse_mode: Literal["hybrid", "topk", "topp"] | None = None
  """How Top-k and Top-p combine (default: the student's, else hybrid)."""
  dense_steps: int = 0
  """Dense attention for the first N steps."""
  dense_last_steps: int = 0
  """Dense attention for the last N steps."""
  dense_layers: int = 0
  """Dense attention in the first N layers."""
  dtype: Literal["bfloat16", "float32"] = "bfloat16"
  """Parameters and compute of the transformer and text encoder (the VAE runs in float32)."""
  fsdp: int = 1
  """Shard the parameters over this many devices (the mesh's "fsdp" axis)."""
  progress: bool = True
  """Show a progress bar per denoising step."""


def check(config: GenerateConfig) -> None:
  """ValueError naming the option for anything wrong that can be seen before loading a model."""
  check_output_path(config.out)
  check_folder(config.model, transformer=config.student is None and config.student_diffusers is None)
  if config.student and config.student_diffusers:
    raise ValueError("--student and --student-diffusers are alternatives; give one")
  if config.student:
    if not os.path.isfile(os.path.join(config.student, "config.json")):
      raise ValueError(f"--student {config.student}: not a distillation workdir (no config.json)")
    checkpoint.find_params(config.student)
  if config.student_diffusers and not os.path.isfile(os.path.join(config.student_diffusers, "config.json")):
    raise ValueError(f"--student-diffusers {config.student_diffusers}: not a diffusers folder (no config.json)")
  for name in ("steps", "frames", "height", "width", "fps", "fsdp"):
    if getattr(config, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
  if config.seed < 0:
    raise ValueError(f"--seed must be >= 0, got {config.seed}")
  if (config.frames - 1) % 4:
    raise ValueError(f"--frames must be 4 n + 1 (Wan's VAE), got {config.frames}")
  for name in ("height", "width"):
    if getattr(config, name) % 16:
      raise ValueError(f"--{name} must be a multiple of 16, got {getattr(config, name)}")
  if config.flow_shift is not None and not config.flow_shift > 0:
    raise ValueError(f"--flow-shift must be > 0, got {config.flow_shift}")
  if config.sparse_topk is not None and len(config.sparse_topk) not in (1, config.steps):
    raise ValueError(f"--sparse-topk needs 1 or --steps ({config.steps}) values, got {len(config.sparse_topk)}")
  if jax.device_count() % config.fsdp:
    raise ValueError(f"--fsdp {config.fsdp} must divide the device count {jax.device_count()}")
  _schedule(config, _trained_attention(config))  # its own checks too: fractions in [0, 1], counts >= 0


def _trained_attention(config: GenerateConfig) -> AttentionConfig:
  """The transformer's own attention: a workdir student's from its config.json, else dense."""
  if config.student:
    with open(os.path.join(config.student, "config.json")) as f:
      return from_dict(Config, json.load(f)).attention
  return AttentionConfig(mode=config.sparse_mode or "hybrid")


def _schedule(config: GenerateConfig, own: AttentionConfig) -> AttentionSchedule | None:
  """The attention schedule the options ask for, or None for the transformer's own attention.

  own: the transformer's attention settings. Values the options leave out come from them when they are
  sparse (a student's), else from `AttentionConfig`'s defaults.
  """
  if config.sparse_topk is None and not (config.dense_steps or config.dense_last_steps or config.dense_layers):
    return None
  sparse = own if own.sparse else None
  if config.sparse_topk is None and sparse is None:
    raise ValueError("--dense-steps, --dense-last-steps and --dense-layers need --sparse-topk (the model is dense)")
  fallback = sparse or AttentionConfig()
  topk = fallback.topk if config.sparse_topk is None else config.sparse_topk
  topp = fallback.topp if config.sparse_topp is None else config.sparse_topp
  per_head = [
    n
    for n, v, given in (("topk", topk, config.sparse_topk), ("topp", topp, config.sparse_topp))
    if given is None and isinstance(v, tuple)
  ]
  if per_head:
    raise ValueError(
      f"the transformer's attention has per-head {' and '.join(per_head)}; a schedule takes one value per step: "
      f"give --sparse-{per_head[0]}"
    )
  if isinstance(topk, tuple) and len(topk) == 1:
    topk = topk[0]
  return AttentionSchedule(
    topk=topk,
    topp=topp,
    dense_steps=config.dense_steps,
    dense_last_steps=config.dense_last_steps,
    dense_layers=config.dense_layers,
  )


def load_student(workdir: str, *, dtype, mesh=None) -> tuple[WanModel, str]:
  """The student of a distillation workdir's newest checkpoint that restores, as a WanModel with parameters
  in `dtype`, and that checkpoint's params directory."""
  with open(os.path.join(workdir, "config.json")) as f:
    run_config = from_dict(Config, json.load(f))
  _, trained = model_configs(run_config)
  abstract = nnx.split(nnx.eval_shape(lambda: WanModel(trained, rngs=nnx.Rngs(0))))[1]
  mesh = mesh if mesh is not None else sharding.make_mesh(-1, 1)
  shardings = sharding.param_shardings(abstract, mesh)
  params, found = checkpoint.load_newest_params(workdir, checkpoint.abstract(abstract.to_pure_dict(), shardings))
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  config = dataclasses.replace(trained, param_dtype=dtype, compute_dtype=dtype)
  return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0)))), params), found


def run(config: GenerateConfig) -> dict:
  """Generate and write the video; returns what was done (paths, settings, seconds per stage)."""
  dtype = DTYPES[config.dtype]
  mesh, rules = None, ()
  if config.fsdp > 1:
    mesh, rules = sharding.make_mesh(-1, config.fsdp), tuple(sharding.LOGICAL_RULES.items())
  start = time.perf_counter()
  transformer, source = None, os.path.join(config.model, "transformer")
  if config.student:
    transformer, source = load_student(config.student, dtype=dtype, mesh=mesh)
  elif config.student_diffusers:
    transformer = load_diffusers(config.student_diffusers, dtype=dtype, mesh=mesh, rules=rules)
    source = config.student_diffusers
  if transformer is not None and config.sparse_mode is not None:
    transformer.set_attention(dataclasses.replace(transformer.config.attention, mode=config.sparse_mode))
  attention = None if transformer is not None else AttentionConfig(mode=config.sparse_mode or "hybrid")
  pipe = WanPipeline.from_pretrained(
    config.model, dtype=dtype, transformer=transformer, attention=attention, mesh=mesh, rules=rules
  )
  if config.scheduler != "folder":
    pipe.scheduler = schedulers.UniPCMultistep() if config.scheduler == "unipc" else schedulers.FlowMatchEuler()
  schedule = _schedule(config, pipe.transformer.config.attention)
  flow_shift = config.flow_shift or default_flow_shift(config.height, config.width)
  loaded = time.perf_counter()

  prompts = [config.prompt]
  guided = config.guidance > 1
  negative = DEFAULT_NEGATIVE_PROMPT if config.negative_prompt is None else config.negative_prompt
  embeddings = jax.block_until_ready(pipe.encode_prompts(prompts + [negative] * guided))
  encoded = time.perf_counter()
  shape = pipe.latent_shape(1, config.height, config.width, config.frames)
  noise = jax.random.normal(jax.random.key(config.seed), shape, jnp.float32)
  latents = pipe.denoise(
    noise,
    embeddings[:1],
    embeddings[1:] if guided else None,
    num_steps=config.steps,
    guidance=config.guidance,
    schedule=schedule,
    flow_shift=flow_shift,
    progress=config.progress,
  )
  latents = jax.block_until_ready(latents)
  denoised = time.perf_counter()
  frames = pipe.decode(latents)[0]
  decoded = time.perf_counter()
  out = export_video(frames, config.out, fps=config.fps)
  own = pipe.transformer.config.attention
  return {
    "out": str(out),
    "transformer": source,
    "frames": list(frames.shape),
    "attention": "schedule" if schedule else own.kind,
    "schedule": dataclasses.asdict(schedule) if schedule else None,
    "own_attention": dataclasses.asdict(own),
    "scheduler": type(pipe.scheduler).__name__,
    "flow_shift": flow_shift,
    "seconds": {
      "load": loaded - start,
      "text_encoding": encoded - loaded,
      "denoising": denoised - encoded,
      "decode": decoded - denoised,
      "write": time.perf_counter() - decoded,
    },
  }


@errors.command  # bad options, folders, checkpoints, an unwritable output, out of memory: one error line
def main(argv: list[str] | None = None) -> int:
  config = tyro.cli(GenerateConfig, args=argv, description=__doc__)
  check(config)
  summary = run(config)
  seconds = summary["seconds"]
  print(
    f"wrote {summary['out']}: {summary['frames'][0]} frames of {summary['frames'][2]}x{summary['frames'][1]} "
    f"({summary['attention']} attention, transformer {summary['transformer']}); "
    + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in seconds.items())
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
