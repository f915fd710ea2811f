"""The compiled Pallas kernels on a GPU against the float32 reference (skipped on CPU)."""

import attention_cases as cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_mask import triton_index_table as index_table
from pallas_kernels.block_mask import triton_pool as mask_pool
from sparge_jax import attention, backends
from sparge_jax import mask as mask_lib

pytestmark = pytest.mark.gpu


LONG = (1, 4100, 4100, 4, 128, 128, 64)
LONG8 = (1, 4104, 3000, 4, 128, 128, 64)  # the mosaic kernels need lengths in whole 8-row tiles


@pytest.mark.parametrize("shape", cases.SHAPES + [LONG])
def test_triton_bfloat16_matches_reference(shape):
  cases.check_backend("triton", False, shape, seed=11, dtype=jnp.bfloat16, tol=1.5e-2)


@pytest.mark.parametrize("shape", [cases.SHAPES[1], LONG])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.float16, 5e-3)])
def test_triton_other_dtypes_match_reference(shape, dtype, tol):
  cases.check_backend("triton", False, shape, seed=12, dtype=dtype, tol=tol)


@pytest.mark.parametrize("shape", [cases.SHAPES[0], (1, 136, 48, 2, 64, 64, 64), LONG8])
def test_mosaic_bfloat16_matches_reference(shape):
  cases.check_backend("mosaic", False, shape, seed=14, dtype=jnp.bfloat16, tol=1.5e-2)


def test_mosaic_float16_matches_reference():
  cases.check_backend("mosaic", False, LONG8, seed=15, dtype=jnp.float16, tol=5e-3)


def test_auto_takes_mosaic_for_lengths_that_are_not_multiples_of_8():
  # The Mosaic wrappers pad such lengths to whole 8-row tiles, so auto no longer falls back to Triton.
  q, k, v, _ = cases.random_qkv(16, 1, 1001, 1003, 2, 128, jnp.bfloat16)
  assert backends.explain(q, k).chosen == "mosaic"
  out = attention.sparse_attention(q, k, v, topk=0.2)
  ref = attention.sparse_attention(q, k, v, topk=0.2, implementation="triton")
  assert cases.rel_err(out, ref) < 2e-2


def test_triton_full_mask_is_dense():
  cases.check_backend("triton", False, cases.SHAPES[0], seed=13, full_mask=True, tol=1e-4)


def test_mask_pooling_kernel_matches_reference():
  q, k, _, _ = cases.random_qkv(13, 2, 4100, 3000, 3, 128, jnp.bfloat16)
  ours = mask_pool.pooled_block_probs(q, k, block_q=128, block_kv=64, scale=128**-0.5)
  ref = mask_lib.pooled_block_probs_reference(q, k, block_q=128, block_kv=64, scale=128**-0.5)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
  "shape,density", [((1, 12, 256, 512), 0.05), ((2, 3, 591, 1182), 0.3), ((1, 2, 9, 37), 1.0), ((1, 2, 9, 37), 0.0)]
)
def test_index_table_kernel_matches_xla(shape, density):
  mask = jax.random.bernoulli(jax.random.PRNGKey(3), density, shape)
  for ours, ref in zip(jax.tree.leaves(index_table.index_tables(mask)), jax.tree.leaves(mask_lib.index_tables(mask))):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_mask_kernels_match_xla_selection():
  q, k, _, _ = cases.random_qkv(17, 1, 32760, 32760, 4, 128, jnp.bfloat16)
  ours = np.asarray(attention.block_mask(q, k))
  ref = np.asarray(attention.block_mask(q, k, implementation="xla"))
  # Probabilities differ in the last bits (exp, summation order), which can move a Top-p boundary by a block.
  assert np.mean(ours != ref) < 1e-3
  assert np.abs(ours.sum(-1).astype(int) - ref.sum(-1)).max() <= 1


def test_auto_backend_on_gpu_matches_xla():
  q, k, v, _ = cases.random_qkv(14, 1, 2000, 2000, 2, 64, jnp.float32)
  fast = attention.sparse_attention(q, k, v, topk=0.1, topp=0.3)
  slow = attention.sparse_attention(q, k, v, topk=0.1, topp=0.3, implementation="xla")
  assert cases.rel_err(fast, slow) < 1e-4


def test_nan_in_gives_nan_out():
  q, k, v, _ = cases.random_qkv(15, 1, 500, 500, 2, 64, jnp.bfloat16)
  out = attention.sparse_attention(q, k.at[0, 100, 1, 3].set(jnp.nan), v)
  assert np.isnan(np.asarray(out[:, :, 1], np.float32)).any()
  assert np.all(np.isfinite(np.asarray(out[:, :, 0], np.float32)))


# ------------------------------------------- grouped heads, lengths, causal masking and lse, compiled

GPU_FEATURES = {
  "gqa": ((1, 4100, 4100, 8, 128, 128, 64), dict(kv_heads=2)),
  "mqa-causal": ((1, 3000, 4104, 4, 128, 128, 64), dict(kv_heads=1, is_causal=True)),
  "lengths": (
    (2, 2056, 2056, 4, 64, 128, 64),
    dict(q_lengths=jnp.array([2056, 1001], jnp.int32), kv_lengths=jnp.array([1500, 2056], jnp.int32)),
  ),
  "gqa-causal-lengths": (
    (2, 4104, 4104, 4, 128, 64, 64),
    dict(kv_heads=2, is_causal=True, kv_lengths=jnp.array([4104, 3333], jnp.int32)),
  ),
}


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("case", GPU_FEATURES)
def test_features_match_reference(backend, case):
  shape, options = GPU_FEATURES[case]
  cases.check_backend(backend, False, shape, seed=40, dtype=jnp.bfloat16, tol=1.5e-2, with_lse=True, **options)


def test_triton_float32_features_match_reference():
  shape, options = GPU_FEATURES["gqa-causal-lengths"]
  cases.check_backend("triton", False, shape, seed=41, dtype=jnp.float32, tol=1e-4, with_lse=True, **options)


@pytest.mark.parametrize("implementation", [None, "triton", "mosaic"])
def test_dot_product_attention_full_keep_matches_cudnn(implementation):
  q, k, v, _ = cases.random_qkv(42, 2, 2048, 2048, 8, 128, jnp.bfloat16, kv_heads=2)
  lengths = dict(
    query_seq_lengths=jnp.array([2048, 1500], jnp.int32), key_value_seq_lengths=jnp.array([1800, 2048], jnp.int32)
  )
  ref, ref_lse = jax.nn.dot_product_attention(
    q, k, v, is_causal=True, implementation="cudnn", return_residual=True, **lengths
  )
  out, lse = attention.dot_product_attention(
    q, k, v, is_causal=True, topk=1.0, implementation=implementation, return_residual=True, **lengths
  )
  assert cases.rel_err(out, ref) < 1e-2
  valid = np.arange(2048) < np.array([2048, 1500])[:, None]
  assert cases.rel_err(np.asarray(lse, np.float32)[valid], np.asarray(ref_lse, np.float32)[valid]) < 1e-2


@pytest.mark.parametrize("implementation", ["triton", "mosaic"])
def test_shard_map_at_default_check_vma_on_gpu(implementation):
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  q, k, v, _ = cases.random_qkv(43, 2, 1024, 1024, 4, 128, jnp.bfloat16, kv_heads=2)

  def local(q, k, v):
    return attention.dot_product_attention(q, k, v, is_causal=True, topk=0.2, implementation=implementation)

  spec = jax.sharding.PartitionSpec("data")
  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
  assert cases.rel_err(sharded(q, k, v), local(q, k, v)) < 1e-6
  grad = jax.jit(
    jax.grad(
      lambda q: jnp.sum(
        jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v).astype(jnp.float32)
      )
    )
  )
  assert np.all(np.isfinite(np.asarray(grad(q), np.float32)))


def test_mask_kernels_with_lengths_and_causal_match_xla():
  q, k, _, _ = cases.random_qkv(44, 2, 8190, 8190, 8, 128, jnp.bfloat16, kv_heads=2)
  kw = dict(
    is_causal=True,
    query_seq_lengths=jnp.array([8190, 5000], jnp.int32),
    key_value_seq_lengths=jnp.array([7000, 8190], jnp.int32),
  )
  ours = np.asarray(attention.block_mask(q, k, **kw))
  ref = np.asarray(attention.block_mask(q, k, implementation="xla", **kw))
  assert np.mean(ours != ref) < 1e-3
  assert np.abs(ours.sum(-1).astype(int) - ref.sum(-1)).max() <= 1


def test_auto_on_hopper_takes_mosaic_where_it_applies():
  if not backends.on_hopper():
    pytest.skip("not a Hopper GPU")
  q = jax.ShapeDtypeStruct((1, 4096, 8, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.bfloat16)
  selection = backends.explain(q, k, is_causal=True, return_residual=True)
  assert selection.chosen == "mosaic", str(selection)  # once the Mosaic kernels take GQA, causal and d_lse
