"""Text to video end to end: sparge-jax's Wan2.1 pipeline (dense, 95% sparse, dense first steps) against
diffusers' `WanPipeline` in PyTorch, on random weights of the real shapes (UMT5-XXL, the Wan VAE, the DiT).

    python -m benchmarks.generate                                  # 1.3B, 480p, 81 frames, 50 steps, CFG 5
    python -m benchmarks.generate --steps 10 --no-baseline         # shorter, JAX only
    python -m benchmarks.generate --baseline-only                  # diffusers only
    python -m benchmarks.generate --model 14b --size 720p --per-step 2 --no-baseline
    python -m benchmarks.generate --model tiny --size tiny --steps 2   # a CPU smoke run

Each variant reports seconds per stage (text encoding, denoising, decode) and their total, after compiling
ahead (`WanPipeline.compile`; compile seconds are reported apart), with the device's peak memory so far.
Variants: "dense" (cuDNN attention), "sparse" (Top-k 5%, no Top-p: 95% of blocks skipped, the paper's
operating point; random weights give near-uniform block scores where Top-p would keep most blocks),
"dense-first" (that rule with Radial Attention's dense first 24% of steps and first layer). With
`--per-step K` only K denoising steps run per variant and the per-step time is reported. `--kernel-check`
also times one transformer forward dense against the sparse kernel keeping every block (how a schedule's
dense steps run).

The baseline runs in a subprocess (so the two frameworks do not share the GPU's memory), where torch and
diffusers import: diffusers' `WanPipeline` with its default attention (SDPA) on the same shapes, steps and
scheduler, text embeddings from transformers' `UMT5EncoderModel` (timed apart; skipped without transformers)
and the decode as the pipeline does it. Both sides encode the same fixed token ids of realistic prompt
lengths (`FixedTokenIds`: there is no real tokenizer without a download). Results merge into
benchmarks/results/generate-<device>.json (`--out`), keyed by model, size and steps, so separate calls
(variants, baseline, 14B) add up; the file is written after the baseline and after each variant, so a run
cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Architectures as the diffusers / transformers config.json files state them (one source for both sides).
DIT = {
  "tiny": dict(
    patch_size=[1, 2, 2],
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=16,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    eps=1e-6,
    rope_max_seq_len=1024,
  ),
  "1.3b": dict(
    patch_size=[1, 2, 2],
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    eps=1e-6,
    rope_max_seq_len=1024,
  ),
  "14b": dict(
    patch_size=[1, 2, 2],
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    eps=1e-6,
    rope_max_seq_len=1024,
  ),
}
UMT5_XXL = dict(
  vocab_size=256384,
  d_model=4096,
  d_kv=64,
  d_ff=10240,
  num_layers=24,
  num_heads=64,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  feed_forward_proj="gated-gelu",
  dense_act_fn="gelu_new",
  is_gated_act=True,
  layer_norm_epsilon=1e-6,
  dropout_rate=0.0,
  pad_token_id=0,
  eos_token_id=1,
  tie_word_embeddings=False,
  scalable_attention=True,
)
UMT5_TINY = UMT5_XXL | dict(vocab_size=64, d_model=24, d_kv=8, d_ff=32, num_layers=2, num_heads=3)
UMT5_TINY |= dict(relative_attention_num_buckets=8, relative_attention_max_distance=16)
WAN_VAE = dict(
  base_dim=96,
  z_dim=16,
  dim_mult=[1, 2, 4, 4],
  num_res_blocks=2,
  attn_scales=[],
  temperal_downsample=[False, True, True],
  dropout=0.0,
  latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508]
  + [0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
  latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743]
  + [3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
)
VAE_TINY = WAN_VAE | dict(base_dim=8, z_dim=4, num_res_blocks=1, latents_mean=[0.1, -0.2, 0.3, 0.0])
VAE_TINY |= dict(latents_std=[1.5, 0.8, 1.2, 1.0])
MODELS = {"tiny": (DIT["tiny"], UMT5_TINY, VAE_TINY), "1.3b": (DIT["1.3b"], UMT5_XXL, WAN_VAE)}
MODELS["14b"] = (DIT["14b"], UMT5_XXL, WAN_VAE)
SIZES = {"tiny": (32, 48, 9), "480p": (480, 832, 81), "720p": (720, 1280, 81)}
TEXT_LEN = 512
# Token counts of a typical prompt and of Wan's negative prompt (what the encoder's outputs are trimmed to).
PROMPT_TOKENS, NEGATIVE_TOKENS = 60, 120
GUIDANCE = 5.0
VARIANTS = ("dense", "sparse", "dense-first")
SPARSE_TOPK = 0.05


def _flow_shift(size: str) -> float:
  return 5.0 if size == "720p" else 3.0


def _token_ids(vocab_size: int, lengths: list[int], max_length: int = TEXT_LEN, seed: int = 0):
  """(input_ids, attention_mask) int32 [len(lengths), max_length]: random tokens, eos (id 1), then padding
  (id 0), as UMT5's tokenizer lays out a prompt of each length."""
  import numpy as np  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), max_length), np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    ids[row, : n - 1] = rng.integers(2, vocab_size, n - 1)
    ids[row, n - 1], mask[row, :n] = 1, 1
  return ids, mask


# ---------------------------------------------------------------------------------------------- JAX


def _config(cls, fields: dict):
  """cls(**fields) with the fields a dataclass `cls` has (lists as tuples)."""
  import dataclasses  # noqa: PLC0415

  if dataclasses.is_dataclass(cls):
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in names}
  return cls(**fields)


def _random(make):
  """A module from `make()` with its parameters initialised on device in one jitted call."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  graphdef = nnx.graphdef(nnx.eval_shape(make))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


class FixedTokenIds:
  """What the benchmark tokenizes with: not a tokenizer (the real one is a download away), but fixed
  random token ids of realistic lengths, the same for any text: PROMPT_TOKENS for each prompt (even
  rows) and NEGATIVE_TOKENS for each negative prompt (odd rows), as `pipe.encode_prompts([prompt,
  negative])` asks. The encoder's cost depends on the padded length only; the trim to each prompt's
  token count, and diffusers' side, see the same lengths. Tokenizing itself (on the host) is left out
  of the text-encoding seconds on both sides."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def __call__(self, prompts, max_length=TEXT_LEN):
    lengths = [PROMPT_TOKENS if i % 2 == 0 else NEGATIVE_TOKENS for i in range(len(prompts))]
    return _token_ids(self.vocab_size, lengths, max_length)


def _peak_bytes():
  import jax  # noqa: PLC0415

  stats = jax.devices()[0].memory_stats()
  return None if stats is None else stats.get("peak_bytes_in_use")


def build_pipeline(model: str, dtype):
  """A WanPipeline of random weights with the architectures of `model`."""
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from sparge_jax import schedulers  # noqa: PLC0415
  from sparge_jax.config import AttentionConfig  # noqa: PLC0415
  from sparge_jax.models import umt5, wan_vae  # noqa: PLC0415
  from sparge_jax.models.wan import WanModel  # noqa: PLC0415
  from sparge_jax.models.wan.diffusers_io import config_from_diffusers  # noqa: PLC0415
  from sparge_jax.pipelines.wan import WanPipeline  # noqa: PLC0415

  dit, text, vae = MODELS[model]
  tiles = dict(block_q=16, block_kv=16) if model == "tiny" else {}
  dit_config = config_from_diffusers(dit, dtype=dtype, attention=AttentionConfig(**tiles))
  text_config, vae_config = _config(umt5.UMT5Config, text), _config(wan_vae.WanVAEConfig, vae)
  return WanPipeline(
    tokenizer=FixedTokenIds(text["vocab_size"]),
    text_encoder=_random(lambda: umt5.UMT5Encoder(text_config, rngs=nnx.Rngs(1), param_dtype=dtype, dtype=dtype)),
    transformer=_random(lambda: WanModel(dit_config, rngs=nnx.Rngs(0))),
    vae=_random(lambda: wan_vae.WanVAE(vae_config, rngs=nnx.Rngs(2))),
    scheduler=schedulers.UniPCMultistep(flow_shift=3.0),
  ), jnp.dtype(dtype).name


def _schedule(variant: str, steps: int, dense_steps: int, dense_layers: int):
  from sparge_jax.pipelines import AttentionSchedule  # noqa: PLC0415

  if variant == "dense":
    return None
  if variant == "sparse":
    return AttentionSchedule(topk=SPARSE_TOPK, topp=0.0)
  return AttentionSchedule(topk=SPARSE_TOPK, topp=0.0, dense_steps=min(dense_steps, steps), dense_layers=dense_layers)


def run_jax(args, save=lambda result: None) -> dict:
  """The JAX side: one pipeline, then each variant compiled, timed and handed to `save` as it finishes
  (so a run cut short keeps the variants it finished)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  start = time.perf_counter()
  pipe, dtype_name = build_pipeline(args.model, dtype)
  height, width, frames = SIZES[args.size]
  shape = pipe.latent_shape(1, height, width, frames)
  noise = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  jax.block_until_ready(pipe.encode_prompts(["prompt", "negative prompt"]))  # compile
  built = time.perf_counter()
  t0 = time.perf_counter()
  embeddings = jax.block_until_ready(pipe.encode_prompts(["prompt", "negative prompt"]))
  text_s = time.perf_counter() - t0
  context, negative = embeddings[:1], embeddings[1:]
  steps = args.per_step or args.steps
  dense_steps = args.dense_steps if args.dense_steps is not None else round(0.24 * steps)
  config = pipe.transformer.config
  result = {
    "framework": "jax",
    "jax_version": jax.__version__,
    "dtype": dtype_name,
    "latent": list(shape[1:4]),
    "tokens": shape[1] * (shape[2] // config.patch_size[1]) * (shape[3] // config.patch_size[2]),
    "steps": steps,
    "guidance": GUIDANCE,
    "flow_shift": _flow_shift(args.size),
    "setup_s": built - start,
    "text_encoding_s": text_s,
    "variants": {},
  }
  for variant in args.variants:
    schedule = _schedule(variant, steps, dense_steps, args.dense_layers)
    kwargs = dict(num_steps=steps, schedule=schedule, flow_shift=_flow_shift(args.size))
    t0 = time.perf_counter()
    pipe.compile(noise, context, negative, decode=not args.per_step, **kwargs)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    latents = jax.block_until_ready(pipe.denoise(noise, context, negative, guidance=GUIDANCE, progress=False, **kwargs))
    denoise_s = time.perf_counter() - t0
    record = {
      "schedule": None if schedule is None else {k: getattr(schedule, k) for k in schedule.__dataclass_fields__},
      "compile_s": compile_s,
      "denoising_s": denoise_s,
      "per_step_s": denoise_s / steps,
    }
    if not args.per_step:
      t0 = time.perf_counter()
      pipe.decode(latents)
      record["decode_s"] = time.perf_counter() - t0
      record["text_encoding_s"] = text_s  # this call's, as variants of several calls share a file
      record["total_s"] = text_s + denoise_s + record["decode_s"]
    record["peak_bytes_so_far"] = _peak_bytes()
    result["variants"][variant] = record
    print(f"jax {variant}: " + ", ".join(f"{k} {v:.2f}" for k, v in record.items() if k.endswith("_s")), flush=True)
    save(result)
  if args.kernel_check:
    result["kernel_check"] = kernel_check(pipe, noise, embeddings)
    print("kernel check (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in result["kernel_check"].items()), flush=True)
    save(result)
  return result


def kernel_check(pipe, noise, embeddings) -> dict:
  """One CFG transformer forward (batch 2) with dense attention, with the sparse kernel keeping every block
  (a schedule's dense steps) and at 95% sparsity, in ms."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from benchmarks import timing  # noqa: PLC0415
  from sparge_jax.pipelines import LayerSparsity  # noqa: PLC0415

  model, c = pipe.transformer, pipe.transformer.config
  graphdef, params = nnx.split(model)
  x = jnp.concatenate([noise, noise]).astype(c.compute_dtype)
  t = jnp.full((2,), 500.0)
  forward = jax.jit(lambda p, s: nnx.merge(graphdef, p)(x, t, embeddings, layer_sparsity=s))
  dense = jax.jit(lambda p: nnx.merge(graphdef, p)(x, t, embeddings))
  ones = jnp.ones((c.num_layers, c.num_attention_heads))
  sparse = LayerSparsity(jnp.full_like(ones, SPARSE_TOPK), jnp.zeros_like(ones))
  return {
    "dense_ms": timing.median_ms(dense, params, warmup=1, samples=5, calls_per_sample=1),
    "sparse_full_keep_ms": timing.median_ms(
      forward, params, LayerSparsity(ones, ones), warmup=1, samples=5, calls_per_sample=1
    ),
    "sparse_95_ms": timing.median_ms(forward, params, sparse, warmup=1, samples=5, calls_per_sample=1),
  }


# ------------------------------------------------------------------------------------------ PyTorch


def run_diffusers(args) -> dict:
  """diffusers' WanPipeline in PyTorch on random weights; stage timings in seconds."""
  import diffusers  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel  # noqa: PLC0415

  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if device == "cuda" and args.dtype == "bfloat16" else torch.float32
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  dit, text, vae_fields = MODELS[args.model]
  height, width, frames = SIZES[args.size]
  steps = args.per_step or args.steps
  torch.manual_seed(0)
  start = time.perf_counter()
  with torch.device(device):
    transformer = WanTransformer3DModel(**dit).to(dtype).eval()
    vae = AutoencoderKLWan(**vae_fields).to(torch.float32).eval()
  # As from_pretrained(torch_dtype=...) loads it: the modules diffusers keeps in float32 stay float32.
  keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or ())
  for name, param in transformer.named_parameters():
    if keep & set(name.split(".")):
      param.data = param.data.float()
  scheduler = UniPCMultistepScheduler(
    prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=_flow_shift(args.size), solver_order=2
  )
  result = {"framework": "diffusers", "diffusers_version": diffusers.__version__, "torch_version": torch.__version__}
  result |= {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "steps": steps}

  import numpy as np  # noqa: PLC0415

  ids, mask = _token_ids(text["vocab_size"], [PROMPT_TOKENS, NEGATIVE_TOKENS])
  embeddings = None
  try:
    from transformers import UMT5Config, UMT5EncoderModel  # noqa: PLC0415

    with torch.device(device):
      encoder = UMT5EncoderModel(UMT5Config(**text)).to(dtype).eval()

    def encode():  # as WanPipeline._get_t5_prompt_embeds, prompt and negative prompt in separate calls
      out = []
      for row in range(2):
        ids_t, mask_t = (torch.from_numpy(a[row : row + 1]).long().to(device) for a in (ids, mask))
        hidden = encoder(ids_t, mask_t).last_hidden_state
        n = int(mask_t.sum())
        out.append(torch.cat([hidden[0, :n], hidden.new_zeros(TEXT_LEN - n, hidden.shape[-1])])[None])
      sync()
      return out

    with torch.no_grad():
      encode()
      t0 = time.perf_counter()
      embeddings = encode()
      result["text_encoding_s"] = time.perf_counter() - t0
    encoder = None  # frees its memory before the transformer runs
    if device == "cuda":
      torch.cuda.empty_cache()
  except ImportError as e:
    result["text_encoding_s"] = None
    result["text_encoding_note"] = f"skipped: {e}"
  if embeddings is None:
    embeddings = [torch.randn(1, TEXT_LEN, dit["text_dim"], device=device) for _ in range(2)]
  prompt_embeds, negative_embeds = (e.to(dtype) for e in embeddings)
  result["setup_s"] = time.perf_counter() - start

  def denoise(num_steps):
    generator = torch.Generator(device).manual_seed(0)
    try:
      from diffusers import WanPipeline  # noqa: PLC0415 (imports transformers)

      pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)
      pipe.set_progress_bar_config(disable=True)
      latents = pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=num_steps,
        guidance_scale=GUIDANCE,
        generator=generator,
        output_type="latent",
      ).frames
      result["loop"] = "WanPipeline"
    except ImportError:  # without transformers: the same loop, written out
      shape = (1, dit["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)
      latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
      scheduler.set_timesteps(num_steps, device=device)
      scheduler.set_begin_index(0)
      for t in scheduler.timesteps:
        x, timestep = latents.to(dtype), t.expand(1)
        cond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=prompt_embeds)[0]
        uncond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=negative_embeds)[0]
        latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents, return_dict=False)[0]
      result["loop"] = "WanPipeline's loop, written out (transformers missing)"
    sync()
    return latents

  def decode(latents):  # as WanPipeline does for output_type="np"
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents.device, torch.float32)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents.device, torch.float32)
    video = vae.decode(latents.to(torch.float32) / inverse_std + mean, return_dict=False)[0]
    frames = ((video / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
    sync()
    return frames

  with torch.no_grad():
    warm = denoise(1)  # kernels picked, caches filled
    if not args.per_step:
      decode(warm[:, :, :2])
    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    latents = denoise(steps)
    result["denoising_s"] = time.perf_counter() - t0
    result["per_step_s"] = result["denoising_s"] / steps
    if not args.per_step:
      t0 = time.perf_counter()
      video = decode(latents)
      result["decode_s"] = time.perf_counter() - t0
      result["total_s"] = (result["text_encoding_s"] or 0.0) + result["denoising_s"] + result["decode_s"]
      result["frames"] = list(np.shape(video))
  if device == "cuda":
    result["peak_bytes"] = torch.cuda.max_memory_allocated()
  print("diffusers: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k.endswith("_s") and v), flush=True)
  return result


def _baseline_in_subprocess(args) -> dict | None:
  """run_diffusers in a fresh process (its own GPU memory), or None where torch or diffusers are missing."""
  import importlib.util  # noqa: PLC0415

  missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
  if missing:
    print(f"diffusers baseline skipped: {', '.join(missing)} not importable", flush=True)
    return {"skipped": f"{', '.join(missing)} not importable"}
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "baseline.json")
    command = [sys.executable, "-m", "benchmarks.generate", "--baseline-only", "--baseline-json", out]
    command += ["--model", args.model, "--size", args.size, "--steps", str(args.steps), "--dtype", args.dtype]
    command += ["--per-step", str(args.per_step)] if args.per_step else []
    done = subprocess.run(command, check=False)
    if done.returncode != 0 or not os.path.exists(out):
      return {"failed": f"exit status {done.returncode}"}
    with open(out) as f:
      return json.load(f)


# --------------------------------------------------------------------------------------------- main


def _speedups(entry: dict) -> dict:
  jax_runs, torch_run = entry.get("jax", {}).get("variants", {}), entry.get("diffusers", {})
  out = {}
  for variant, run in jax_runs.items():
    if "dense" in jax_runs and variant != "dense":
      out[f"{variant}_vs_dense_denoising"] = jax_runs["dense"]["denoising_s"] / run["denoising_s"]
    if torch_run.get("per_step_s"):
      out[f"{variant}_vs_diffusers_denoising"] = torch_run["per_step_s"] / run["per_step_s"]
    if torch_run.get("total_s") and run.get("total_s"):
      out[f"{variant}_vs_diffusers_total"] = torch_run["total_s"] / run["total_s"]
    if torch_run.get("decode_s") and run.get("decode_s"):
      out[f"{variant}_decode_vs_diffusers"] = torch_run["decode_s"] / run["decode_s"]
  return out


def merge_run(run: dict, entry: dict, command: str) -> dict:
  """A results file's run (same model, size and steps) with this call's `entry` ({"jax": ..., "diffusers":
  ...}) joined in: a side this call ran replaces that side, except that jax variants of separate calls
  add up (a variant run again replaces its old record); speedups recomputed; the command appended."""
  merged = dict(run)
  for name, value in entry.items():
    if name == "jax" and "variants" in run.get("jax", {}):
      value = run["jax"] | value | {"variants": run["jax"]["variants"] | value["variants"]}
    merged[name] = value
  merged["speedups"] = _speedups(merged)
  merged["commands"] = [c for c in run.get("commands", []) if c != command] + [command]
  return merged


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="1.3b")
  parser.add_argument("--size", choices=sorted(SIZES), default="480p")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--per-step", type=int, default=0, help="time only this many denoising steps per variant")
  parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
  parser.add_argument("--dense-steps", type=int, default=None, help="dense-first: dense steps (default 24%%)")
  parser.add_argument("--dense-layers", type=int, default=1, help="dense-first: dense layers")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  parser.add_argument("--kernel-check", action="store_true", help="also time one forward per attention kernel")
  baseline = parser.add_mutually_exclusive_group()
  baseline.add_argument("--no-baseline", action="store_true", help="skip diffusers")
  baseline.add_argument("--baseline-only", action="store_true", help="only diffusers")
  parser.add_argument("--baseline-json", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None, help="results file (default benchmarks/results/generate-<device>.json)")
  args = parser.parse_args(argv)
  for name in ("steps", "dense_layers"):
    if getattr(args, name) < 0 or (name == "steps" and args.steps < 1):
      parser.error(f"--{name.replace('_', '-')} must be >= {1 if name == 'steps' else 0}")
  if args.per_step < 0 or (args.dense_steps is not None and args.dense_steps < 0):
    parser.error("--per-step and --dense-steps must be >= 0")

  if args.baseline_json:  # the subprocess of _baseline_in_subprocess (a private temporary file)
    result = run_diffusers(args)
    with open(args.baseline_json, "w") as f:
      json.dump(result, f)
    return 0

  key = f"{args.model}-{args.size}" + (f"-per-step{args.per_step}" if args.per_step else f"-{args.steps}steps")
  command = " ".join(["python -m benchmarks.generate", *(sys.argv[1:] if argv is None else argv)])
  out = args.out
  merged = {}

  def save(entry: dict) -> None:  # after the baseline and after each jax variant
    nonlocal out, merged
    from benchmarks import results  # noqa: PLC0415 (jax takes the GPU: only once the baseline is done)

    out = out or results.results_path("generate")
    previous = results.read_results(out) if os.path.exists(out) else {}
    merged = merge_run(previous.get("runs", {}).get(key, {}), entry, command)
    results.write_results(out, {"runs": previous.get("runs", {}) | {key: merged}})

  if not args.no_baseline:
    save({"diffusers": _baseline_in_subprocess(args)})
  if not args.baseline_only:
    run_jax(args, lambda result: save({"jax": result}))
  for name, value in merged["speedups"].items():
    print(f"{name}: {value:.2f}x")
  print(f"-> {out} [{key}]")
  return 0


if __name__ == "__main__":
  sys.exit(main())
