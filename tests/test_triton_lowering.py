"""The Pallas Triton kernels lower to Triton IR for an H200, on CPU (no GPU needed to catch lowering errors).

`jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))` under an abstract mesh whose device is an
H200 runs the whole Pallas-to-Triton lowering of every kernel in the call (the attention forward, dQ and
dK/dV, the mask's pooling and selection, the index tables) without compiling it for a device. Each case
also runs inside `jax.shard_map` at its default `check_vma=True`, with gradients through out and lse.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from sparge_jax import attention, backends

H200 = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
MESH = jax.sharding.AbstractMesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), abstract_device=H200)

CASES = {
  # (batch, q_len, kv_len, heads, kv_heads, head_dim, dtype), options
  "mha-bf16": ((2, 300, 300, 2, 2, 128, jnp.bfloat16), dict()),
  "gqa-causal-lengths-bf16": (
    (2, 300, 200, 4, 2, 64, jnp.bfloat16),
    dict(is_causal=True, query_seq_lengths=True, key_value_seq_lengths=True),
  ),
  "mqa-f32-head-dim-40": ((2, 130, 170, 3, 1, 40, jnp.float32), dict(key_value_seq_lengths=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_triton_kernels_lower_for_h200_under_shard_map(case, monkeypatch):
  (batch, q_len, kv_len, heads, kv_heads, head_dim, dtype), options = CASES[case]
  monkeypatch.setattr(backends, "compute_capability", lambda: "9.0")
  sharded = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=jax.NamedSharding(MESH, P("data")))
  q = sharded((batch, q_len, heads, head_dim))
  k = sharded((batch, kv_len, kv_heads, head_dim))
  lengths = sharded((batch,), jnp.int32)
  lengths_kw = {name: lengths for name in ("query_seq_lengths", "key_value_seq_lengths") if options.get(name)}

  def loss(q, k, v, lengths):
    def local(q, k, v, lengths):
      kw = {name: lengths for name in lengths_kw}
      out, lse = attention.dot_product_attention(
        q, k, v, is_causal=options.get("is_causal", False), implementation="triton", return_residual=True, **kw
      )
      return (jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.maximum(lse.astype(jnp.float32), 0.0)))[None]

    per_shard = jax.shard_map(local, mesh=MESH, in_specs=(P("data"),) * 4, out_specs=P("data"))
    return jnp.sum(per_shard(q, k, v, lengths))

  with jax.sharding.use_abstract_mesh(MESH):
    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k, lengths).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  kernels = ("block_sparse_forward", "block_sparse_dq", "block_sparse_dkv", "block_means", "pooled_block_logits")
  for kernel in (*kernels, "select_blocks", "index_table"):
    assert kernel in text, kernel  # the kernel's Triton module is embedded under its name
