"""What the quality experiments measure: models loaded from workdirs, sampling, SSIM, attention probes.

Probes run inside the model's forward (``WanModel(..., probe=fn)``) on every layer's self-attention
q, k, v [batch, seq, heads, head_dim], so nothing of the model is re-implemented here.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparge_jax import attention
from sparge_jax.files import write_json_atomic
from sparge_jax.models.wan import AttentionConfig, WanConfig, WanModel
from train import checkpoint, flow, sharding
from train.configs import Config
from train.models import model_configs
from train.sources import make_source


def load_model(config: Config, workdir: str, attention_config: AttentionConfig) -> tuple[WanConfig, object, object]:
  """(model config, graphdef, params) of the newest checkpoint in ``workdir``, with ``attention_config``."""
  dense, _ = model_configs(config)
  model_config = dataclasses.replace(dense, attention=attention_config)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: WanModel(model_config, rngs=nnx.Rngs(0))))
  shardings = sharding.param_shardings(abstract, sharding.make_mesh(-1, 1))
  params = checkpoint.load_params(workdir, checkpoint.abstract(abstract.to_pure_dict(), shardings))
  if config.compute_dtype == "bfloat16":
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  return model_config, graphdef, params


def with_attention(model_config: WanConfig, attention_config: AttentionConfig):
  """(config, graphdef) of the same architecture with another self-attention; params are interchangeable."""
  model_config = dataclasses.replace(model_config, attention=attention_config)
  return model_config, nnx.split(nnx.eval_shape(lambda: WanModel(model_config, rngs=nnx.Rngs(0))))[0]


def sample(graphdef, params, noise, context, *, num_steps: int, shift: float = 5.0) -> np.ndarray:
  """Euler flow-matching samples (``train.flow``), float32 like ``noise: [batch, frames, height, width, channels]``."""

  @jax.jit
  def run(params, noise, context):
    def velocity(x, t):
      model = nnx.merge(graphdef, params)
      return model(x, t, context).astype(x.dtype)

    return flow.euler_sample(velocity, noise, num_steps=num_steps, shift=shift)

  dtype = jax.tree.leaves(params)[0].dtype
  return np.asarray(run(params, noise.astype(dtype), context.astype(dtype)), np.float32)


def mean_ssim(reference: np.ndarray, other: np.ndarray, *, sigma: float = 1.5, radius: int = 5) -> float:
  """Mean SSIM (Wang et al. 2004: Gaussian window sigma 1.5, 11 taps, K1 0.01, K2 0.03) over frames and channels.

  reference, other: [..., height, width, channels] (each channel of each frame is one grey image); the data
  range is the reference's, as in ``train.sample.psnr``. Statistics are taken over the valid region only.
  (``train.evaluate.ssim_per_image`` gives one value per image at a fixed data range.)
  """
  x, y = np.asarray(reference, np.float64), np.asarray(other, np.float64)
  if x.shape != y.shape or x.ndim < 3 or min(x.shape[-3:-1]) <= 2 * radius:
    raise ValueError(
      f"mean_ssim needs equal shapes [..., height, width, channels] with height, width > {2 * radius}, "
      f"got {x.shape} and {y.shape}"
    )
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps /= taps.sum()

  def blur(a):  # separable valid-mode filter over height (axis -3) and width (axis -2)
    a = np.apply_along_axis(lambda r: np.convolve(r, taps, "valid"), -3, a)
    return np.apply_along_axis(lambda r: np.convolve(r, taps, "valid"), -2, a)

  peak = x.max() - x.min()
  c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
  mx, my = blur(x), blur(y)
  vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
  index = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
  return float(index.mean())


def relative_l1(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(out - ref).sum() / np.abs(ref).sum())


def attention_outputs_probe(attention_config: AttentionConfig):
  """probe(q, k, v) -> (this layer's self-attention output under ``attention_config``, dense output), float32."""

  def probe(q, k, v):
    dense = attention.dense_attention(q, k, v).astype(jnp.float32)
    if attention_config.kind == "dense":
      return dense, dense
    topk, topp = (
      jnp.asarray(p, jnp.float32) if isinstance(p, tuple) else p for p in (attention_config.topk, attention_config.topp)
    )
    out = attention.sparse_attention(
      q,
      k,
      v,
      topk=topk,
      topp=topp,
      mode=attention_config.mode,
      block_q=attention_config.block_q,
      block_kv=attention_config.block_kv,
      backend=attention_config.implementation or "auto",
    )
    return out.astype(jnp.float32), dense

  return probe


def block_mass(q, k, *, block_q: int, block_kv: int):
  """Mean attention mass per (query block, kv block): float32 [batch, heads, n_q_blocks, n_kv_blocks], rows sum to 1.

  Materialises the full [batch, heads, seq, seq] attention of one layer (fine at 4,096 tokens).
  """
  batch, seq, heads, head_dim = q.shape
  if seq % block_q or k.shape[1] % block_kv:
    raise ValueError(f"sequence {seq} must be a multiple of block_q {block_q} and block_kv {block_kv}")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * head_dim**-0.5
  p = jax.nn.softmax(logits, axis=-1)
  p = p.reshape(batch, heads, seq // block_q, block_q, k.shape[1] // block_kv, block_kv)
  return p.sum(axis=(3, 5)) / block_q


def concentration_probe(share_of_mass: float, *, block_q: int, block_kv: int):
  """probe(q, k, v) -> (blocks needed [batch, heads], rel-L1 numerator [batch], denominator [batch]).

  Per query-block row, the fewest kv blocks (largest mass first) holding ``share_of_mass`` of the attention
  mass; their share of the row is averaged over rows. The error is that of block-sparse attention keeping
  exactly those blocks (an oracle mask at that sparsity) against dense attention.
  """

  def probe(q, k, v):
    mass = block_mass(q, k, block_q=block_q, block_kv=block_kv)
    ordered = -jnp.sort(-mass, axis=-1)
    needed = jnp.sum(jnp.cumsum(ordered, axis=-1) < share_of_mass, axis=-1) + 1  # [b, h, n_q]
    rank = jnp.argsort(jnp.argsort(-mass, axis=-1), axis=-1)
    mask = rank < needed[..., None]
    out = attention.block_sparse_attention(q, k, v, mask, block_q=block_q, block_kv=block_kv, backend="xla")
    dense = attention.dense_attention(q, k, v)
    diff = jnp.abs(out.astype(jnp.float32) - dense.astype(jnp.float32)).sum(axis=(1, 2, 3))
    return needed.mean(-1) / mass.shape[-1], diff, jnp.abs(dense.astype(jnp.float32)).sum(axis=(1, 2, 3))

  return probe


def held_out(config: Config, num_examples: int, seed: int = 1234) -> dict:
  """Fixed held-out evaluation inputs: data x0 and captions, t spread over (0, 1), noise.

  Examples come from the end of the teacher's dataset (the loader draws them like any other; with
  thousands of examples and a few hundred fine-tuning steps most runs never see them).
  """
  source = make_source(config, config.model)
  indices = [len(source) - 1 - i for i in range(num_examples)]
  examples = [source.get(i) for i in indices]
  x0 = np.stack([e["latents"] for e in examples])
  rng = np.random.default_rng(seed)
  t = ((np.arange(num_examples) + rng.uniform(size=num_examples)) / num_examples).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  return {
    "x0": x0,
    "context": np.stack([e["context"] for e in examples]),
    "t": t,
    "noise": noise,
    "x_t": np.asarray(flow.noisy(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))),
  }


def forward(graphdef, params, x_t, t, context, probe=None):
  """One jitted forward: (velocity float32, sparsity [layers, batch, heads], probe results)."""

  @jax.jit
  def run(params, x_t, t, context):
    dtype = jax.tree.leaves(params)[0].dtype
    model = nnx.merge(graphdef, params)
    out = model(x_t.astype(dtype), flow.model_timestep(t), context.astype(dtype), return_sparsity=True, probe=probe)
    return (out[0].astype(jnp.float32), out[1], out[2] if probe is not None else None)

  return run(params, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(context))


def write_json(path: str, data) -> None:
  """Writes ``data`` as JSON to ``path`` (whole or not at all), creating its folder."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  write_json_atomic(path, data, indent=1)
