"""CPU tests of the Wan DiT: forward, gradient, dense/sparse switching, input validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparge_jax.models.wan import AttentionConfig, WanConfig, WanModel, tiny, wan2_1_1_3b, wan2_1_14b


def _inputs(config: WanConfig, batch=2, grid=(3, 6, 8), text_len=5, seed=0):
  kx, kt, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, *grid, config.in_channels))
  t = jax.random.uniform(kt, (batch,), minval=0.0, maxval=1000.0)
  context = jax.random.normal(kc, (batch, text_len, config.text_dim))
  return x, t, context


# One compiled forward per (graph, shapes); eager calls would retrace the layer scan every time.
forward = nnx.jit(lambda model, x, t, context: model(x, t, context))


@pytest.fixture(scope="module")
def model():
  return WanModel(tiny(), rngs=nnx.Rngs(0))


def test_presets_are_the_published_architectures():
  small, big = wan2_1_1_3b(), wan2_1_14b()
  assert (small.dim, small.num_layers, small.num_attention_heads, small.ffn_dim) == (1536, 30, 12, 8960)
  assert (big.dim, big.num_layers, big.num_attention_heads, big.ffn_dim) == (5120, 40, 40, 13824)
  for config in (small, big):
    assert (config.patch_size, config.in_channels, config.text_dim, config.freq_dim) == ((1, 2, 2), 16, 4096, 256)
    assert config.rope_dims == (44, 42, 42)


@pytest.mark.parametrize("preset, diffusers_count", [(wan2_1_1_3b, 1_418_996_800), (wan2_1_14b, 14_288_491_584)])
def test_presets_have_diffusers_parameter_counts(preset, diffusers_count):
  # Counts of diffusers' WanTransformer3DModel built with the same architecture.
  abstract = nnx.eval_shape(lambda: WanModel(preset(), rngs=nnx.Rngs(0)))
  assert sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == diffusers_count


def test_forward_shape_and_every_input_matters(model):
  x, t, context = _inputs(model.config)
  out = forward(model, x, t, context)
  assert out.shape == x.shape[:-1] + (model.config.out_channels,) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  for changed in ((x + 0.1, t, context), (x, t + 50.0, context), (x, t, context * 1.5)):
    assert float(jnp.abs(forward(model, *changed) - out).max()) > 1e-4
  # Batch items are independent.
  np.testing.assert_allclose(forward(model, x[:1], t[:1], context[:1])[0], out[0], rtol=1e-5, atol=1e-5)


def test_every_parameter_gets_a_gradient():
  model = WanModel(dataclasses.replace(tiny(), remat=True), rngs=nnx.Rngs(1))
  x, t, context = _inputs(model.config, seed=1)
  target = jax.random.normal(jax.random.key(9), x.shape)

  def loss(model):
    return jnp.mean((model(x, t, context) - target) ** 2)

  grads = nnx.jit(nnx.grad(loss))(model)
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
    assert bool(jnp.all(jnp.isfinite(g))), path
    assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"

  # Remat changes memory, not numbers.
  plain = nnx.merge(*nnx.split(model))
  plain.config = dataclasses.replace(plain.config, remat=False)
  plain_grads = nnx.jit(nnx.grad(loss))(plain)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    nnx.state(grads, nnx.Param),
    nnx.state(plain_grads, nnx.Param),
  )

  # Saved intermediates: the same numbers, fewer recomputed matmuls.
  def matmuls(config):
    variant = nnx.merge(*nnx.split(model))
    variant.config = config
    jaxpr = jax.make_jaxpr(nnx.grad(loss))(variant)
    return str(jaxpr).count("dot_general"), nnx.jit(nnx.grad(loss))(variant)

  full_count, _ = matmuls(model.config)
  for saves, fewer in ((("qkv",), 3), (("ffn_hidden",), 1), (("qkv", "ffn_hidden"), 4)):
    count, saved_grads = matmuls(dataclasses.replace(model.config, remat_saves=saves))
    assert count == full_count - fewer, (saves, count, full_count)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      nnx.state(saved_grads, nnx.Param),
      nnx.state(plain_grads, nnx.Param),
    )
  with pytest.raises(ValueError, match="remat_saves"):
    dataclasses.replace(model.config, remat_saves=("ffn",))


def test_sparse_with_everything_kept_equals_dense_without_copying_weights(model):
  x, t, context = _inputs(model.config, batch=1, grid=(4, 8, 8))
  dense_out, dense_sparsity = model(x, t, context, return_sparsity=True)
  sparse_model = nnx.merge(*nnx.split(model))
  sparse_model.set_attention(AttentionConfig(kind="sparse", topk=1.0, topp=1.0, block_q=16, block_kv=16))
  assert sparse_model.blocks.self_attn.query.kernel[...] is model.blocks.self_attn.query.kernel[...]
  assert model.config.attention.kind == "dense"

  sparse_out, sparsity = sparse_model(x, t, context, return_sparsity=True)
  np.testing.assert_allclose(sparse_out, dense_out, rtol=1e-4, atol=1e-5)
  assert sparsity.shape == dense_sparsity.shape == (model.config.num_layers, 1, model.config.num_attention_heads)
  np.testing.assert_allclose(sparsity, 0.0, atol=1e-6)

  # Keeping one block in four: realized sparsity is reported and the output moves.
  sparse_model.set_attention(AttentionConfig(kind="sparse", topk=0.25, topp=0.0, mode="topk", block_q=16, block_kv=16))
  pruned_out, sparsity = sparse_model(x, t, context, return_sparsity=True)
  np.testing.assert_allclose(sparsity, 0.75, atol=1e-6)
  assert float(jnp.abs(pruned_out - dense_out).max()) > 1e-4


def test_bf16_compute():
  config = dataclasses.replace(tiny(), compute_dtype=jnp.bfloat16)
  model = WanModel(config, rngs=nnx.Rngs(0))
  x, t, context = _inputs(config)
  out = forward(model, x, t, context)
  assert out.dtype == jnp.bfloat16
  reference = forward(WanModel(tiny(), rngs=nnx.Rngs(0)), x, t, context)
  assert float(jnp.abs(out.astype(jnp.float32) - reference).max()) < 0.1 * float(jnp.abs(reference).max())


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda x, t, c: (x[0], t, c), "x must be"),
    (lambda x, t, c: (x[..., :3], t, c), "channels"),
    (lambda x, t, c: (x[:, :, :5], t, c), "patch_size"),
    (lambda x, t, c: (x, t[:1], c), "t must be"),
    (lambda x, t, c: (x, t[:, None], c), "t must be"),
    (lambda x, t, c: (x, t, c[..., :7]), "context must be"),
    (lambda x, t, c: (x, t, c[0]), "context must be"),
    (lambda x, t, c: (x, t, c[:1]), "context must be"),
  ],
)
def test_bad_inputs_raise(model, change, message):
  with pytest.raises(ValueError, match=message):
    model(*change(*_inputs(model.config)))


def test_bad_configs_raise(model):
  with pytest.raises(ValueError, match="kind"):
    AttentionConfig(kind="flash")
  with pytest.raises(ValueError, match="patch_size"):
    WanConfig(patch_size=(1, 2))
  with pytest.raises(ValueError, match="attention must be"):
    model.set_attention("sparse")
  config = dataclasses.replace(tiny(), rope_max_seq_len=2)
  with pytest.raises(ValueError, match="rope_max_seq_len"):
    WanModel(config, rngs=nnx.Rngs(0))(*_inputs(config))
