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


def random_qkv(seed, batch, q_len, kv_len, heads, head_dim, dtype=jnp.float32, kv_heads=None):
  """q [batch, q_len, heads, head_dim], k and v [batch, kv_len, kv_heads, head_dim], and a cotangent like q."""
  kv_heads = heads if kv_heads is None else kv_heads
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
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


def check_backend(
  backend,
  interpret,
  shape,
  *,
  seed,
  density=0.35,
  dtype=jnp.float32,
  tol=1e-5,
  full_mask=False,
  kv_heads=None,
  q_lengths=None,
  kv_lengths=None,
  is_causal=False,
  with_lse=False,
):
  """Forward and gradients of one backend against the reference on fresh random inputs.

  kv_heads: grouped heads (default: as many as the query heads); q_lengths, kv_lengths: int32 [batch];
  with_lse: also compare lse, and differentiate a loss that uses it (a random lse cotangent).
  """
  batch, q_len, kv_len, heads, head_dim, block_q, block_kv = shape
  q, k, v, d_out = random_qkv(seed, batch, q_len, kv_len, heads, head_dim, dtype, kv_heads)
  n_q, n_kv = -(-q_len // block_q), -(-kv_len // block_kv)
  if full_mask:
    mask = jnp.ones((batch, heads, n_q, n_kv), bool)
  else:
    mask = random_mask(seed, batch, heads, n_q, n_kv, density)
  d_lse = jax.random.normal(jax.random.PRNGKey(seed + 7), (batch, q_len, heads), jnp.float32)
  valid_q = jnp.ones((batch, q_len), bool) if q_lengths is None else jnp.arange(q_len) < q_lengths[:, None]
  lengths = dict(query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths)

  def ours(q, k, v):
    result = attention.block_sparse_attention(
      q,
      k,
      v,
      mask,
      block_q=block_q,
      block_kv=block_kv,
      is_causal=is_causal,
      implementation=backend,
      interpret=interpret,
      return_residual=with_lse,
      **lengths,
    )
    return result if with_lse else (result, None)

  def reference(q, k, v):
    out, lse = masked_attention_reference(
      q, k, v, mask, block_q=block_q, block_kv=block_kv, kv_seq_lengths=kv_lengths, is_causal=is_causal, return_lse=True
    )
    out = jnp.where(valid_q[:, :, None, None], out, 0.0)
    return out, jnp.where(valid_q[:, :, None], jnp.swapaxes(lse, 1, 2), -jnp.inf)

  def with_cotangents(f):
    def loss(q, k, v):
      out, lse = f(q, k, v)
      total = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))
      if with_lse:  # rows that attend nothing have a constant lse in ours and -inf in the reference
        total += jnp.sum(jnp.where(jnp.isfinite(lse) & (lse > -1e30), lse.astype(jnp.float32), 0.0) * d_lse)
      return total, (out, lse)

    return loss

  grads, (out, lse) = jax.grad(with_cotangents(ours), (0, 1, 2), has_aux=True)(q, k, v)
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  ref_grads, (ref_out, ref_lse) = jax.grad(with_cotangents(reference), (0, 1, 2), has_aux=True)(q32, k32, v32)

  assert out.shape == q.shape and out.dtype == q.dtype
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  errors = {"out": rel_err(out, ref_out)}
  if with_lse:
    assert lse.shape == (batch, q_len, heads) and lse.dtype == q.dtype
    attended = np.isfinite(np.asarray(ref_lse)) & np.asarray(valid_q)[:, :, None]
    errors["lse"] = rel_err(np.asarray(lse, np.float32)[attended], np.asarray(ref_lse)[attended])
    # Rows that attend no key (padded queries, emptied mask rows) get jax.nn's value.
    padded_row_lse = np.asarray(jnp.asarray(attention.PADDED_ROW_LSE, dtype), np.float32)
    np.testing.assert_array_equal(np.asarray(lse, np.float32)[~attended], padded_row_lse)
  for name, g, rg, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype
    errors[name] = rel_err(g, rg)
  assert all(e <= tol for e in errors.values()), errors
  if full_mask and not (is_causal or q_lengths is not None or kv_lengths is not None or kv_heads):
    with jax.default_matmul_precision("highest"):  # GPUs would otherwise use TF32 for the float32 dense
      dense = jax.nn.dot_product_attention(q32, k32, v32)
    assert rel_err(out, dense) <= tol
  return errors
