"""Sequence parallelism in the Wan DiT, the distillation step and the pipeline, on 8 host devices.

Run by `test_parallel.py` in a subprocess with `--xla_force_host_platform_device_count=8` (skipped in a
process with fewer devices). Each sharded result is compared with the same computation on one device.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from wan_tiny_folder import tiny_folder

from sparge_jax.models.wan import AttentionConfig, LayerSparsity, WanModel, tiny
from sparge_jax.pipelines.wan import WanPipeline
from train import models, sharding
from train import step as train_step
from train.configs import PRESETS, MeshConfig, validate

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: run through test_parallel.py")

SPARSE = AttentionConfig(kind="sparse", topk=0.3, topp=0.4, block_q=16, block_kv=16, implementation="xla")


def mesh_of(shape, names):
  devices = jax.devices()[: math.prod(shape)]
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def model_inputs(config, batch=2, seed=1):
  """Latents of 3 x 12 x 12 (108 tokens after patching: no shard or block multiple), t and text."""
  keys = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(keys[0], (batch, 3, 12, 12, config.in_channels)),
    jax.random.uniform(keys[1], (batch,), maxval=1000.0),
    jax.random.normal(keys[2], (batch, 5, config.text_dim)),
  )


# (scheme, mesh shape, mesh axes, batch axes, sequence axes, attention kind, per-layer sparsity)
MODEL = [
  ("ulysses", (2, 4), ("data", "sequence"), ("data",), ("sequence",), "sparse", True),
  ("ulysses", (4,), ("sequence",), (), ("sequence",), "dense", False),
  ("ring", (4,), ("sequence",), (), ("sequence",), "sparse", False),
  ("ring", (2, 4), ("data", "sequence"), ("data",), ("sequence",), "dense", False),
  ("usp", (2, 2, 2), ("data", "ulysses", "ring"), ("data",), ("ulysses", "ring"), "sparse", False),
]


@pytest.mark.parametrize("case", MODEL, ids=[f"{c[0]}-{c[5]}-{'x'.join(map(str, c[1]))}" for c in MODEL])
def test_dit_forward_with_sequence_axes_equals_unsharded(case):
  scheme, shape, names, batch_axes, sequence_axes, kind, per_layer = case
  config = dataclasses.replace(tiny(), num_attention_heads=4, attention=dataclasses.replace(SPARSE, kind=kind))
  model = WanModel(config, rngs=nnx.Rngs(0))
  x, t, context = model_inputs(config)
  layer_sparsity = None
  if per_layer:  # per layer and head, traced: Ulysses hands each device its heads' values
    topk = jnp.asarray([[0.2, 0.5, 0.3, 1.0], [0.1, 0.4, 0.6, 0.2]])
    layer_sparsity = LayerSparsity(topk, jnp.full((2, 4), 0.3))
  run = lambda m, *a: m(*a, return_sparsity=True, layer_sparsity=layer_sparsity)
  expected = nnx.jit(run)(model, x, t, context)
  sharded = dataclasses.replace(config, batch_axes=batch_axes, sequence_axes=sequence_axes, sequence_parallel=scheme)
  graphdef, state = nnx.graphdef(WanModel(sharded, rngs=nnx.Rngs(0))), nnx.state(model)
  mesh = mesh_of(shape, names)
  with jax.set_mesh(mesh):
    lowered = jax.jit(lambda p, *a: run(nnx.merge(graphdef, p), *a)).lower(state, x, t, context)
    out, sparsity = lowered.compile()(state, x, t, context)
  text = lowered.as_text()
  assert ("all_to_all" in text) == (scheme != "ring"), scheme
  assert ("collective_permute" in text) == (scheme != "ulysses"), scheme
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected[0]), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(sparsity), np.asarray(expected[1]), atol=1e-6)
  if kind == "sparse":
    assert 0.1 < float(np.mean(sparsity)) < 0.9


def test_model_checks_its_sequence_axes():
  config = dataclasses.replace(tiny(), attention=SPARSE, sequence_axes=("sequence",))
  model = WanModel(config, rngs=nnx.Rngs(0))
  with jax.set_mesh(mesh_of((4,), ("data",))), pytest.raises(ValueError, match=r"has no axes \['sequence'\]"):
    model(*model_inputs(config))
  with pytest.raises(ValueError, match="sequence_parallel='usp' takes 2 sequence_axes"):
    dataclasses.replace(config, sequence_parallel="usp")
  with pytest.raises(ValueError, match="must be distinct and not in batch_axes"):
    dataclasses.replace(config, batch_axes=("sequence",))


def test_trainer_mesh_has_a_sequence_axis():
  assert sharding.make_mesh(-1, 1).axis_names == ("data", "fsdp")
  mesh = sharding.make_mesh(-1, 2, 4)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "sequence": 4} and sharding.batch_devices(mesh) == 2
  assert sharding.sequence_axes(mesh) == ("sequence",)
  usp = sharding.make_mesh(2, 1, 4, ring=2)
  assert dict(usp.shape) == {"data": 2, "fsdp": 1, "sequence": 2, "ring": 2}
  assert sharding.sequence_axes(usp) == ("sequence", "ring")
  with pytest.raises(ValueError, match=r"mesh.sequence \(3\) must be >= 1 and divide"):
    sharding.make_mesh(-1, 1, 3)
  config = PRESETS["tiny"]()
  with pytest.raises(ValueError, match="--config.mesh.ring=2: is for sequence_parallel=usp"):
    validate(dataclasses.replace(config, mesh=MeshConfig(sequence=4, ring=2)))
  with pytest.raises(ValueError, match="--config.mesh.ring=3: must divide mesh.sequence"):
    validate(dataclasses.replace(config, mesh=MeshConfig(sequence=4, ring=3, sequence_parallel="usp")))


def test_distillation_step_with_a_sequence_axis_equals_unsharded():
  """The trainer's jitted step on a (data 2, sequence 2, ring 2) mesh (USP): dense teacher and sparse student
  split along the tokens; the loss, the gradient norm and the updated parameters are those of one device."""
  scheme = "usp"
  config = PRESETS["tiny"]()
  data = dataclasses.replace(config.data, frames=2, height=8, width=8)  # 32 tokens
  mesh_config = MeshConfig(data=2, sequence=4, sequence_parallel=scheme, ring=2 if scheme == "usp" else 1)
  config = dataclasses.replace(config, batch_size=2, data=data, mesh=mesh_config)
  validate(config)
  mesh = sharding.make_mesh(2, 1, 4, ring=2 if scheme == "usp" else None)
  teacher_config, student_config = models.model_configs(config)
  abstract = models.abstract_model(teacher_config)[1]
  params = nnx.state(WanModel(teacher_config, rngs=nnx.Rngs(3))).to_pure_dict()
  teacher_params = jax.tree.map(lambda x: x * 1.01, params)
  keys = jax.random.split(jax.random.key(4), 2)
  batch = {
    "latents": jax.random.normal(keys[0], (2, data.frames, data.height, data.width, 4)),
    "context": jax.random.normal(keys[1], (2, data.text_len, teacher_config.text_dim)),
  }
  optimizer, _ = train_step.make_optimizer(config)
  key = jax.random.key(5)

  def reference(params, teacher_params, batch):
    loss_fn = train_step.make_loss_fn(config, *(models.abstract_model(c)[0] for c in (teacher_config, student_config)))
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, teacher_params, batch, jax.random.fold_in(key, 0)
    )
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return loss, optax.global_norm(grads), optax.apply_updates(params, updates)

  loss_ref, norm_ref, params_ref = jax.jit(reference)(params, teacher_params, batch)

  configs = models.model_configs(config, batch_axes=sharding.BATCH_AXES, sequence_axes=sharding.sequence_axes(mesh))
  assert configs[1].sequence_parallel == scheme and configs[1].sequence_axes == sharding.sequence_axes(mesh)
  graphdefs = [models.abstract_model(c)[0] for c in configs]
  shardings = sharding.param_shardings(abstract, mesh)
  # FSDP spans the sequence axes: the devices that share an example's tokens share its weights.
  assert shardings["blocks"]["ffn_in"]["kernel"].spec == P(None, ("fsdp", "sequence", "ring"), None)
  replicated = sharding.replicated(mesh)
  opt_state = jax.jit(optimizer.init)(params)
  opt_shardings = jax.tree.map(lambda _: replicated, opt_state)
  step = train_step.make_train_step(
    train_step.make_loss_fn(config, *graphdefs),
    optimizer,
    shardings,
    opt_shardings,
    shardings,
    sharding.batch_sharding(mesh),
    replicated,
  )
  put = lambda tree, s: jax.device_put(tree, s)
  args = (
    put(params, shardings),
    put(opt_state, opt_shardings),
    put(teacher_params, shardings),
    put(batch, NamedSharding(mesh, P(sharding.BATCH_AXES))),
    key,
    jnp.int32(0),
  )
  new_params, _, metrics = sharding.on_mesh(step, mesh)(*args)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss_ref), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(norm_ref), rtol=1e-4)
  for got, want in zip(jax.tree.leaves(new_params), jax.tree.leaves(params_ref)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_pipeline_with_a_sequence_axis_equals_unsharded(tmp_path):
  folder = tiny_folder(tmp_path / "Wan-tiny")
  attention = AttentionConfig(kind="sparse", topk=0.5, topp=0.3, block_q=16, block_kv=16)
  pipe = WanPipeline.from_pretrained(folder, dtype=jnp.float32, attention=attention)
  mesh = mesh_of((4,), ("sequence",))
  split = WanPipeline.from_pretrained(
    folder, dtype=jnp.float32, attention=attention, mesh=mesh, sequence_axes=("sequence",), sequence_parallel="ring"
  )
  assert split.transformer.config.sequence_axes == ("sequence",)
  noise = jax.random.normal(jax.random.key(0), (1, 3, 8, 12, pipe.transformer.config.in_channels))
  embeddings = pipe.encode_prompts(["a fox in the snow", "blurry"])
  run = lambda p: np.asarray(p.denoise(noise, embeddings[:1], embeddings[1:], num_steps=2, progress=False))
  np.testing.assert_allclose(run(split), run(pipe), rtol=1e-5, atol=1e-5)
