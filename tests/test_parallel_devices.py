"""`sparge_jax.parallel` on 8 host devices: Ulysses, ring and USP against the unsharded attention.

Needs `--xla_force_host_platform_device_count=8` before JAX starts: `test_parallel.py` runs this module in
a subprocess with it (in a process with fewer devices every test here is skipped). Each check shards q, k,
v along the sequence, runs the scheme inside `jax.shard_map` (default check_vma) and compares the output,
the lse, the kept blocks per head and the gradients (with an lse cotangent too) with
`dot_product_attention` and `block_mask` on the whole arrays.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import random_qkv
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels.block_sparse_attention.reference import masked_attention_reference
from sparge_jax import attention, parallel

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: run through test_parallel.py")

MASK = dict(topk=0.3, topp=0.4, mode="hybrid", block_q=16, block_kv=16)


def mesh_of(shape, names):
  devices = jax.devices()[: math.prod(shape)]
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def inputs(seed, batch, q_len, kv_len, heads, kv_heads, dim=16):
  q, k, v, d_out = random_qkv(seed, batch, q_len, kv_len, heads, dim, kv_heads=kv_heads)
  d_lse = jax.random.normal(jax.random.PRNGKey(seed + 7), (batch, q_len, heads))
  return q, k, v, d_out, d_lse


def sharded_results(scheme, mesh, spec, q, k, v, d_out, d_lse, check_vma=True, **kwargs):
  """(out, lse, kept [B, N], (dq, dk, dv)) of `scheme` inside shard_map on `mesh`, q/k/v sharded by `spec`."""

  def local(q, k, v):
    out, lse, stats = scheme(q, k, v, return_residual=True, return_stats=True, **kwargs)
    return (out, lse), stats["kept_blocks"]

  attend = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=((spec, spec), P()), check_vma=check_vma)

  @jax.jit
  def run(q, k, v, d_out, d_lse):
    (out, lse), vjp, kept = jax.vjp(attend, q, k, v, has_aux=True)
    return out, lse, kept, vjp((d_out, d_lse))

  with jax.set_mesh(mesh):
    return run(q, k, v, d_out, d_lse)


def unsharded_results(q, k, v, d_out, d_lse, **kwargs):
  @jax.jit
  def run(q, k, v, d_out, d_lse):
    attend = lambda q, k, v: attention.dot_product_attention(q, k, v, return_residual=True, **kwargs)
    (out, lse), vjp = jax.vjp(attend, q, k, v)
    mask = attention.block_mask(q, k, **kwargs)
    return out, lse, mask.sum(axis=(-2, -1)), vjp((d_out, d_lse))

  return run(q, k, v, d_out, d_lse)


def assert_same(got, expected, *, atol=2e-5):
  out, lse, kept, grads = got
  out_ref, lse_ref, kept_ref, grads_ref = expected
  np.testing.assert_array_equal(np.asarray(kept), np.asarray(kept_ref))  # the same mask, head by head
  assert 0 < int(np.sum(kept)) < np.size(kept) * 64  # sparse, not empty
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_ref), atol=atol, rtol=atol)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), atol=atol, rtol=atol)
  for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=10 * atol, rtol=10 * atol, err_msg=name)


def lengths_of(values):
  return jnp.asarray(values, jnp.int32)


# (name, mesh shape, heads, kv_heads, q_len, kv_len, is_causal, q lengths, kv lengths)
ULYSSES = [
  ("heads split with kv heads", (4,), 8, 8, 128, 128, False, None, None),
  ("padded heads, GQA, causal, lengths", (4,), 6, 3, 120, 120, True, (101, 77), (90, 120)),
  ("GQA with fewer kv heads than devices", (4,), 8, 2, 96, 160, False, None, (150, 33)),
]


@pytest.mark.parametrize("case", ULYSSES, ids=[c[0] for c in ULYSSES])
def test_ulysses_equals_unsharded(case):
  _, shape, heads, kv_heads, q_len, kv_len, causal, q_lengths, kv_lengths = case
  q, k, v, d_out, d_lse = inputs(1, 2, q_len, kv_len, heads, kv_heads)
  lengths = dict(
    query_seq_lengths=None if q_lengths is None else lengths_of(q_lengths),
    key_value_seq_lengths=None if kv_lengths is None else lengths_of(kv_lengths),
  )
  kwargs = dict(MASK, is_causal=causal, implementation="xla", **lengths)
  mesh = mesh_of(shape, ("sequence",))
  got = sharded_results(
    functools.partial(parallel.ulysses_attention, axis_name="sequence"),
    mesh,
    P(None, "sequence"),
    q,
    k,
    v,
    d_out,
    d_lse,
    **kwargs,
  )
  assert_same(got, unsharded_results(q, k, v, d_out, d_lse, **kwargs))


def test_ulysses_head_order_changes_nothing_but_placement():
  q, k, v, d_out, d_lse = inputs(2, 1, 64, 64, 8, 4)
  topk = jnp.asarray([0.9, 0.9, 0.8, 0.8, 0.1, 0.1, 0.05, 0.05])
  kwargs = dict(MASK, topk=topk, topp=0.0, mode="topk", implementation="xla")
  expected = unsharded_results(q, k, v, d_out, d_lse, **kwargs)
  kept_per_head = np.asarray(expected[2]).sum(axis=0)
  order = parallel.balanced_head_order(kept_per_head, 2, group=2)
  assert order != tuple(range(8))
  scheme = functools.partial(parallel.ulysses_attention, axis_name="sequence", head_order=order)
  got = sharded_results(scheme, mesh_of((2,), ("sequence",)), P(None, "sequence"), q, k, v, d_out, d_lse, **kwargs)
  assert_same(got, expected)


# (name, ring size, heads, kv_heads, q_len, kv_len, is_causal, q lengths, kv lengths)
RING = [
  ("GQA, causal, lengths", 4, 4, 2, 128, 128, True, (100, 57), (128, 70)),
  ("8 devices, q shorter than kv, lengths", 8, 2, 1, 128, 256, False, (128, 90), (200, 256)),
  ("causal with empty steps", 8, 2, 2, 128, 128, True, None, (128, 40)),
]


@pytest.mark.parametrize("case", RING, ids=[c[0] for c in RING])
def test_ring_equals_unsharded(case):
  _, size, heads, kv_heads, q_len, kv_len, causal, q_lengths, kv_lengths = case
  q, k, v, d_out, d_lse = inputs(3, 2, q_len, kv_len, heads, kv_heads)
  lengths = dict(
    query_seq_lengths=None if q_lengths is None else lengths_of(q_lengths),
    key_value_seq_lengths=None if kv_lengths is None else lengths_of(kv_lengths),
  )
  kwargs = dict(MASK, is_causal=causal, implementation="xla", **lengths)
  mesh, spec = mesh_of((size,), ("ring",)), P(None, "ring")
  got = sharded_results(
    functools.partial(parallel.ring_attention, axis_name="ring"), mesh, spec, q, k, v, d_out, d_lse, **kwargs
  )
  assert_same(got, unsharded_results(q, k, v, d_out, d_lse, **kwargs))
  # The mask itself: each device's rows are the unsharded mask's.
  rows = jax.shard_map(
    lambda q, k: parallel.ring_block_mask(q, k, axis_name="ring", **kwargs),
    mesh=mesh,
    in_specs=(spec, spec),
    out_specs=P(None, None, "ring"),
  )
  with jax.set_mesh(mesh):
    np.testing.assert_array_equal(np.asarray(jax.jit(rows)(q, k)), np.asarray(attention.block_mask(q, k, **kwargs)))


def test_ring_with_shards_off_the_blocks_is_exact_on_its_blocking():
  """30-token shards of 16-token blocks: each shard's last block is partial; the attention is exactly that of
  the mask `ring_block_mask` reports, at token level."""
  size, q_len, heads = 4, 120, 2
  q, k, v, d_out, d_lse = inputs(4, 1, q_len, q_len, heads, heads)
  kwargs = dict(MASK, implementation="xla", key_value_seq_lengths=lengths_of([111]))
  mesh, spec = mesh_of((size,), ("ring",)), P(None, "ring")
  rows = jax.shard_map(
    lambda q, k: parallel.ring_block_mask(q, k, axis_name="ring", **kwargs),
    mesh=mesh,
    in_specs=(spec, spec),
    out_specs=P(None, None, "ring"),
  )
  with jax.set_mesh(mesh):
    mask = np.asarray(jax.jit(rows)(q, k))  # [1, heads, 4 · 2, 4 · 2]
  assert mask.shape == (1, heads, 8, 8) and 0 < mask.sum() < mask.size
  shard = q_len // size
  block_of = np.array([(t // shard) * 2 + (t % shard) // 16 for t in range(q_len)])
  tokens = jnp.asarray(mask[:, :, block_of][:, :, :, block_of])  # token-level, blocks of size 1

  def reference(q, k, v):
    out, lse = masked_attention_reference(
      q, k, v, tokens, block_q=1, block_kv=1, kv_seq_lengths=kwargs["key_value_seq_lengths"], return_lse=True
    )
    return out, jnp.swapaxes(lse, 1, 2)

  (out_ref, lse_ref), vjp = jax.vjp(reference, q, k, v)
  grads_ref = vjp((d_out, d_lse))
  out, lse, kept, grads = sharded_results(
    functools.partial(parallel.ring_attention, axis_name="ring"), mesh, spec, q, k, v, d_out, d_lse, **kwargs
  )
  np.testing.assert_array_equal(np.asarray(kept), mask.sum(axis=(-2, -1)))
  assert_same((out, lse, kept, grads), (out_ref, lse_ref, kept, grads_ref))


# (name, (ulysses, ring), heads, kv_heads, seq, is_causal, lengths)
USP = [
  ("2 x 4, GQA, causal, lengths", (2, 4), 4, 2, 256, True, (250, 131)),
  ("4 x 2, padded heads", (4, 2), 6, 6, 128, False, (128, 75)),
]


@pytest.mark.parametrize("case", USP, ids=[c[0] for c in USP])
def test_usp_equals_unsharded(case):
  _, shape, heads, kv_heads, seq, causal, lengths = case
  q, k, v, d_out, d_lse = inputs(5, 2, seq, seq, heads, kv_heads)
  lengths = None if lengths is None else lengths_of(lengths)
  kwargs = dict(MASK, is_causal=causal, implementation="xla", query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  scheme = functools.partial(parallel.usp_attention, ulysses_axis="ulysses", ring_axis="ring")
  mesh = mesh_of(shape, ("ulysses", "ring"))
  got = sharded_results(scheme, mesh, P(None, ("ulysses", "ring")), q, k, v, d_out, d_lse, **kwargs)
  assert_same(got, unsharded_results(q, k, v, d_out, d_lse, **kwargs))


# The Pallas Triton kernels in interpret mode (mask kernels too), block-multiple shards, under check_vma=False:
# jax's Pallas interpreter pads a block larger than its array (the mask kernels' 128-row tiles over a few
# blocks) with a value that varies over no axis, which check_vma rejects; compiled kernels never pad.
TRITON = [
  ("ulysses", (4,), ("s",), False),
  ("ring", (4,), ("s",), True),
  ("usp", (2, 2), ("u", "r"), True),
]


@pytest.mark.parametrize("case", TRITON, ids=[c[0] for c in TRITON])
def test_triton_interpret_equals_unsharded(case):
  name, shape, axes, causal = case
  q, k, v, d_out, d_lse = inputs(6, 1, 64, 64, 4, 2)
  lengths = lengths_of([50]) if causal else None
  kwargs = dict(
    MASK,
    is_causal=causal,
    implementation="triton",
    interpret=True,
    query_seq_lengths=lengths,
    key_value_seq_lengths=lengths,
  )
  if name == "usp":
    scheme = functools.partial(parallel.usp_attention, ulysses_axis=axes[0], ring_axis=axes[1])
  else:
    scheme = functools.partial(getattr(parallel, f"{name}_attention"), axis_name=axes[0])
  spec = P(None, axes if len(axes) > 1 else axes[0])
  got = sharded_results(scheme, mesh_of(shape, axes), spec, q, k, v, d_out, d_lse, check_vma=False, **kwargs)
  assert_same(got, unsharded_results(q, k, v, d_out, d_lse, **kwargs), atol=1e-4)


def test_ring_skips_shards_the_mask_drops():
  """Causal ring over 4 devices: device 0's queries keep nothing of the later shards, so three of its four
  steps are skipped; the lowered program has the conditionals."""
  q, k, v, _, _ = inputs(7, 1, 64, 64, 2, 2)
  mesh, spec = mesh_of((4,), ("ring",)), P(None, "ring")
  attend = jax.shard_map(
    lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="ring", is_causal=True, implementation="xla", **MASK),
    mesh=mesh,
    in_specs=(spec,) * 3,
    out_specs=spec,
  )
  with jax.set_mesh(mesh):
    text = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).sum(), argnums=(0, 1, 2))).lower(q, k, v).as_text()
  assert text.count("stablehlo.case") + text.count("stablehlo.if") >= 6  # 3 forward and 3 backward steps
  assert text.count("collective_permute") >= 3 + 3 + 4  # k/v forward, k/v backward, dK/dV home
