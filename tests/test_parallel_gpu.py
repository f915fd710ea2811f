"""`sparge_jax.parallel` with the compiled kernels on GPUs (skipped on CPU): Ulysses, ring and USP inside
`jax.shard_map` (default check_vma) against the unsharded attention, bf16, on one GPU and on all of them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import rel_err
from jax.sharding import PartitionSpec as P
from test_parallel_devices import inputs, mesh_of, sharded_results, unsharded_results

from sparge_jax import parallel

pytestmark = pytest.mark.gpu
MASK = dict(topk=0.1, topp=0.3, mode="hybrid", block_q=128, block_kv=64)


def schemes(devices):
  """(name, scheme, mesh, spec) for each scheme over `devices` devices (USP: 2 x devices/2 where it splits)."""
  usp_shape = (2, devices // 2) if devices % 2 == 0 and devices > 1 else (devices, 1)
  return [
    (
      "ulysses",
      functools.partial(parallel.ulysses_attention, axis_name="s"),
      mesh_of((devices,), ("s",)),
      P(None, "s"),
    ),
    ("ring", functools.partial(parallel.ring_attention, axis_name="s"), mesh_of((devices,), ("s",)), P(None, "s")),
    (
      "usp",
      functools.partial(parallel.usp_attention, ulysses_axis="u", ring_axis="r"),
      mesh_of(usp_shape, ("u", "r")),
      P(None, ("u", "r")),
    ),
  ]


def check(devices, implementation, *, causal, lengths):
  seq = 1024 * devices
  q, k, v, d_out, d_lse = (x.astype(jnp.bfloat16) for x in inputs(0, 2, seq, seq, 8, 4, dim=128))
  lengths = None if not lengths else jnp.asarray([seq, seq - 300], jnp.int32)
  kwargs = dict(
    MASK, is_causal=causal, implementation=implementation, query_seq_lengths=lengths, key_value_seq_lengths=lengths
  )
  out_ref, lse_ref, kept_ref, grads_ref = unsharded_results(q, k, v, d_out, d_lse, **kwargs)
  for name, scheme, mesh, spec in schemes(devices):
    out, lse, kept, grads = sharded_results(scheme, mesh, spec, q, k, v, d_out, d_lse, **kwargs)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(kept_ref), err_msg=name)
    assert rel_err(out, out_ref) < 1e-2, (name, rel_err(out, out_ref))
    assert rel_err(lse, lse_ref) < 1e-2, (name, rel_err(lse, lse_ref))
    for what, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
      assert rel_err(g, g_ref) < 2e-2, (name, what, rel_err(g, g_ref))


@pytest.mark.parametrize("implementation", [None, "triton"])
def test_one_gpu_schemes_equal_unsharded(implementation):
  check(1, implementation, causal=True, lengths=True)


@pytest.mark.parametrize("causal", [False, True])
def test_all_gpus_schemes_equal_unsharded(causal):
  if jax.device_count() < 2:
    pytest.skip("needs several GPUs")
  check(jax.device_count(), None, causal=causal, lengths=causal)
