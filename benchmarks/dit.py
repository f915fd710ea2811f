"""One Wan DiT forward pass (a denoising step): ours dense and sparse, and diffusers' model in PyTorch, in
the same command.

    python -m benchmarks.dit                              # wan2_1_1_3b, 480p 81 frames, bf16
    python -m benchmarks.dit --config wan2_1_14b --tokens 720p --runs 3
    python -m benchmarks.dit --config tiny --tokens small # a CPU smoke run

Writes benchmarks/results/dit-<config>-<tokens>-<device>.json. Random weights, batch 1, 512 text tokens.
Ours: both variants run the same jitted forward over the same parameter arrays (only the static attention
setting differs); times are medians of `--runs` calls after warm-up, each waited for with
`jax.block_until_ready`. Random weights give near-uniform pooled block scores, where Top-p keeps many
blocks, so the default mask is Top-k alone at 5%: a fixed 95% sparsity, the paper's operating point. Peak
memory is the device's `peak_bytes_in_use` after the dense runs and after both.

The peer: where torch and diffusers are installed, `benchmarks.dit_diffusers` runs first, in a child
process that has the GPU to itself (jax has not started yet), with the same architecture
(`config_to_diffusers`), latents and text length: diffusers' `WanTransformer3DModel`, bf16, eager and
under `torch.compile` (`--diffusers eager` skips the compile). The file records its times and the ratios
of each of ours to each of its.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import results, timing
from sparge_jax.models.wan import AttentionConfig, WanModel, tiny, wan2_1_1_3b, wan2_1_14b
from sparge_jax.models.wan.diffusers_io import config_to_diffusers

CONFIGS = {"tiny": tiny, "wan2_1_1_3b": wan2_1_1_3b, "wan2_1_14b": wan2_1_14b}
# Latent [frames, height, width]: 480p 81 frames -> 21x60x104 (32,760 tokens); 720p -> 21x90x160.
LATENTS = {"small": (3, 16, 16), "480p": (21, 60, 104), "720p": (21, 90, 160)}
TEXT_LEN = 512


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if stats is None else stats.get("peak_bytes_in_use")


def run(config_name: str, tokens: str, attention: AttentionConfig, runs: int, dtype) -> dict:
  config = dataclasses.replace(CONFIGS[config_name](), param_dtype=dtype, compute_dtype=dtype)
  # Initialise on device in one jitted call rather than op by op.
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.state(WanModel(config, rngs=nnx.Rngs(0))))()
  sparse_model = nnx.merge(graphdef, params)
  sparse_model.set_attention(attention)
  sparse_graphdef, _ = nnx.split(sparse_model)

  keys = jax.random.split(jax.random.key(1), 2)
  frames, height, width = LATENTS[tokens]
  x = jax.random.normal(keys[0], (1, frames, height, width, config.in_channels), dtype)
  t = jnp.array([500.0], jnp.float32)
  context = jax.random.normal(keys[1], (1, TEXT_LEN, config.text_dim), dtype)

  def forward(graphdef):
    return jax.jit(lambda params, x, t, context: nnx.merge(graphdef, params)(x, t, context, return_sparsity=True))

  dense, sparse = forward(graphdef), forward(sparse_graphdef)
  _, realized = jax.block_until_ready(sparse(params, x, t, context))
  dense_ms = timing.median_ms(dense, params, x, t, context, warmup=2, samples=runs, calls_per_sample=1)
  peak_after_dense = _peak_bytes()
  sparse_ms = timing.median_ms(sparse, params, x, t, context, warmup=2, samples=runs, calls_per_sample=1)
  p_t, p_h, p_w = config.patch_size
  return {
    "config": config_name,
    "latent": [frames, height, width],
    "tokens": (frames // p_t) * (height // p_h) * (width // p_w),
    "text_len": TEXT_LEN,
    "batch": 1,
    "dtype": jnp.dtype(dtype).name,
    "attention": dataclasses.asdict(attention),
    "runs": runs,
    "realized_sparsity": float(realized.mean()),
    "dense_ms": dense_ms,
    "sparse_ms": sparse_ms,
    "speedup": dense_ms / sparse_ms,
    "peak_bytes_after_dense": peak_after_dense,
    "peak_bytes": _peak_bytes(),
  }


def diffusers_peer(config_name: str, tokens: str, runs: int, *, compile: bool) -> dict:
  """`benchmarks.dit_diffusers`'s result for the same model and inputs, run in a child process; or
  {"skipped": reason} where torch or diffusers is missing or the run fails (its error goes to stderr)."""
  missing = [name for name in ("torch", "diffusers") if importlib.util.find_spec(name) is None]
  if missing:
    return {"skipped": f"not installed: {', '.join(missing)}"}
  fields = {k: v for k, v in config_to_diffusers(CONFIGS[config_name]()).items() if not k.startswith("_")}
  command = [sys.executable, "-m", "benchmarks.dit_diffusers", "--config-json", json.dumps(fields)]
  command += ["--latent", *map(str, LATENTS[tokens]), "--text-len", str(TEXT_LEN), "--runs", str(runs)]
  command += [] if compile else ["--no-compile"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
  child = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=root, env=env)
  lines = child.stdout.strip().splitlines()
  if child.returncode != 0 or not lines:
    return {"skipped": f"the diffusers run failed (exit status {child.returncode}; its error is above)"}
  return json.loads(lines[-1])


def ratios(ours: dict, peer: dict) -> dict:
  """Each of ours (dense, sparse) over each of the peer's (eager, compiled), in time: peer ms / our ms."""
  found = {"dense_over_sparse": ours["dense_ms"] / ours["sparse_ms"]}
  for theirs in ("eager", "compiled"):
    if f"{theirs}_ms" in peer:
      for mine in ("dense", "sparse"):
        found[f"{mine}_over_diffusers_{theirs}"] = peer[f"{theirs}_ms"] / ours[f"{mine}_ms"]
  return found


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", choices=sorted(CONFIGS), default="wan2_1_1_3b")
  parser.add_argument("--tokens", choices=sorted(LATENTS), default="480p")
  parser.add_argument("--mode", choices=("hybrid", "topk", "topp"), default="topk")
  parser.add_argument("--topk", type=float, default=0.05)
  parser.add_argument("--topp", type=float, default=0.0)
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  parser.add_argument(
    "--diffusers", choices=("both", "eager", "none"), default="both", help="which diffusers steps to time"
  )
  parser.add_argument("--out", default=None, help="default benchmarks/results/dit-<config>-<tokens>-<device>.json")
  args = parser.parse_args(argv)
  if args.runs < 1:
    parser.error(f"--runs must be >= 1, got {args.runs}")

  attention = AttentionConfig(kind="sparse", topk=args.topk, topp=args.topp, mode=args.mode)
  # Before jax starts: the child gets the whole GPU, and jax's memory pool is not yet taken.
  if args.diffusers == "none":
    peer = {"skipped": "--diffusers none"}
  else:
    peer = diffusers_peer(args.config, args.tokens, args.runs, compile=args.diffusers == "both")
  result = run(args.config, args.tokens, attention, args.runs, jnp.dtype(args.dtype))
  result.update(diffusers=peer, ratios=ratios(result, peer))
  out = args.out or results.results_path(f"dit-{args.config}-{args.tokens}")
  results.write_results(out, {"command": " ".join(["python -m benchmarks.dit", *(argv or sys.argv[1:])]), **result})
  print(
    f"{results.device_name()}: {result['config']} {result['tokens']} tokens {result['dtype']}: "
    f"dense {result['dense_ms']:.1f} ms, sparse {result['sparse_ms']:.1f} ms "
    f"(sparsity {result['realized_sparsity']:.3f}), speedup {result['speedup']:.2f}x"
  )
  if "skipped" in peer:
    print(f"diffusers: skipped ({peer['skipped']})")
  else:
    for theirs in ("eager", "compiled"):
      if f"{theirs}_ms" in peer:
        print(
          f"diffusers {theirs}: {peer[f'{theirs}_ms']:.1f} ms; ours dense "
          f"{result['ratios'][f'dense_over_diffusers_{theirs}']:.2f}x, sparse "
          f"{result['ratios'][f'sparse_over_diffusers_{theirs}']:.2f}x faster"
        )
    if "compile_error" in peer:
      print(f"diffusers torch.compile failed: {peer['compile_error']}")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
