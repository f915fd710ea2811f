"""Shared test base: every block-sparse backend against the float32 dense reference.

`check_backend` is run on CPU for "xla" and for the Pallas kernels in interpret mode (test_attention.py),
and on a GPU for the compiled kernels (test_attention_gpu.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention.reference import masked_attention_reference
from sparge_jax import attention

# (batch, q_len, kv_len, heads, head_dim, block_q, block_kv): lengths that are not block multiples,
# q shorter and longer than kv, a single kv block, head dims 64 and 128.
SHAPES = [
  (1, 1000, 1000, 2, 64, 128, 64),
  (2, 200, 333, 1, 128, 64, 32),
  (1, 77, 300, 3, 64, 32, 16),
  (1, 130, 40, 2, 64, 64, 64),
]


def random_qkv(seed, batch, q_len, kv_len, heads, head_dim, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (batch, kv_len, heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, heads, head_dim), jnp.float32).astype(dtype)
  d_out = jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)
  return q, k, v, d_out


def random_mask(seed, batch, heads, n_q, n_kv, density):
  """Random mask with some single-block rows; never an empty row."""
  key_mask, key_single, key_pick = jax.random.split(jax.random.PRNGKey(seed + 1000), 3)
  mask = jax.random.bernoulli(key_mask, density, (batch, heads, n_q, n_kv))
  single = jax.random.bernoulli(key_single, 0.3, (batch, heads, n_q, 1))
  pick = jax.nn.one_hot(jax.random.randint(key_pick, (batch, heads, n_q), 0, n_kv), n_kv, dtype=bool)
  return jnp.where(single, pick, mask | pick)


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def check_backend(backend, interpret, shape, *, seed, density=0.35, dtype=jnp.float32, tol=1e-5, full_mask=False):
  """Forward and gradients of one backend against the reference on fresh random inputs."""
  batch, q_len, kv_len, heads, head_dim, block_q, block_kv = shape
  q, k, v, d_out = random_qkv(seed, batch, q_len, kv_len, heads, head_dim, dtype)
  n_q, n_kv = -(-q_len // block_q), -(-kv_len // block_kv)
  if full_mask:
    mask = jnp.ones((batch, heads, n_q, n_kv), bool)
  else:
    mask = random_mask(seed, batch, heads, n_q, n_kv, density)

  def ours(q, k, v):
    return attention.block_sparse_attention(
      q, k, v, mask, block_q=block_q, block_kv=block_kv, backend=backend, interpret=interpret
    )

  def reference(q, k, v):
    return masked_attention_reference(q, k, v, mask, block_q=block_q, block_kv=block_kv)

  out, pullback = jax.vjp(ours, q, k, v)
  grads = pullback(d_out)
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  ref_out, ref_pullback = jax.vjp(reference, q32, k32, v32)
  ref_grads = ref_pullback(d_out.astype(jnp.float32))

  assert out.shape == q.shape and out.dtype == q.dtype
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  errors = {"out": rel_err(out, ref_out)}
  for name, g, rg, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype
    errors[name] = rel_err(g, rg)
  assert all(e <= tol for e in errors.values()), errors
  if full_mask:
    with jax.default_matmul_precision("highest"):  # GPUs would otherwise use TF32 for the float32 dense
      dense = jax.nn.dot_product_attention(q32, k32, v32)
    assert rel_err(out, dense) <= tol
  return errors
