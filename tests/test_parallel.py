"""`sparge_jax.parallel`: load balance, argument checks and one-device meshes here; the multi-device checks
(test_parallel_devices.py, test_parallel_model.py) run in subprocesses with 8 host devices."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import random_qkv
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from sparge_jax import attention, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK = dict(topk=0.3, topp=0.4, block_q=16, block_kv=16, implementation="xla")


def run_on_eight_devices(module):
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": ROOT,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true",
  }
  command = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", f"tests/{module}"]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
  assert " skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


def test_attention_on_eight_devices():
  run_on_eight_devices("test_parallel_devices.py")


def test_model_and_trainer_on_eight_devices():
  run_on_eight_devices("test_parallel_model.py")


# ------------------------------------------------------------------------------------- load balance


def skewed_mask():
  """The block mask of 8 heads whose Top-k fractions fall from 0.9 to 0.05: heads 0-3 keep most blocks."""
  q, k, _, _ = random_qkv(0, 1, 128, 128, 8, 16)
  topk = jnp.asarray([0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.05, 0.05])
  return np.asarray(attention.block_mask(q, k, topk=topk, topp=0.0, mode="topk", block_q=16, block_kv=16))


def test_balanced_head_order_lowers_the_max_over_mean():
  mask = skewed_mask()
  before = parallel.load_balance(mask, ulysses=4)
  kept_per_head = mask.sum(axis=(0, 2, 3))
  order = parallel.balanced_head_order(kept_per_head, 4)
  after = parallel.load_balance(mask, ulysses=4, head_order=order)
  assert before.kept.shape == (4, 1) and before.kept.sum() == after.kept.sum() == mask.sum()
  assert before.max_over_mean > 1.5, before
  # Kept blocks per head 64, 56, 48, 40, 16, 8, 8, 8: two heads a device can do no better than 72 / 62.
  assert after.max_over_mean < 1.2 < 1.5 < before.max_over_mean, (before, after)
  assert sorted(order) == list(range(8))
  # Per-head counts give the same Ulysses report; GQA moves whole groups.
  from_counts = parallel.load_balance(kept_per_head, ulysses=4, head_order=order)
  np.testing.assert_array_equal(from_counts.kept, after.kept)
  grouped = parallel.balanced_head_order(kept_per_head, 2, group=2)
  assert all(grouped[i + 1] == grouped[i] + 1 and grouped[i] % 2 == 0 for i in range(0, 8, 2))
  assert parallel.load_balance(mask, ulysses=2, head_order=grouped).max_over_mean < 1.1


def test_load_balance_of_ring_rows():
  q, k, _, _ = random_qkv(1, 1, 128, 128, 2, 16)
  mask = np.asarray(attention.block_mask(q, k, is_causal=True, **MASK))
  ring = parallel.load_balance(mask, ring=4)
  rows = mask.sum(axis=(0, 1, 3))  # per q block
  np.testing.assert_array_equal(ring.kept[0], rows.reshape(4, 2).sum(axis=1))
  assert ring.kept[0, -1] > ring.kept[0, 0] and ring.max_over_mean > 1.2  # causal: later rows keep more
  usp = parallel.load_balance(mask, ulysses=2, ring=2)
  np.testing.assert_array_equal(usp.kept, mask.sum(axis=(0, 3)).reshape(2, 1, 2, 2, 2).sum(axis=(1, 2, 4)))


def test_load_balance_and_head_order_arguments():
  mask = skewed_mask()
  with pytest.raises(ValueError, match="do not split into ulysses"):
    parallel.load_balance(mask, ring=3)
  with pytest.raises(ValueError, match="head_order must be a permutation"):
    parallel.load_balance(mask, ulysses=2, head_order=(0, 0, 1, 2, 3, 4, 5, 6))
  with pytest.raises(ValueError, match="do not divide over 3 devices"):
    parallel.balanced_head_order(np.ones(8), 3)
  with pytest.raises(ValueError, match="group must be"):
    parallel.balanced_head_order(np.ones(8), 2, group=3)


# ----------------------------------------------------------------------------------- one device


def one_device_mesh(names):
  return jax.make_mesh((1,) * len(names), names, axis_types=(AxisType.Auto,) * len(names), devices=jax.devices()[:1])


@pytest.mark.parametrize("scheme", ["ulysses", "ring", "usp"])
def test_one_device_axes_equal_plain_sparse_attention(scheme):
  q, k, v, d_out = random_qkv(2, 2, 100, 100, 4, 16, kv_heads=2)
  lengths = jnp.asarray([100, 61], jnp.int32)
  kwargs = dict(MASK, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  names = ("u", "r") if scheme == "usp" else ("s",)
  if scheme == "usp":
    local = functools.partial(parallel.usp_attention, ulysses_axis="u", ring_axis="r", **kwargs)
  else:
    local = functools.partial(getattr(parallel, f"{scheme}_attention"), axis_name="s", **kwargs)
  spec = P(None, names if scheme == "usp" else "s")
  mesh = one_device_mesh(names)
  attend = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
  run = jax.jit(lambda f, *a: (lambda out, vjp: (out, vjp(a[-1])))(*jax.vjp(f, *a[:-1])), static_argnums=0)
  with jax.set_mesh(mesh):
    out, grads = run(attend, q, k, v, d_out)
  out_ref, grads_ref = run(lambda q, k, v: attention.sparse_attention(q, k, v, **kwargs), q, k, v, d_out)
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), atol=1e-6)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5)


def test_arguments_are_checked_before_any_work():
  q, k, v, _ = random_qkv(3, 1, 64, 64, 4, 16)
  mesh = one_device_mesh(("s",))

  def call(function, **kwargs):
    attend = jax.shard_map(
      lambda q, k, v: function(q, k, v, **kwargs), mesh=mesh, in_specs=(P(None, "s"),) * 3, out_specs=P(None, "s")
    )
    with jax.set_mesh(mesh):
      return jax.eval_shape(attend, q, k, v)

  with pytest.raises(ValueError, match="axis_name='seq' is not a mesh axis"):
    call(parallel.ring_attention, axis_name="seq")
  with pytest.raises(ValueError, match="ring_axis='r' is not a mesh axis"):
    call(parallel.usp_attention, ulysses_axis="s", ring_axis="r")
  with pytest.raises(ValueError, match="ulysses_axis and ring_axis must differ"):
    call(parallel.usp_attention, ulysses_axis="s", ring_axis="s")
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    call(parallel.ulysses_attention, axis_name="s", block_q=48)
  with pytest.raises(ValueError, match="topk must be a float or an array of shape"):
    call(parallel.ring_attention, axis_name="s", topk=jnp.ones(3))
  with pytest.raises(ValueError, match="key_value_seq_lengths must have dtype int32"):
    call(parallel.ring_attention, axis_name="s", key_value_seq_lengths=jnp.ones(1, jnp.float32))
  with pytest.raises(NotImplementedError, match="bias: block-sparse attention takes no bias"):
    call(parallel.ulysses_attention, axis_name="s", bias=jnp.zeros(1))
  with pytest.raises(TypeError, match=r"unexpected keyword arguments \['top_k'\]"):
    call(parallel.ring_attention, axis_name="s", top_k=0.1)
  with pytest.raises(ValueError, match="head_order must move whole groups"):
    parallel.ulysses.check_head_order((1, 0, 2, 3), 4, 2)
  with pytest.raises(ValueError, match="head_order must be a permutation"):
    parallel.ulysses.check_head_order((0, 1, 2), 4, 4)
  # Unbatched [seq, heads, head_dim], as dot_product_attention takes them: results without the batch axis.
  unbatched = jax.shard_map(
    lambda q, k, v: parallel.ulysses_attention(q, k, v, axis_name="s", return_residual=True, return_stats=True),
    mesh=mesh,
    in_specs=(P("s"),) * 3,
    out_specs=(P("s"), P("s"), P()),
  )
  with jax.set_mesh(mesh):
    out, lse, stats = jax.eval_shape(unbatched, q[0], k[0], v[0])
  assert out.shape == q.shape[1:] and lse.shape == q.shape[1:3] and stats["kept_blocks"].shape == (4,)
  k_long, v_long = jnp.concatenate([k, k], axis=1), jnp.concatenate([v, v], axis=1)
  attend = jax.shard_map(
    lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="s", is_causal=True),
    mesh=mesh,
    in_specs=(P(None, "s"),) * 3,
    out_specs=P(None, "s"),
  )
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="is_causal=True needs query and key shards of one length"):
    jax.eval_shape(attend, q, k_long, v_long)
