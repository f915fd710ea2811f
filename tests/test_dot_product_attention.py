"""The drop-in API: `dot_product_attention` against `jax.nn.dot_product_attention`, `make_attention_fn` in
`nnx.MultiHeadAttention`, the backend table, transformations and bad input (CPU; Pallas in interpret mode)."""

import functools

import attention_cases as cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pallas_kernels.block_sparse_attention import xla as xla_backend
from sparge_jax import attention, backends

BACKENDS = [("xla", False), ("triton", True)]
backend_ids = ["xla", "triton-interpret"]
FULL = dict(topk=1.0, block_q=32, block_kv=16)  # every block kept: exactly jax.nn's attention

# (batch, q_len, kv_len, heads, kv_heads, head_dim), options; lengths are not block multiples.
JAX_NN_CASES = {
  "mha": ((2, 70, 70, 2, 2, 32), dict()),
  "gqa-t-ne-s": ((1, 50, 90, 4, 2, 32), dict()),
  "mqa-causal": ((1, 90, 60, 3, 1, 16), dict(is_causal=True)),
  "gqa-lengths": ((2, 77, 77, 4, 2, 16), dict(query_seq_lengths=[77, 30], key_value_seq_lengths=[50, 77])),
  "lengths-causal-t-ne-s": (
    (2, 60, 85, 2, 2, 16),
    dict(is_causal=True, query_seq_lengths=[41, 60], key_value_seq_lengths=[85, 23]),
  ),
}


def _inputs(shape, seed=0, dtype=jnp.float32):
  batch, q_len, kv_len, heads, kv_heads, head_dim = shape
  return cases.random_qkv(seed, batch, q_len, kv_len, heads, head_dim, dtype, kv_heads)


def _lengths(options):
  return {k: (jnp.asarray(v, jnp.int32) if k.endswith("lengths") else v) for k, v in options.items()}


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
@pytest.mark.parametrize("case", JAX_NN_CASES)
def test_full_keep_equals_jax_nn_out_and_lse(backend, interpret, case):
  shape, options = JAX_NN_CASES[case]
  q, k, v, _ = _inputs(shape, seed=len(case))
  options = _lengths(options)
  with jax.default_matmul_precision("highest"):
    ref, ref_lse = jax.nn.dot_product_attention(q, k, v, return_residual=True, **options)
  out, lse = attention.dot_product_attention(
    q, k, v, return_residual=True, implementation=backend, interpret=interpret, **FULL, **options
  )
  assert out.shape == ref.shape and out.dtype == ref.dtype
  assert lse.shape == ref_lse.shape == q.shape[:3] and lse.dtype == ref_lse.dtype
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=2e-6)  # padded rows: jax.nn's large negative too
  if "query_seq_lengths" in options:
    padded = np.arange(q.shape[1]) >= np.asarray(options["query_seq_lengths"])[:, None]
    assert padded.any()
    np.testing.assert_array_equal(np.asarray(lse)[padded], np.float32(attention.PADDED_ROW_LSE))


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
def test_unbatched_inputs(backend, interpret):
  q, k, v, _ = _inputs((1, 45, 70, 4, 2, 16), seed=3)
  q, k, v = q[0], k[0], v[0]
  with jax.default_matmul_precision("highest"):
    ref, ref_lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
  out, lse = attention.dot_product_attention(
    q, k, v, is_causal=True, return_residual=True, implementation=backend, interpret=interpret, **FULL
  )
  assert out.shape == q.shape and lse.shape == q.shape[:2]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=2e-6)


def _lse_reference(q, k, *, is_causal, query_seq_lengths, key_value_seq_lengths):
  """Differentiable float32 lse [B, T, N] with jax.nn's conventions (jax.nn stops its gradient)."""
  group = q.shape[2] // k.shape[2]
  scores = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, group, axis=2), precision="highest") * q.shape[-1] ** -0.5
  t, s = q.shape[1], k.shape[1]
  allowed = (jnp.arange(s) < key_value_seq_lengths[:, None, None, None]) & (
    jnp.arange(t)[:, None] < query_seq_lengths[:, None, None, None]
  )
  if is_causal:
    allowed = allowed & jnp.tril(jnp.ones((t, s), bool))
  return jnp.swapaxes(jax.nn.logsumexp(jnp.where(allowed, scores, attention.PADDED_ROW_LSE), axis=-1), 1, 2)


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
def test_gradients_through_out_and_lse(backend, interpret):
  q, k, v, d_out = _inputs((2, 70, 50, 4, 2, 16), seed=5)
  options = dict(is_causal=True, **_lengths(dict(query_seq_lengths=[70, 33], key_value_seq_lengths=[50, 29])))
  d_lse = jax.random.normal(jax.random.PRNGKey(6), q.shape[:3])

  def loss(attend):
    def f(q, k, v):
      out, lse = attend(q, k, v)
      return jnp.sum(out * d_out) + jnp.sum(jnp.where(lse > -1e30, lse, 0.0) * d_lse)

    return f

  def ours(q, k, v):
    return attention.dot_product_attention(
      q, k, v, return_residual=True, implementation=backend, interpret=interpret, **FULL, **options
    )

  def reference(q, k, v):
    with jax.default_matmul_precision("highest"):
      out = jax.nn.dot_product_attention(q, k, v, **options)
    return out, _lse_reference(q, k, **options)

  ours_grads = jax.grad(loss(ours), (0, 1, 2))(q, k, v)
  ref_grads = jax.grad(loss(reference), (0, 1, 2))(q, k, v)
  for name, g, ref in zip(("dq", "dk", "dv"), ours_grads, ref_grads):
    assert cases.rel_err(g, ref) < 1e-5, name
  # The lse term matters: without it the gradients differ.
  no_lse = jax.grad(lambda q: jnp.sum(ours(q, k, v)[0] * d_out))(q)
  assert cases.rel_err(no_lse, ref_grads[0]) > 1e-2


def test_loss_without_lse_passes_no_lse_cotangent(monkeypatch):
  seen = []
  original = xla_backend.backward

  def recording_backward(*args, **kwargs):
    seen.append(args[6])  # d_lse
    return original(*args, **kwargs)

  monkeypatch.setattr(xla_backend, "backward", recording_backward)
  q, k, v, _ = _inputs((1, 40, 40, 2, 1, 16), seed=7)
  attend = functools.partial(attention.dot_product_attention, implementation="xla", return_residual=True, **FULL)
  jax.grad(lambda q: jnp.sum(attend(q, k, v)[0]))(q)
  jax.grad(lambda q: jnp.sum(attend(q, k, v)[1]))(q)
  assert seen[0] is None and seen[1] is not None and seen[1].shape == (1, 2, 40)


@pytest.mark.parametrize("argument", ["bias", "mask", "local_window_size"])
def test_unsupported_arguments_raise_not_implemented(argument):
  q, k, v, _ = _inputs((1, 32, 32, 2, 2, 16))
  value = {"bias": jnp.zeros((1, 2, 32, 32)), "mask": jnp.ones((1, 2, 32, 32), bool), "local_window_size": 4}
  kwargs = {argument: value[argument]}
  with pytest.raises(NotImplementedError, match=argument):
    attention.dot_product_attention(q, k, v, **kwargs)


# -------------------------------------------------------------------------------------------- nnx


@pytest.mark.parametrize("kv_heads,is_causal", [(None, False), (2, True)])
def test_nnx_multi_head_attention_with_make_attention_fn_equals_default(kv_heads, is_causal):
  kw = dict(num_heads=4, in_features=32, qkv_features=64, num_kv_heads=kv_heads, decode=False)
  default = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  ours = nnx.MultiHeadAttention(
    **kw, attention_fn=attention.make_attention_fn(topk=1.0, block_q=16, block_kv=16), rngs=nnx.Rngs(0)
  )
  x = jax.random.normal(jax.random.PRNGKey(8), (2, 3, 50, 32))  # two batch axes, as nnx allows
  with jax.default_matmul_precision("highest"):
    expected = default(x, is_causal=is_causal)
  np.testing.assert_allclose(ours(x, is_causal=is_causal), expected, rtol=1e-5, atol=1e-5)


def test_make_attention_fn_refuses_what_it_cannot_honour():
  fn = attention.make_attention_fn(topk=0.5)
  q, k, v, _ = _inputs((1, 32, 32, 2, 2, 16))
  with pytest.raises(NotImplementedError, match="dropout_rate"):
    fn(q, k, v, dropout_rate=0.1, deterministic=False)
  fn(q, k, v, dropout_rate=0.1, deterministic=True)  # no dropout applied: fine
  with pytest.raises(NotImplementedError, match="mask"):
    fn(q, k, v, mask=jnp.ones((1, 1, 32, 32), bool))
  with pytest.raises(NotImplementedError, match="module"):
    fn(q, k, v, module=object())
  with pytest.raises(NotImplementedError, match="input_positions"):
    fn(q, k, v, input_positions=jnp.arange(32))
  with pytest.raises(ValueError, match="topk must be in"):
    attention.make_attention_fn(topk=2.0)


# ------------------------------------------------------------------------------- transformations


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=backend_ids)
def test_vmap_over_topk_and_checkpoint(backend, interpret):
  q, k, v, _ = _inputs((1, 64, 80, 4, 2, 16), seed=9)

  def f(topk, q=q):
    return attention.dot_product_attention(
      q, k, v, topk=topk, topp=0.0, mode="topk", block_q=16, block_kv=16, implementation=backend, interpret=interpret
    )

  fractions = [0.2, 0.5, 1.0]
  loop = jnp.stack([f(t) for t in fractions])
  np.testing.assert_allclose(jax.vmap(f)(jnp.array(fractions)), loop, rtol=1e-5, atol=1e-6)
  assert cases.rel_err(loop[0], loop[2]) > 1e-3  # the fractions really select different blocks

  plain = jax.grad(lambda q: jnp.sum(f(0.5, q) ** 2))(q)
  rematerialised = jax.grad(lambda q: jnp.sum(jax.checkpoint(lambda q: f(0.5, q))(q) ** 2))(q)
  np.testing.assert_allclose(rematerialised, plain, rtol=1e-6, atol=1e-7)


def test_traced_fractions_are_clamped_and_nan_keeps_everything():
  q, k, v, _ = _inputs((1, 64, 80, 2, 2, 16), seed=10)

  @jax.jit
  def f(topk):
    return attention.dot_product_attention(q, k, v, topk=topk, topp=0.0, mode="topk", block_q=16, block_kv=16)

  dense, sparsest = f(1.0), f(0.0)
  assert cases.rel_err(dense, sparsest) > 1e-2
  np.testing.assert_array_equal(f(jnp.nan), dense)  # config.FRACTION_FOR_NAN = 1: keep every block
  np.testing.assert_array_equal(f(7.0), dense)
  np.testing.assert_array_equal(f(-3.0), sparsest)


def test_shard_map_at_default_check_vma():
  # A one-device mesh still checks varying manual axes; the Triton kernels are checked the same way in
  # test_triton_lowering (the Pallas interpreter cannot run under check_vma).
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  q, k, v, _ = _inputs((2, 40, 50, 4, 2, 16), seed=11)
  lengths = jnp.array([50, 31], jnp.int32)

  def local(q, k, v, lengths):
    out, lse = attention.dot_product_attention(
      q, k, v, is_causal=True, key_value_seq_lengths=lengths, return_residual=True, implementation="xla", topk=0.5
    )
    return out, lse

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=(P("data"), P("data")))
  out, lse = jax.jit(sharded)(q, k, v, lengths)
  ref_out, ref_lse = local(q, k, v, lengths)
  np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, lengths)[0] ** 2) + jnp.sum(f(q, k, v, lengths)[1])
  grads = jax.jit(jax.grad(loss(sharded), (0, 1, 2)))(q, k, v)
  for g, ref in zip(grads, jax.grad(loss(local), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- the backend table


@pytest.mark.parametrize(
  "capability,dtype,head_dim,expected",
  [
    (None, jnp.bfloat16, 128, "xla"),  # CPU
    ("7.5", jnp.bfloat16, 128, "xla"),  # a T4: the Pallas kernels need 8.0
    ("8.6", jnp.bfloat16, 128, "triton"),
    ("9.0", jnp.bfloat16, 128, "mosaic"),
    ("9.0", jnp.float32, 128, "triton"),  # Mosaic takes 16-bit inputs only
    ("9.0", jnp.bfloat16, 40, "triton"),
    ("10.0", jnp.bfloat16, 128, "triton"),
  ],
)
def test_auto_resolution(monkeypatch, capability, dtype, head_dim, expected):
  monkeypatch.setattr(backends, "compute_capability", lambda: capability)
  q = jax.ShapeDtypeStruct((1, 1024, 4, head_dim), dtype)
  selection = backends.explain(q, q)
  assert selection.chosen == expected, str(selection)
  assert not selection.unmet[expected] and not selection.unmet["xla"]
  assert f"-> {expected}" in str(selection)


def test_interpret_auto_takes_triton_and_explicit_mosaic_runs_its_interpreter(monkeypatch):
  monkeypatch.setattr(backends, "compute_capability", lambda: None)
  q = jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.bfloat16)
  assert backends.explain(q, q, interpret=True).chosen == "triton"
  assert backends.explain(q, q, implementation="mosaic", interpret=True).chosen == "mosaic"
  assert backends.explain(q, q, implementation="mosaic").chosen is None


def test_explicit_implementation_lists_each_unmet_condition(monkeypatch):
  monkeypatch.setattr(backends, "compute_capability", lambda: "8.0")
  q, k, v, _ = _inputs((1, 64, 64, 2, 2, 32))
  with pytest.raises(ValueError) as error:
    attention.dot_product_attention(q, k, v, implementation="mosaic", block_kv=16)
  message = str(error.value)
  for condition in ("bf16/fp16 inputs (got float32)", "head_dim in (64, 128) (got 32)", "block_kv in (64,)", "9.x"):
    assert condition in message, message
  assert message.startswith("implementation='mosaic' needs ")


def test_mask_choice_has_no_mosaic_limits(monkeypatch):
  monkeypatch.setattr(backends, "compute_capability", lambda: "9.0")
  assert backends.mask_implementation("mosaic", jnp.float32, interpret=False) == "triton"
  assert backends.mask_implementation(None, jnp.float32, interpret=False) == "triton"
  assert backends.mask_implementation("xla", jnp.bfloat16, interpret=False) == "xla"
  monkeypatch.setattr(backends, "compute_capability", lambda: "7.5")
  assert backends.mask_implementation(None, jnp.bfloat16, interpret=False) == "xla"
  assert backends.mask_implementation(None, jnp.bfloat16, interpret=True) == "triton"
  with pytest.raises(ValueError, match="implementation='triton': the Triton mask kernels need"):
    backends.mask_implementation("triton", jnp.bfloat16, interpret=False)


def test_backend_alias_warns_and_matches_implementation():
  q, k, v, _ = _inputs((1, 40, 40, 2, 2, 16))
  with pytest.warns(DeprecationWarning, match="implementation="):
    old = attention.sparse_attention(q, k, v, topk=0.5, block_q=16, block_kv=16, backend="xla")
  new = attention.sparse_attention(q, k, v, topk=0.5, block_q=16, block_kv=16, implementation="xla")
  np.testing.assert_array_equal(old, new)
  with pytest.raises(ValueError, match="not both"):
    attention.sparse_attention(q, k, v, backend="xla", implementation="xla")


# -------------------------------------------------------------------------------------- bad input


def _bad(q_shape=(2, 32, 4, 16), k_shape=(2, 40, 2, 16), v_shape=None):
  q = jnp.ones(q_shape)
  k = jnp.ones(k_shape)
  v = jnp.ones(k_shape if v_shape is None else v_shape)
  return q, k, v


@pytest.mark.parametrize(
  "call,match",
  [
    (lambda: attention.dot_product_attention(*_bad(k_shape=(2, 40, 3, 16))), "heads of query must be a multiple"),
    (lambda: attention.dot_product_attention(*_bad(v_shape=(2, 40, 1, 16))), "same number of heads"),
    (lambda: attention.dot_product_attention(*_bad(v_shape=(2, 41, 2, 16))), "same sequence length"),
    (lambda: attention.dot_product_attention(*_bad(q_shape=(0, 32, 4, 16))), "query has an empty batch axis"),
    (lambda: attention.dot_product_attention(*_bad(q_shape=(2, 32, 0, 16))), "query has an empty heads axis"),
    (lambda: attention.dot_product_attention(*_bad(q_shape=(2, 0, 4, 16))), "query has an empty sequence axis"),
    (lambda: attention.dot_product_attention(jnp.ones((32, 4, 16)), *_bad()[1:]), "all be batched or all unbatched"),
    (lambda: attention.dot_product_attention(*_bad(), block_q=2**18, block_kv=2**18), "block_q must be a power"),
    (
      lambda: attention.dot_product_attention(*_bad(), query_seq_lengths=jnp.array([3, 4, 5], jnp.int32)),
      r"query_seq_lengths must have shape \[batch\] = \(2,\)",
    ),
    (
      lambda: attention.dot_product_attention(*_bad(), key_value_seq_lengths=jnp.array([3.0, 4.0])),
      "key_value_seq_lengths must have dtype int32",
    ),
    (
      lambda: attention.dot_product_attention(*_bad(), key_value_seq_lengths=jnp.array([3, -1], jnp.int32)),
      "key_value_seq_lengths must be ≥ 0",
    ),
    (lambda: attention.dot_product_attention(*_bad(), key_value_seq_lengths=[3.0, 4.0]), "must have dtype int32"),
    (lambda: attention.dot_product_attention(*_bad(), topk=float("nan")), "topk must be in"),
    (lambda: attention.dot_product_attention(*_bad(), implementation="cudnn"), "implementation must be one of"),
    (lambda: attention.block_mask(*_bad()[:2], topp=1.5), "topp must be in"),
  ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()
