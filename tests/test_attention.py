"""Block-sparse attention on CPU: every backend (XLA, and the Pallas kernels in interpret mode) against
the float32 reference, plus transformations, NaN handling and input validation."""

import functools

import attention_cases as cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_mask import triton_pool as mask_pool
from sparge_jax import attention
from sparge_jax import mask as mask_lib

BACKENDS = [("xla", False), ("triton", True)]
backend_ids = ["xla", "triton-interpret"]


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
@pytest.mark.parametrize("shape", cases.SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, interpret, shape):
  cases.check_backend(backend, interpret, shape, seed=sum(shape))


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
def test_full_mask_equals_dense(backend, interpret):
  cases.check_backend(backend, interpret, (1, 150, 200, 2, 64, 64, 32), seed=3, full_mask=True)


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float16, 5e-3)])
def test_low_precision_inputs(backend, interpret, dtype, tol):
  cases.check_backend(backend, interpret, (1, 100, 90, 2, 64, 32, 16), seed=4, dtype=dtype, tol=tol)


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
def test_head_dim_not_a_power_of_two(backend, interpret):
  cases.check_backend(backend, interpret, (1, 70, 50, 2, 40, 32, 16), seed=5)


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
def test_empty_rows_output_zero_and_finite_grads(backend, interpret):
  q, k, v, d_out = cases.random_qkv(6, 1, 64, 64, 1, 32)
  mask = jnp.array([[[[True, False], [False, False]]]])

  def loss(q, k, v):
    out = attention.block_sparse_attention(q, k, v, mask, block_q=32, block_kv=32, backend=backend, interpret=interpret)
    return jnp.sum(out * d_out), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  assert np.all(np.asarray(out[:, 32:]) == 0)
  assert np.any(np.asarray(out[:, :32]) != 0)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[1][:, 32:]) == 0)  # k of a never-kept block gets no gradient


def test_mosaic_interpret_through_public_api():
  cases.check_backend("mosaic", True, (1, 136, 104, 2, 64, 64, 64), seed=21, dtype=jnp.bfloat16, tol=2e-2)


# -------------------------------------------------------------------------------- transformations


def _sparse(q, k, v, backend="xla", interpret=False):
  return attention.sparse_attention(
    q, k, v, topk=0.3, topp=0.3, block_q=32, block_kv=16, backend=backend, interpret=interpret
  )


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
def test_jit_grad_vmap_scan(backend, interpret):
  f = functools.partial(_sparse, backend=backend, interpret=interpret)
  qs, ks, vs = (jnp.stack([x, x * 0.5]) for x in cases.random_qkv(7, 1, 70, 60, 2, 32)[:3])
  eager = jnp.stack([f(qs[i], ks[i], vs[i]) for i in range(2)])

  np.testing.assert_allclose(jax.jit(f)(qs[0], ks[0], vs[0]), eager[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(f)(qs, ks, vs), eager, rtol=1e-5, atol=1e-6)

  def body(carry, qkv):
    return carry + jnp.sum(f(*qkv)), f(*qkv)

  total, scanned = jax.lax.scan(body, 0.0, (qs, ks, vs))
  np.testing.assert_allclose(scanned, eager, rtol=1e-5, atol=1e-6)

  grad_scan = jax.jit(jax.grad(lambda qs: jax.lax.scan(body, 0.0, (qs, ks, vs))[0]))(qs)
  grad_loop = jnp.stack([jax.grad(lambda q: jnp.sum(f(q, ks[i], vs[i])))(qs[i]) for i in range(2)])
  np.testing.assert_allclose(grad_scan, grad_loop, rtol=1e-5, atol=1e-6)
  grad_vmap = jax.vmap(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v))))(qs, ks, vs)
  np.testing.assert_allclose(grad_vmap, grad_loop, rtol=1e-5, atol=1e-6)


def test_no_gradient_through_mask_selection():
  q, k, v, d_out = cases.random_qkv(8, 1, 96, 96, 2, 32)
  kw = dict(block_q=32, block_kv=16)
  mask = attention.block_mask(q, k, topk=0.2, topp=0.3, **kw)

  def with_selection(q, k, v):
    return jnp.sum(attention.sparse_attention(q, k, v, topk=0.2, topp=0.3, **kw) * d_out)

  def with_fixed_mask(q, k, v):
    return jnp.sum(attention.block_sparse_attention(q, k, v, mask, **kw) * d_out)

  for a, b in zip(jax.grad(with_selection, (0, 1, 2))(q, k, v), jax.grad(with_fixed_mask, (0, 1, 2))(q, k, v)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
def test_nan_inputs_give_nan_outputs(backend, interpret):
  q, k, v, _ = cases.random_qkv(9, 1, 64, 64, 2, 32)
  out = _sparse(q, k.at[0, 40, 1, 3].set(jnp.nan), v, backend, interpret)
  assert np.isnan(np.asarray(out[:, :, 1])).all()  # every query of the head sees the NaN key's block
  assert np.isfinite(np.asarray(out[:, :, 0])).all()
  out = _sparse(q.at[0, 5, 0, 0].set(jnp.nan), k, v, backend, interpret)
  assert np.isnan(np.asarray(out[0, 5, 0])).all()


def test_stats_report_realized_sparsity():
  q, k, v, _ = cases.random_qkv(10, 2, 128, 256, 3, 32)
  topk = jnp.array([0.0, 0.25, 1.0])
  out, stats = attention.sparse_attention(
    q, k, v, topk=topk, topp=0.0, mode="topk", block_q=32, block_kv=16, return_stats=True
  )
  assert out.shape == q.shape
  assert stats["sparsity"].shape == (2, 3) and stats["kept_blocks"].shape == (2, 3)
  np.testing.assert_allclose(stats["sparsity"], np.broadcast_to([1 - 1 / 16, 0.75, 0.0], (2, 3)))
  np.testing.assert_array_equal(stats["kept_blocks"], np.broadcast_to([4, 16, 64], (2, 3)))


def test_topk_one_equals_dense_attention():
  q, k, v, _ = cases.random_qkv(16, 1, 100, 120, 2, 32)
  out = attention.sparse_attention(q, k, v, topk=1.0, block_q=32, block_kv=16)
  np.testing.assert_allclose(out, attention.dense_attention(q, k, v), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- mask pooling


def test_pallas_pooling_matches_reference():
  q, k, _, _ = cases.random_qkv(17, 2, 300, 200, 2, 64)
  scale = 0.3
  ours = mask_pool.pooled_block_probs(q, k, block_q=64, block_kv=16, scale=scale, interpret=True)
  ref = mask_lib.pooled_block_probs_reference(q, k, block_q=64, block_kv=16, scale=scale)
  assert ours.shape == (2, 2, 5, 13)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)


def test_pooling_uses_only_real_tokens_of_partial_blocks():
  x = jax.random.normal(jax.random.PRNGKey(18), (1, 40, 1, 16))
  means = mask_lib.block_means_reference(x, 16)
  np.testing.assert_allclose(means[0, 0, 2], x[0, 32:, 0].mean(0), rtol=1e-6)
  np.testing.assert_allclose(
    mask_pool.block_means_pair(x, x, block_q=16, block_kv=16, interpret=True)[1], means, rtol=1e-6
  )


def test_block_means_pair_matches_reference():
  # Different lengths and block sizes, both with a partial last block: q blocks first in the grid, then k's.
  q = jax.random.normal(jax.random.PRNGKey(22), (2, 100, 3, 16), jnp.bfloat16)
  k = jax.random.normal(jax.random.PRNGKey(23), (2, 75, 3, 16), jnp.bfloat16)
  q_means, k_means = mask_pool.block_means_pair(q, k, block_q=32, block_kv=16, interpret=True)
  np.testing.assert_allclose(q_means, mask_lib.block_means_reference(q, 32), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(k_means, mask_lib.block_means_reference(k, 16), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("q_tile, kv_tile", [(16, 16), (32, 64), (64, 32)])
def test_pooled_logits_tiles_agree(q_tile, kv_tile):
  q_means = jax.random.normal(jax.random.PRNGKey(20), (1, 2, 37, 32))
  k_means = jax.random.normal(jax.random.PRNGKey(21), (1, 2, 70, 32))
  ours = mask_pool.pooled_logits(q_means, k_means, scale=0.2, q_tile=q_tile, kv_tile=kv_tile, interpret=True)
  ref = 0.2 * jnp.einsum("bhid,bhjd->bhij", q_means, k_means, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)  # logits ~1: bf16x3 products are ~1e-5 relative


def test_block_mask_same_with_pallas_and_xla_pooling():
  q, k, _, _ = cases.random_qkv(19, 1, 260, 333, 2, 64)
  kw = dict(topk=0.1, topp=0.4, block_q=64, block_kv=32)
  np.testing.assert_array_equal(
    attention.block_mask(q, k, **kw, backend="xla"), attention.block_mask(q, k, **kw, interpret=True)
  )


# --------------------------------------------------------------------------------- input checking


def _qkv(batch=1, q_len=64, kv_len=64, heads=2, dim=32, dtype=jnp.float32):
  return cases.random_qkv(20, batch, q_len, kv_len, heads, dim, dtype)[:3]


@pytest.mark.parametrize(
  "call,match",
  [
    (lambda q, k, v: attention.sparse_attention(q[0], k, v), "q must be a 4-D"),
    (lambda q, k, v: attention.sparse_attention(q, k[..., None], v), "k must be a 4-D"),
    (lambda q, k, v: attention.sparse_attention(q, k, v[:, :, :1]), "heads"),
    (lambda q, k, v: attention.sparse_attention(q, k[..., :16], v[..., :16]), "head_dim"),
    (lambda q, k, v: attention.sparse_attention(jnp.concatenate([q, q]), k, v), "batch"),
    (lambda q, k, v: attention.sparse_attention(q, k, v[:, :32]), "same sequence length"),
    (lambda q, k, v: attention.sparse_attention(q.astype(jnp.int32), k, v), "q must have a floating dtype"),
    (lambda q, k, v: attention.sparse_attention(q, k, v.astype(jnp.bfloat16)), "share a dtype"),
    (lambda q, k, v: attention.sparse_attention(q, k, v, topk=1.5), "topk must be in"),
    (lambda q, k, v: attention.sparse_attention(q, k, v, topp=-0.1), "topp must be in"),
    (
      lambda q, k, v: attention.sparse_attention(q, k, v, topk=jnp.array([0.1, 0.2, 0.3])),
      "topk must be a float or an array of shape",
    ),
    (lambda q, k, v: attention.sparse_attention(q, k, v, block_q=48), "block_q must be a power of two"),
    (lambda q, k, v: attention.sparse_attention(q, k, v, block_kv=8), "block_kv must be a power of two"),
    (lambda q, k, v: attention.sparse_attention(q, k, v, mode="top"), "mode must be one of"),
    (lambda q, k, v: attention.sparse_attention(q, k, v, backend="cuda"), "backend must be one of"),
    (lambda q, k, v: attention.sparse_attention(q, k, v, backend="triton"), "backend='triton' needs a CUDA GPU"),
    (lambda q, k, v: attention.sparse_attention(q, k, v, scale=-1.0), "scale must be"),
    (
      lambda q, k, v: attention.sparse_attention(q, k, v, backend="mosaic", interpret=True),
      "backend='mosaic' needs bf16",
    ),
    (lambda q, k, v: attention.block_sparse_attention(q, k, v, jnp.ones((1, 2, 1, 2), bool)), "mask must have shape"),
    (
      lambda q, k, v: attention.block_sparse_attention(q, k, v, jnp.ones((1, 2, 1, 1), jnp.int32)),
      "mask must be a bool",
    ),
    (lambda q, k, v: attention.dense_attention(q, k, v[:, :3]), "same sequence length"),
  ],
)
def test_bad_input_raises_value_error(call, match):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=match):
    call(q, k, v)


def test_bad_input_raises_at_trace_time():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="block_q"):
    jax.jit(lambda q, k, v: attention.sparse_attention(q, k, v, block_q=100)).trace(q, k, v)
  with pytest.raises(ValueError, match="topk must be"):
    jax.jit(lambda q, k, v, t: attention.sparse_attention(q, k, v, topk=t)).trace(q, k, v, jnp.zeros(3))


# ----------------------------------------------- grouped heads, lengths, causal masking, lse cotangent

FEATURE_CASES = {
  # (batch, q_len, kv_len, heads, head_dim, block_q, block_kv), options
  "gqa": ((2, 70, 90, 4, 32, 32, 16), dict(kv_heads=2)),
  "mqa-causal-q-longer": ((1, 100, 70, 3, 32, 32, 16), dict(kv_heads=1, is_causal=True)),
  "lengths-causal": (
    (2, 77, 100, 2, 32, 32, 16),
    dict(q_lengths=jnp.array([77, 40], jnp.int32), kv_lengths=jnp.array([100, 37], jnp.int32), is_causal=True),
  ),
  "gqa-causal-kv-longer-lengths": (
    (1, 50, 130, 4, 32, 16, 32),
    dict(kv_heads=2, is_causal=True, kv_lengths=jnp.array([101], jnp.int32)),
  ),
}


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
@pytest.mark.parametrize("case", FEATURE_CASES)
def test_features_match_reference_with_lse(backend, interpret, case):
  shape, options = FEATURE_CASES[case]
  cases.check_backend(backend, interpret, shape, seed=30 + len(case), density=0.5, with_lse=True, **options)
