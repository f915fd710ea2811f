"""One Wan DiT forward pass (a denoising step), dense vs sparse self-attention, in the same run.

    python -m benchmarks.dit                              # wan2_1_1_3b, 480p 81 frames, bf16 (H100)
    python -m benchmarks.dit --config tiny --tokens small # a CPU smoke run

Writes benchmarks/results/dit-<device>.json. Random weights, batch 1, 512 text tokens. Both variants
run the same jitted forward over the same parameter arrays (only the static attention setting
differs); times are medians of `--runs` calls after warm-up, each waited for with
`jax.block_until_ready`. Random weights give near-uniform pooled block scores, where Top-p keeps
many blocks, so the default mask is Top-k alone at 5%: a fixed 95% sparsity, the paper's operating
point. Peak memory is the device's `peak_bytes_in_use` after the dense runs and after both.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import timing
from sparge_jax.models.wan import AttentionConfig, WanModel, tiny, wan2_1_1_3b, wan2_1_14b

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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", choices=sorted(CONFIGS), default="wan2_1_1_3b")
  parser.add_argument("--tokens", choices=sorted(LATENTS), default="480p")
  parser.add_argument("--mode", choices=("hybrid", "topk", "topp"), default="topk")
  parser.add_argument("--topk", type=float, default=0.05)
  parser.add_argument("--topp", type=float, default=0.0)
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  parser.add_argument("--out", default=None, help="results file (default benchmarks/results/dit-<device>.json)")
  args = parser.parse_args()
  if args.runs < 1:
    parser.error(f"--runs must be >= 1, got {args.runs}")

  attention = AttentionConfig(kind="sparse", topk=args.topk, topp=args.topp, mode=args.mode)
  result = run(args.config, args.tokens, attention, args.runs, jnp.dtype(args.dtype))
  out = args.out or os.path.join(os.path.dirname(__file__), "results", f"dit-{timing.device_slug()}.json")
  timing.write_results(out, result)
  print(
    f"{timing.device_name()}: {result['config']} {result['tokens']} tokens {result['dtype']}: "
    f"dense {result['dense_ms']:.1f} ms, sparse {result['sparse_ms']:.1f} ms "
    f"(sparsity {result['realized_sparsity']:.3f}), speedup {result['speedup']:.2f}x -> {out}"
  )


if __name__ == "__main__":
  main()
