"""Trainable block-sparse attention with SpargeAttention2's hybrid Top-k ∪ Top-p block mask.

Arrays are [batch, seq, heads, head_dim], as in `jax.nn.dot_product_attention`; q may be longer or shorter
than k and v. `scale` defaults to head_dim ** -0.5.

    out = sparse_attention(q, k, v, topk=0.03, topp=0.2)           # mask + attention, differentiable
    mask = block_mask(q, k, topk=0.03, topp=0.2)                   # bool [batch, heads, n_q_blocks, n_kv_blocks]
    out = block_sparse_attention(q, k, v, mask)                    # attention on the kept blocks only

Backends: "mosaic" (Pallas Mosaic GPU kernels: wgmma, TMA, warp specialisation; Hopper, bf16/fp16, head_dim
64 or 128, block_kv 64), "triton" (Pallas Triton kernels; any CUDA GPU, any dtype), "xla" (plain JAX gathers
over the kept blocks; runs anywhere), "auto" (mosaic where it applies on Hopper, else triton on GPU, xla
elsewhere). `interpret=True` runs the Pallas kernels on CPU.
Gradients flow to q, k and v through a `jax.custom_vjp` whose backward also skips masked blocks; the mask
itself is a constant for autodiff.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_mask import triton_index_table as index_table
from pallas_kernels.block_mask import triton_pool as mask_pool
from pallas_kernels.block_mask import triton_select as mask_select
from pallas_kernels.block_sparse_attention import mosaic as mosaic_block_sparse
from pallas_kernels.block_sparse_attention import triton as triton_block_sparse
from pallas_kernels.block_sparse_attention import xla as xla_block_sparse
from sparge_jax import mask as mask_lib

BACKENDS = ("auto", "xla", "triton", "mosaic")
MODES = mask_lib.MODES

__all__ = ["block_mask", "block_sparse_attention", "sparse_attention", "dense_attention", "BACKENDS", "MODES"]


# ----------------------------------------------------------------------------------------- checks


def _check_qkv(q, k, v):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or x.ndim != 4:
      raise ValueError(
        f"{name} must be a 4-D array [batch, seq, heads, head_dim], got shape {getattr(x, 'shape', type(x))}"
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype (bfloat16, float16 or float32), got {x.dtype}")
    if x.shape[1] == 0:
      raise ValueError(f"{name} has an empty sequence axis: shape {x.shape}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
  for axis, what in ((0, "batch"), (2, "heads"), (3, "head_dim")):
    if not (q.shape[axis] == k.shape[axis] == v.shape[axis]):
      raise ValueError(f"q, k and v must agree in {what} (axis {axis}): q {q.shape}, k {k.shape}, v {v.shape}")
  if k.shape[1] != v.shape[1]:
    raise ValueError(f"k and v must have the same sequence length: k {k.shape}, v {v.shape}")


def _check_block(name, block):
  if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block < 16 or block & (block - 1):
    raise ValueError(f"{name} must be a power of two >= 16, got {block!r}")


def _check_fraction(name, value, heads):
  shape = np.shape(value)
  if shape not in ((), (heads,)):
    raise ValueError(f"{name} must be a float or an array of shape [heads] = ({heads},), got shape {shape}")
  if isinstance(value, jax.core.Tracer):
    return  # values unknown while tracing; the shape is all we can check
  array = np.asarray(value, dtype=np.float64)
  if not np.all((array >= 0.0) & (array <= 1.0)):
    raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_scale(scale):
  if scale is not None and not (isinstance(scale, (int, float, np.floating)) and np.isfinite(scale) and scale > 0):
    raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")


def _default_scale(scale, head_dim):
  return float(head_dim) ** -0.5 if scale is None else float(scale)


def _on_gpu():
  return jax.default_backend() == "gpu"


def _on_hopper():
  return _on_gpu() and getattr(jax.devices()[0], "compute_capability", "") == "9.0"


def _resolve_backend(backend, interpret, *, dtype, head_dim, block_q, block_kv, lengths):
  _check_choice("backend", backend, BACKENDS)
  # TMA descriptors need sequence lengths in whole 8-row tiles (Wan's 32,760 and 75,600 are).
  mosaic_ok = mosaic_block_sparse.supported(dtype, head_dim, block_q, block_kv) and all(n % 8 == 0 for n in lengths)
  if backend == "auto":
    if interpret or not _on_gpu():
      return "triton" if interpret else "xla"
    return "mosaic" if (mosaic_ok and _on_hopper()) else "triton"
  if backend in ("triton", "mosaic") and not (interpret or _on_gpu()):
    raise ValueError(
      f"backend={backend!r} needs a CUDA GPU; pass interpret=True to run the kernels on CPU, or use backend='xla'"
    )
  if backend == "mosaic" and not mosaic_ok:
    raise ValueError(
      f"backend='mosaic' needs bf16/fp16 inputs, head_dim 64 or 128, block_q 64 or 128, "
      f"block_kv 64 and sequence lengths that are multiples of 8; got {jnp.dtype(dtype).name}, "
      f"head_dim {head_dim}, block_q {block_q}, block_kv {block_kv}, lengths {lengths}: "
      "use backend='triton'"
    )
  return backend


# --------------------------------------------------------------------------------------- the vjp


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
  backend: str
  block_q: int
  block_kv: int
  scale: float
  interpret: bool

  def kwargs(self):
    kw = dict(block_q=self.block_q, block_kv=self.block_kv, scale=self.scale)
    if self.backend != "xla":
      kw["interpret"] = self.interpret
    return kw

  @property
  def module(self) -> Any:
    return {"xla": xla_block_sparse, "triton": triton_block_sparse, "mosaic": mosaic_block_sparse}[self.backend]


def _index_table(mask, config):
  """(index, count) of `mask`'s rows: in XLA for the xla backend, else with the Pallas kernel."""
  if config.backend == "xla":
    return mask_lib.index_table(mask)
  return index_table.index_table(mask, interpret=config.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, forward_table, mask, config: _KernelConfig):
  del mask
  return config.module.forward(q, k, v, *forward_table, **config.kwargs())[0]


def _attention_fwd(q, k, v, forward_table, mask, config):
  out, lse = config.module.forward(q, k, v, *forward_table, **config.kwargs())
  return out, (q, k, v, out, lse, forward_table, mask)


def _attention_bwd(config, residuals, d_out):
  q, k, v, out, lse, forward_table, mask = residuals
  # The dK/dV table (per kv block, its q blocks) is built here, so a forward-only call never pays for it.
  backward_table = _index_table(jnp.swapaxes(mask, -1, -2), config)
  dq, dk, dv = config.module.backward(q, k, v, out, lse, d_out, *forward_table, *backward_table, **config.kwargs())
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_head_dim(x, dim):
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dim - x.shape[-1])))


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale", "backend", "interpret"))
def _block_sparse_attention(q, k, v, mask, *, block_q, block_kv, scale, backend, interpret):
  mask = jax.lax.stop_gradient(mask)
  config = _KernelConfig(backend, block_q, block_kv, scale, interpret)
  forward_table = _index_table(mask, config)
  head_dim = q.shape[-1]
  if backend == "triton" and (head_dim < 16 or head_dim & (head_dim - 1)):
    # Triton tiles need power-of-two sizes; zero columns change neither scores nor outputs.
    padded = max(16, 1 << (head_dim - 1).bit_length())
    q, k, v = (_pad_head_dim(x, padded) for x in (q, k, v))
    return _attention(q, k, v, forward_table, mask, config)[..., :head_dim]
  return _attention(q, k, v, forward_table, mask, config)


# ------------------------------------------------------------------------------------ public API


def block_mask(
  q, k, *, topk=0.03, topp=0.2, mode="hybrid", block_q=128, block_kv=64, scale=None, backend="auto", interpret=False
):
  """SpargeAttention2's block mask.

  q: [batch, q_len, heads, head_dim], k: [batch, kv_len, heads, head_dim].
  topk, topp: floats in [0, 1] or arrays of shape [heads]. mode: "hybrid" (Top-k ∪ Top-p), "topk", "topp".
  Returns bool [batch, heads, ceil(q_len/block_q), ceil(kv_len/block_kv)]: True where a kv block is kept.

  Row i keeps the ⌈topk·n_kv⌉ largest entries of P̄ᵢ = softmax_j(scale·q̄ᵢ·k̄ⱼ) (Top-k) and/or the smallest
  set of largest entries whose sum reaches topp (Top-p); q̄, k̄ are means of the real tokens of a block.
  Ties go to the lower index; every row keeps at least one block. No gradient flows through the mask.
  """
  _check_qkv(q, k, k)
  _check_block("block_q", block_q)
  _check_block("block_kv", block_kv)
  _check_fraction("topk", topk, q.shape[2])
  _check_fraction("topp", topp, q.shape[2])
  _check_choice("mode", mode, MODES)
  _check_scale(scale)
  backend = _resolve_backend(
    backend,
    interpret,
    dtype=q.dtype,
    head_dim=q.shape[-1],
    block_q=block_q,
    block_kv=block_kv,
    lengths=(q.shape[1], k.shape[1]),
  )
  return _block_mask(
    q,
    k,
    jnp.asarray(topk, jnp.float32),
    jnp.asarray(topp, jnp.float32),
    mode=mode,
    block_q=block_q,
    block_kv=block_kv,
    scale=_default_scale(scale, q.shape[-1]),
    pallas=backend != "xla",
    interpret=interpret,
  )


@functools.partial(jax.jit, static_argnames=("mode", "block_q", "block_kv", "scale", "pallas", "interpret"))
def _block_mask(q, k, topk, topp, *, mode, block_q, block_kv, scale, pallas, interpret):
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  if pallas:
    logits = mask_pool.pooled_block_logits(q, k, block_q=block_q, block_kv=block_kv, scale=scale, interpret=interpret)
    return mask_select.select_blocks(logits, topk, topp, mode, interpret=interpret)
  probs = mask_lib.pooled_block_probs_reference(q, k, block_q=block_q, block_kv=block_kv, scale=scale)
  return mask_lib.select_blocks(probs, topk, topp, mode)


def block_sparse_attention(q, k, v, mask, *, block_q=128, block_kv=64, scale=None, backend="auto", interpret=False):
  """Attention restricted to the kept blocks of `mask`.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim];
  mask: bool [batch, heads, ceil(q_len/block_q), ceil(kv_len/block_kv)].
  Returns [batch, q_len, heads, head_dim] in q's dtype. Query rows with no kept block output zeros.
  """
  _check_qkv(q, k, v)
  _check_block("block_q", block_q)
  _check_block("block_kv", block_kv)
  _check_scale(scale)
  expected = (q.shape[0], q.shape[2], -(-q.shape[1] // block_q), -(-k.shape[1] // block_kv))
  if not hasattr(mask, "shape") or tuple(mask.shape) != expected:
    raise ValueError(
      f"mask must have shape [batch, heads, ceil(q_len/block_q), ceil(kv_len/block_kv)] = "
      f"{expected}, got {getattr(mask, 'shape', type(mask))}"
    )
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be a bool array, got dtype {mask.dtype}")
  backend = _resolve_backend(
    backend,
    interpret,
    dtype=q.dtype,
    head_dim=q.shape[-1],
    block_q=block_q,
    block_kv=block_kv,
    lengths=(q.shape[1], k.shape[1]),
  )
  return _block_sparse_attention(
    q,
    k,
    v,
    mask,
    block_q=block_q,
    block_kv=block_kv,
    scale=_default_scale(scale, q.shape[-1]),
    backend=backend,
    interpret=interpret,
  )


def sparse_attention(
  q,
  k,
  v,
  *,
  topk=0.03,
  topp=0.2,
  mode="hybrid",
  block_q=128,
  block_kv=64,
  scale=None,
  backend="auto",
  interpret=False,
  return_stats=False,
):
  """`block_mask` then `block_sparse_attention`.

  Returns out [batch, q_len, heads, head_dim], or (out, stats) with return_stats=True, where
  stats["sparsity"] is float32 [batch, heads], the fraction of blocks skipped, and stats["kept_blocks"]
  is int32 [batch, heads].
  """
  _check_qkv(q, k, v)
  mask = block_mask(
    q,
    k,
    topk=topk,
    topp=topp,
    mode=mode,
    block_q=block_q,
    block_kv=block_kv,
    scale=scale,
    backend=backend,
    interpret=interpret,
  )
  out = block_sparse_attention(
    q, k, v, mask, block_q=block_q, block_kv=block_kv, scale=scale, backend=backend, interpret=interpret
  )
  if not return_stats:
    return out
  kept = jnp.sum(mask, axis=(-2, -1), dtype=jnp.int32)
  sparsity = 1.0 - kept.astype(jnp.float32) / (mask.shape[-2] * mask.shape[-1])
  return out, {"sparsity": sparsity, "kept_blocks": kept}


def dense_attention(q, k, v, *, scale=None):
  """Full attention: cuDNN flash attention on Ampere+ GPUs for bf16/fp16, XLA otherwise.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim].
  """
  _check_qkv(q, k, v)
  _check_scale(scale)
  head_dim = q.shape[-1]
  # cuDNN flash attention needs Ampere or newer (a T4 falls back to XLA).
  ampere = _on_gpu() and float(getattr(jax.devices()[0], "compute_capability", "0")) >= 8.0
  cudnn = ampere and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
  return jax.nn.dot_product_attention(
    q, k, v, scale=_default_scale(scale, head_dim), implementation="cudnn" if cudnn else "xla"
  )
