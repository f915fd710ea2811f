"""Round trips and error reporting of the diffusers Wan checkpoint reader/writer."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sparge_jax.models.wan import AttentionConfig, WanModel, load_diffusers, save_diffusers, tiny
from sparge_jax.models.wan.diffusers_io import ATTENTION_NAME, INDEX_NAME, WEIGHTS_NAME


def _random_model(seed=0, **changes):
  """A tiny model whose every parameter (norms, biases, tables too) is random, so no mix-up hides."""
  model = WanModel(dataclasses.replace(tiny(), **changes), rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [jax.random.normal(k, a.shape, a.dtype) * 0.5 for k, a in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, nnx.state(a, nnx.Param), nnx.state(b, nnx.Param))


def _inputs(config, seed=0):
  kx, kc = jax.random.split(jax.random.key(seed))
  return (
    jax.random.normal(kx, (1, 2, 4, 6, config.in_channels)),
    jnp.array([321.0]),
    jax.random.normal(kc, (1, 3, config.text_dim)),
  )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  model = _random_model()
  folder = tmp_path_factory.mktemp("ckpt") / "transformer"
  save_diffusers(model, folder)
  return model, folder


def test_round_trip_is_exact(saved):
  model, folder = saved
  assert sorted(p.name for p in folder.iterdir()) == ["config.json", WEIGHTS_NAME, ATTENTION_NAME]
  loaded = load_diffusers(folder, attention=AttentionConfig(kind="sparse"), remat=True)
  _assert_same_params(model, loaded)
  assert loaded.config == dataclasses.replace(model.config, attention=AttentionConfig(kind="sparse"), remat=True)
  loaded.set_attention(AttentionConfig())
  np.testing.assert_array_equal(loaded(*_inputs(model.config)), model(*_inputs(model.config)))


def test_diffusers_layout(saved):
  model, folder = saved
  config = json.loads((folder / "config.json").read_text())
  assert config["_class_name"] == "WanTransformer3DModel"
  assert (config["num_layers"], config["patch_size"], config["text_dim"]) == (2, [1, 2, 2], 24)
  tensors = load_file(folder / WEIGHTS_NAME)
  assert tensors["patch_embedding.weight"].shape == (32, 4, 1, 2, 2)
  np.testing.assert_array_equal(
    tensors["blocks.1.attn1.to_q.weight"], np.asarray(model.blocks.self_attn.query.kernel[1]).T
  )
  np.testing.assert_array_equal(tensors["blocks.0.scale_shift_table"][0], model.blocks.modulation[0])
  np.testing.assert_array_equal(tensors["blocks.0.ffn.net.2.bias"], model.blocks.ffn_out.bias[0])
  assert len(tensors) == 2 * 27 + 15


def test_sharded_round_trip(tmp_path):
  model = _random_model(seed=1)
  save_diffusers(model, tmp_path / "sharded", max_shard_bytes=8_000)
  index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
  assert len(set(index["weight_map"].values())) > 2
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
  _assert_same_params(model, load_diffusers(tmp_path / "sharded"))


def test_bf16_load_and_round_trip(saved, tmp_path):
  model, folder = saved
  half = load_diffusers(folder, dtype=jnp.bfloat16)
  assert half.config.compute_dtype == jnp.bfloat16
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(half, nnx.Param))):
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(b, a.astype(jnp.bfloat16))
  save_diffusers(half, tmp_path / "half")
  _assert_same_params(half, load_diffusers(tmp_path / "half", dtype=jnp.bfloat16))


def test_load_onto_a_mesh(saved):
  _, folder = saved
  mesh = jax.make_mesh((1,), ("fsdp",))
  model = load_diffusers(folder, mesh=mesh, rules=[("embed", "fsdp")])
  kernel = model.blocks.ffn_in.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert model.text_in.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_the_attention_settings_travel_with_the_folder(tmp_path):
  """A sparse student saved is a sparse student loaded; an explicit attention wins; a bad file names itself."""
  sparse = AttentionConfig(kind="sparse", topk=(0.1, 0.3), topp=0.0, mode="topk", block_q=16, block_kv=32)
  model = _random_model(attention=sparse)
  folder = tmp_path / "student"
  save_diffusers(model, folder)
  loaded = load_diffusers(folder)
  assert loaded.config.attention == sparse
  x = _inputs(model.config, seed=3)
  np.testing.assert_array_equal(loaded(*x), model(*x))
  assert load_diffusers(folder, attention=AttentionConfig()).config.attention == AttentionConfig()
  for text, message in (
    ('{"kind": "sparse", "topk": 2.0}', "topk"),
    ('{"kind": "sparse", "top_k": 0.1}', r"unknown field\(s\) \['top_k'\]"),
    ("[0.1]", "JSON object"),
    ("{", "not a readable"),
  ):
    (folder / ATTENTION_NAME).write_text(text)
    with pytest.raises(ValueError, match=rf"{ATTENTION_NAME}.*{message}"):
      load_diffusers(folder)


def _copy(folder, tmp_path, *, config=None, tensors=None):
  """A copy of a saved folder with config fields and/or tensors changed (None values delete)."""
  target = tmp_path / "edited"
  target.mkdir()
  fields = json.loads((folder / "config.json").read_text())
  arrays = load_file(folder / WEIGHTS_NAME)
  for source, changes in ((fields, config or {}), (arrays, tensors or {})):
    for key, value in changes.items():
      if value is None:
        del source[key]
      else:
        source[key] = value
  (target / "config.json").write_text(json.dumps(fields))
  save_file(arrays, target / WEIGHTS_NAME)
  return target


@pytest.mark.parametrize(
  "edit, message",
  [
    (dict(config={"window_size": [-1, -1]}), r"unknown fields \['window_size'\]"),
    (dict(config={"image_dim": 1280}), "image-to-video"),
    (dict(config={"_class_name": "UNet3DConditionModel"}), "not a WanTransformer3DModel"),
    (dict(tensors={"blocks.1.attn2.norm_k.weight": None}), r"missing keys \['blocks.1.attn2.norm_k.weight'\]"),
    (dict(tensors={"blocks.2.norm2.weight": np.ones(32, np.float32)}), r"unexpected keys \['blocks.2.norm2.weight'\]"),
    (
      dict(tensors={"proj_out.weight": np.ones((16, 31), np.float32)}),
      r"proj_out.weight: expected shape \(16, 32\), found \(16, 31\)",
    ),
    (dict(config={"ffn_dim": 48}), r"blocks.0.ffn.net.0.proj.weight: expected shape \(48, 32\), found \(64, 32\)"),
    (dict(config={"cross_attn_norm": False}), r"unexpected keys \['blocks.0.norm2.bias'"),
  ],
)
def test_bad_checkpoints_raise(saved, tmp_path, edit, message):
  _, folder = saved
  with pytest.raises(ValueError, match=message):
    load_diffusers(_copy(folder, tmp_path, **edit))


def test_bad_paths_and_options_raise(saved, tmp_path):
  _, folder = saved
  with pytest.raises(ValueError, match="not a diffusers transformer folder"):
    load_diffusers(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="not a diffusers transformer folder"):
    load_diffusers(folder / WEIGHTS_NAME)
  (tmp_path / "config_only").mkdir()
  (tmp_path / "config_only" / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(ValueError, match="neither"):
    load_diffusers(tmp_path / "config_only")
  (tmp_path / "config_only" / INDEX_NAME).write_text(
    json.dumps({"weight_map": {"proj_out.bias": "shard-1.safetensors"}})
  )
  with pytest.raises(ValueError, match=r"shard files that are not in .*shard-1.safetensors"):
    load_diffusers(tmp_path / "config_only")
  with pytest.raises(ValueError, match=r"overrides \['num_layers'\]"):
    load_diffusers(folder, num_layers=3)
  with pytest.raises(ValueError, match="already exists"):
    save_diffusers(_random_model(), folder)
  assert sorted(p.name for p in folder.parent.iterdir()) == ["transformer"]  # no staging left behind


def _with_config(folder, tmp_path, text):
  """A copy of a saved folder whose config.json is `text`."""
  target = tmp_path / "edited"
  target.mkdir()
  (target / "config.json").write_text(text)
  (target / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes())
  return target


@pytest.mark.parametrize(
  "change, message",
  [
    ({"num_layers": "two"}, "field 'num_layers' must be a positive integer, got 'two'"),
    ({"num_layers": 0}, "field 'num_layers' must be a positive integer, got 0"),
    ({"num_attention_heads": 2.0}, "field 'num_attention_heads' must be a positive integer, got 2.0"),
    ({"ffn_dim": True}, "field 'ffn_dim' must be a positive integer, got True"),
    ({"patch_size": 2}, "field 'patch_size' must be a list of 3 positive integers, got 2"),
    ({"patch_size": [1, 2]}, "field 'patch_size' must be a list of 3 positive integers, got [1, 2]"),
    ({"eps": "1e-6"}, "field 'eps' must be a positive number, got '1e-6'"),
    ({"cross_attn_norm": "yes"}, "field 'cross_attn_norm' must be true or false, got 'yes'"),
    ({"attention_head_dim": 9}, "attention_head_dim 9 splits into odd rotary dims"),
  ],
)
def test_wrong_config_field_types_name_the_file_and_field(saved, tmp_path, change, message):
  _, folder = saved
  fields = {**json.loads((folder / "config.json").read_text()), **change}
  edited = _with_config(folder, tmp_path, json.dumps(fields))
  with pytest.raises(ValueError) as e:
    load_diffusers(edited)
  assert str(e.value).startswith(f"{edited / 'config.json'}: ") and message in str(e.value)


def test_unreadable_config_and_weights_name_the_file(saved, tmp_path):
  _, folder = saved
  edited = _with_config(folder, tmp_path, '{"num_layers": 2,')
  config = edited / "config.json"
  with pytest.raises(ValueError, match=f"^{config}: not valid JSON"):
    load_diffusers(edited)
  config.write_text("[2]")
  with pytest.raises(ValueError, match=f"^{config}: a JSON list, not an object of config fields$"):
    load_diffusers(edited)
  config.write_text((folder / "config.json").read_text())
  weights = edited / WEIGHTS_NAME
  weights.write_bytes(weights.read_bytes()[:-100])  # the data section cut short
  with pytest.raises(ValueError, match=f"^{weights}: not a readable safetensors file"):
    load_diffusers(edited)
  weights.unlink()
  (edited / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 1}}))
  with pytest.raises(ValueError, match=f"^{edited / INDEX_NAME}: has no 'weight_map'"):
    load_diffusers(edited)
  (edited / INDEX_NAME).write_text(json.dumps({"weight_map": {"proj_out.bias": f"../{folder.name}/{WEIGHTS_NAME}"}}))
  with pytest.raises(ValueError, match="must be a relative path inside"):
    load_diffusers(edited)
