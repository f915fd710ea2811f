"""`WanConfig.batch_axes`: attention under `jax.shard_map` over the batch axes of the context mesh.

The 8-device checks run in a subprocess (`--xla_force_host_platform_device_count` must be set before
JAX starts): sharded outputs equal unsharded ones, and the lowered train step has the manual
computations around attention.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sparge_jax.models.wan import AttentionConfig, WanModel, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSE = AttentionConfig(kind="sparse", topk=0.3, topp=0.5, mode="hybrid", block_q=16, block_kv=16)


def inputs(config, batch, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(keys[0], (batch, 2, 8, 8, config.in_channels)),
    jax.random.uniform(keys[1], (batch,), maxval=1000.0),
    jax.random.normal(keys[2], (batch, 5, config.text_dim)),
  )


def test_batch_axes_need_a_context_mesh_and_a_divisible_batch():
  config = dataclasses.replace(tiny(), attention=SPARSE, batch_axes=("data",))
  model = WanModel(config, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"batch_axes \('data',\): the context mesh .* has no axes \['data'\]"):
    model(*inputs(config, 2))
  with pytest.raises(ValueError, match="batch_axes must be a tuple of mesh axis names"):
    dataclasses.replace(config, batch_axes="data")


def test_one_device_mesh_changes_nothing():
  config = dataclasses.replace(tiny(), attention=SPARSE)
  model = WanModel(config, rngs=nnx.Rngs(0))
  x, t, context = inputs(config, 2)
  forward = nnx.jit(lambda m, *a: m(*a, return_sparsity=True))
  expected = forward(model, x, t, context)
  model.config = dataclasses.replace(config, batch_axes=("data", "fsdp"))
  graphdef, state = nnx.split(model)
  mesh = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    got = forward(model, x, t, context)
    lowered = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a)).lower(state, x, t, context)
  assert "manual_computation" not in lowered.as_text()
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


EIGHT_DEVICES = r"""
import dataclasses, sys
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, "tests")
from test_batch_axes import SPARSE, inputs
from sparge_jax.models.wan import WanModel, tiny
from train import models, sharding, step as train_step
from train.configs import PRESETS

assert jax.device_count() == 8
mesh = sharding.make_mesh(2, 4)

# Model outputs: batch 8 over (data=2, fsdp=4), params FSDP-sharded, vs one device without batch_axes.
for attention in (SPARSE, dataclasses.replace(SPARSE, kind="dense")):
    config = dataclasses.replace(tiny(), attention=attention)
    model = WanModel(config, rngs=nnx.Rngs(1))
    x, t, context = inputs(config, 8, seed=2)
    expected = nnx.jit(lambda m, *a: m(*a, return_sparsity=True))(model, x, t, context)
    state = nnx.state(model)
    sharded_graphdef = nnx.split(WanModel(dataclasses.replace(config, batch_axes=sharding.BATCH_AXES),
                                          rngs=nnx.Rngs(1)))[0]
    params = jax.device_put(state.to_pure_dict(), sharding.param_shardings(state, mesh))
    batch = NamedSharding(mesh, P(sharding.BATCH_AXES))
    x, t, context = (jax.device_put(a, batch) for a in (x, t, context))
    def run(p, x, t, context):
        model = nnx.merge(sharded_graphdef, p)
        return model(x, t, context, return_sparsity=True)
    with jax.set_mesh(mesh):
        out, sparsity = jax.jit(run)(params, x, t, context)
    assert out.sharding.spec[0] == sharding.BATCH_AXES, out.sharding
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sparsity), np.asarray(expected[1]))
    if attention.kind == "sparse":
        assert 0.2 < float(sparsity.mean()) < 0.9, float(sparsity.mean())

# The trainer's step: each device attends over its own examples (manual computations).
config = dataclasses.replace(PRESETS["tiny"](), batch_size=8)
teacher_config, student_config = models.model_configs(config, batch_axes=sharding.BATCH_AXES)
graphdefs = [nnx.split(nnx.eval_shape(lambda c=c: WanModel(c, rngs=nnx.Rngs(0))))[0]
             for c in (teacher_config, student_config)]
abstract = nnx.state(nnx.eval_shape(lambda: WanModel(teacher_config, rngs=nnx.Rngs(0))))
shardings = sharding.param_shardings(abstract, mesh)
optimizer, _ = train_step.make_optimizer(config)
params = abstract.to_pure_dict()
opt_state = jax.eval_shape(optimizer.init, params)
replicated = sharding.replicated(mesh)
opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, opt_state, shardings,
                                      transform_non_params=lambda _: replicated)
step = train_step.make_train_step(train_step.make_loss_fn(config, *graphdefs), optimizer, shardings,
                                  opt_shardings, shardings, sharding.batch_sharding(mesh), replicated)
d = config.data
batch = {"latents": jax.ShapeDtypeStruct((8, d.frames, d.height, d.width, 4), jnp.float32),
         "context": jax.ShapeDtypeStruct((8, d.text_len, teacher_config.text_dim), jnp.float32)}
with jax.set_mesh(mesh):
    text = step.lower(params, opt_state, params, batch, jax.random.key(0), jnp.int32(0)).as_text()
# Self- and cross-attention in the teacher's forward, the student's forward and its backward.
assert text.count("sdy.manual_computation") >= 6, text.count("sdy.manual_computation")
print("ok")
"""


def test_eight_devices_sharded_outputs_and_manual_attention_in_the_step():
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": ROOT,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
  }
  result = subprocess.run(
    [sys.executable, "-c", EIGHT_DEVICES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-5000:]
