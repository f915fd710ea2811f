"""UMT5 encoder, tokenizer and Wan prompt embeddings against transformers and diffusers (tests/fixtures/umt5_tiny,
written by scripts/make_umt5_fixture.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from sparge_jax.models.umt5 import (
  UMT5Config,
  UMT5Encoder,
  config_from_transformers,
  encode_prompts,
  load_tokenizer,
  load_umt5_encoder,
  prompt_clean,
  relative_position_buckets,
  umt5_xxl,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "umt5_tiny"
ENCODER = FIXTURE / "text_encoder"


@pytest.fixture(scope="module")
def io():
  with safe_open(FIXTURE / "io.safetensors", "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata = f.metadata()
  tensors["prompts"] = json.loads(metadata["prompts"])
  tensors["cleaned"] = json.loads(metadata["cleaned"])
  tensors["max_length"] = int(metadata["max_length"])
  return tensors


@pytest.fixture(scope="module")
def encoder():
  return load_umt5_encoder(ENCODER, dtype=jnp.float32)


def _max_error(out, reference) -> float:
  return float(np.abs(np.asarray(out, np.float32) - reference).max())


def test_fixture_has_padding_and_truncation(io):
  lengths = io["attention_mask"].sum(1)
  assert lengths.max() == io["max_length"] and lengths.min() < io["max_length"] // 2
  # Offsets beyond max_distance (16) reach the logarithmic and the last buckets.
  assert io["max_length"] > 16


@pytest.mark.parametrize("folder", ["text_encoder", "text_encoder_sharded"])
def test_parity_float32(io, folder):
  encoder = load_umt5_encoder(FIXTURE / folder, dtype=jnp.float32)
  out = encoder(io["input_ids"], io["attention_mask"])
  assert out.shape == io["last_hidden_state"].shape and out.dtype == jnp.float32
  assert _max_error(out, io["last_hidden_state"]) <= 1e-4


def test_boolean_mask_equals_integer_mask(io, encoder):
  out = encoder(io["input_ids"], io["attention_mask"].astype(bool))
  assert _max_error(out, io["last_hidden_state"]) <= 1e-4


@pytest.mark.parametrize("name, fields", [("tiny", (8, 16)), ("xxl", (32, 128))])
def test_relative_position_buckets_match_transformers(io, name, fields):
  # The fixture holds transformers' bucket of each offset in -600..600.
  buckets = relative_position_buckets(601, 601, *fields)
  offsets = np.arange(601)[None, :] - np.arange(601)[:, None]
  np.testing.assert_array_equal(buckets, io[f"buckets_{name}"][offsets + 600])


def test_prompt_clean_matches_diffusers(io):
  assert [prompt_clean(p) for p in io["prompts"]] == io["cleaned"]


def test_tokenizer_matches_transformers(io):
  tokenizer = load_tokenizer(FIXTURE / "tokenizer")
  input_ids, attention_mask = tokenizer(io["prompts"], max_length=io["max_length"])
  assert input_ids.dtype == np.int32 and attention_mask.dtype == np.int32
  np.testing.assert_array_equal(input_ids, io["input_ids"])
  np.testing.assert_array_equal(attention_mask, io["attention_mask"])
  # The truncated prompt keeps its </s>; the others end with it and are padded with <pad>.
  lengths = attention_mask.sum(1)
  assert all(
    ids[n - 1] == tokenizer.eos_id and (ids[n:] == tokenizer.pad_id).all() for ids, n in zip(input_ids, lengths)
  )
  single = tokenizer(io["prompts"][0], max_length=io["max_length"])[0]
  np.testing.assert_array_equal(single, input_ids[:1])


def test_encode_prompts_matches_diffusers(io, encoder):
  tokenizer = load_tokenizer(FIXTURE / "tokenizer")
  embeds = np.asarray(encode_prompts(tokenizer, encoder, io["prompts"], max_length=io["max_length"]))
  assert embeds.shape == io["prompt_embeds"].shape
  assert _max_error(embeds, io["prompt_embeds"]) <= 1e-4
  for row, length in zip(embeds, io["attention_mask"].sum(1)):
    assert (row[length:] == 0).all()
    assert (np.abs(row[:length]).max(axis=-1) > 0).all()


def test_bfloat16_is_close(io):
  encoder = load_umt5_encoder(ENCODER)  # bfloat16 by default
  assert encoder.blocks.query.kernel.dtype == jnp.bfloat16 and encoder.embedding.embedding.dtype == jnp.bfloat16
  out = encoder(io["input_ids"], io["attention_mask"])
  assert out.dtype == jnp.bfloat16
  # No farther from the float32 output than transformers' own bfloat16 encoder is.
  reference = io["last_hidden_state"]
  error = np.abs(np.asarray(out, np.float32) - reference)
  theirs = np.abs(io["last_hidden_state_bf16"] - reference)
  assert 0 < error.max() <= 1.5 * theirs.max() and error.mean() <= 1.5 * theirs.mean()


def test_jit_and_gradients(io, encoder):
  ids, mask = jnp.asarray(io["input_ids"]), jnp.asarray(io["attention_mask"])
  jitted = nnx.jit(lambda model, ids, mask: model(ids, mask))(encoder, ids, mask)
  assert _max_error(jitted, io["last_hidden_state"]) <= 1e-4

  weights = jax.random.normal(jax.random.key(0), io["last_hidden_state"].shape)
  graphdef, params = nnx.split(encoder, nnx.Param)

  @jax.jit
  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(ids, mask) * weights)

  grads = jax.jit(jax.grad(loss))(params)
  # Only the embedding rows of tokens in the batch receive gradient.
  used = np.isin(np.arange(encoder.config.vocab_size), io["input_ids"])
  row_norms = np.abs(np.asarray(grads["embedding"]["embedding"][...])).sum(-1)
  assert (row_norms[used] > 0).all() and (row_norms[~used] == 0).all()

  # The position-bias gradient agrees with a central difference along a random direction.
  def direction_of(path, x):
    bias = "relative_attention_bias" in jax.tree_util.keystr(path)
    return jax.random.normal(jax.random.key(1), x.shape) if bias else jnp.zeros_like(x)

  direction = jax.tree_util.tree_map_with_path(direction_of, params)
  eps = 1e-2
  shifted = lambda step: loss(jax.tree.map(lambda p, d: p + step * d, params, direction))
  numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
  analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  assert abs(analytic) > 0
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_load_onto_a_mesh(io):
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(AxisType.Auto,))  # as train.sharding.make_mesh
  encoder = load_umt5_encoder(ENCODER, dtype=jnp.float32, mesh=mesh, rules=[("embed", "fsdp")])
  assert encoder.blocks.query.kernel[...].sharding.spec == P(None, "fsdp", None)
  assert encoder.embedding.embedding[...].sharding.spec == P(None, "fsdp")
  out = encoder(io["input_ids"], io["attention_mask"])
  assert _max_error(out, io["last_hidden_state"]) <= 1e-4


FOUR_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P
from safetensors.numpy import load_file
from sparge_jax.models.umt5 import load_umt5_encoder
io = load_file("tests/fixtures/umt5_tiny/io.safetensors")
mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
rules = [("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor")]
for folder in ("text_encoder", "text_encoder_sharded"):
  encoder = load_umt5_encoder("tests/fixtures/umt5_tiny/" + folder, dtype=jnp.float32, mesh=mesh, rules=rules)
  query, down = encoder.blocks.query.kernel[...], encoder.blocks.ffn_down.kernel[...]
  assert query.sharding.spec == P(None, "fsdp", "tensor") and query.addressable_shards[0].data.shape == (3, 16, 12)
  assert down.sharding.spec == P(None, "tensor", "fsdp") and down.addressable_shards[0].data.shape == (3, 24, 16)
  assert encoder.embedding.embedding[...].addressable_shards[0].data.shape == (68, 16)
  out = nnx.jit(lambda model, ids, mask: model(ids, mask))(encoder, io["input_ids"], io["attention_mask"])
  assert float(np.abs(np.asarray(out) - io["last_hidden_state"]).max()) <= 1e-4
print("ok")
"""


def test_load_sharded_over_four_devices():
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(ROOT),
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
  }
  result = subprocess.run(
    [sys.executable, "-c", FOUR_DEVICES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-5000:]


def test_random_init_has_the_checkpoint_structure():
  config = config_from_transformers(json.loads((ENCODER / "config.json").read_text()))
  encoder = UMT5Encoder(config, rngs=nnx.Rngs(0))
  loaded = load_umt5_encoder(ENCODER, dtype=jnp.float32)
  shapes = lambda model: jax.tree.map(lambda x: x.shape, nnx.state(model, nnx.Param))
  assert shapes(encoder) == shapes(loaded)
  assert umt5_xxl().inner_dim == 4096 and umt5_xxl().vocab_size == 256384


# Loader errors: a copy of the fixture folder, altered.


def _copy(tmp_path) -> Path:
  folder = tmp_path / "text_encoder"
  shutil.copytree(ENCODER, folder)
  return folder


def _edit_tensors(folder: Path, edit) -> None:
  tensors = load_file(folder / "model.safetensors")
  edit(tensors)
  save_file(tensors, folder / "model.safetensors")


def _edit_config(folder: Path, **fields) -> None:
  config = json.loads((folder / "config.json").read_text())
  config.update(fields)
  (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def test_embedding_from_encoder_embed_tokens(io, tmp_path):
  folder = _copy(tmp_path)
  _edit_tensors(folder, lambda t: t.update({"encoder.embed_tokens.weight": t.pop("shared.weight")}))
  assert (
    _max_error(
      load_umt5_encoder(folder, dtype=jnp.float32)(io["input_ids"], io["attention_mask"]), io["last_hidden_state"]
    )
    <= 1e-4
  )


def test_encoder_embed_tokens_wins_over_shared(io, tmp_path):
  # transformers runs the encoder on encoder.embed_tokens.weight when both tables are saved.
  folder = _copy(tmp_path)
  rng = np.random.default_rng(0)

  def edit(tensors):
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    tensors["shared.weight"] = rng.standard_normal(tensors["shared.weight"].shape).astype(np.float32)

  _edit_tensors(folder, edit)
  out = load_umt5_encoder(folder, dtype=jnp.float32)(io["input_ids"], io["attention_mask"])
  assert _max_error(out, io["last_hidden_state"]) <= 1e-4


@pytest.mark.parametrize(
  "edit, message",
  [
    (
      lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight"),
      r"missing keys \[.encoder.block.1.layer.1.DenseReluDense.wo.weight.\]",
    ),
    (lambda t: t.pop("shared.weight"), "no token embedding"),
    (
      lambda t: t.update({"decoder.final_layer_norm.weight": t["encoder.final_layer_norm.weight"]}),
      r"unexpected keys \[.decoder.final_layer_norm.weight.\]",
    ),
    (
      lambda t: t.update(
        {"encoder.block.0.layer.0.SelfAttention.q.weight": t["encoder.block.0.layer.0.SelfAttention.q.weight"].T.copy()}
      ),
      r"encoder.block.0.layer.0.SelfAttention.q.weight: expected shape \(24, 32\), found \(32, 24\)",
    ),
    (
      lambda t: t.update(
        {"encoder.block.2.layer.0.SelfAttention.relative_attention_bias.weight": np.zeros((9, 4), np.float32)}
      ),
      r"relative_attention_bias.weight: expected shape \(8, 4\), found \(9, 4\)",
    ),
  ],
  ids=["missing", "no_embedding", "unexpected", "transposed", "bias_table"],
)
def test_checkpoint_errors_name_the_tensor(tmp_path, edit, message):
  folder = _copy(tmp_path)
  _edit_tensors(folder, edit)
  with pytest.raises(ValueError, match=message):
    load_umt5_encoder(folder)


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"d_model": -1}, "d_model must be a positive integer"),
    ({"num_heads": "4"}, "num_heads must be a positive integer"),
    ({"num_layers": None}, r"missing fields \['num_layers'\]"),
    ({"feed_forward_proj": "relu"}, "feed_forward_proj must be 'gated-gelu'"),
    ({"model_type": "t5"}, "model_type is 't5'"),
    ({"is_decoder": True}, "is_decoder"),
    ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets must be an integer >= 4"),
    ({"relative_attention_max_distance": 2}, "relative_attention_max_distance must exceed"),
    ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon must be a positive number"),
    ({"vocab_size": 99}, r"shared.weight: expected shape \(99, 32\), found \(136, 32\)"),
  ],
)
def test_config_errors_name_the_field(tmp_path, fields, message):
  folder = _copy(tmp_path)
  _edit_config(folder, **fields)
  with pytest.raises(ValueError, match=message):
    load_umt5_encoder(folder)


def test_folder_errors(tmp_path):
  for bad in (jnp.int32, "nope"):
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
      load_umt5_encoder(ENCODER, dtype=bad)
  with pytest.raises(ValueError, match="no config.json"):
    load_umt5_encoder(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="cannot be read as JSON"):
    load_umt5_encoder(tmp_path)
  shutil.copy(ENCODER / "config.json", tmp_path / "config.json")
  with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
    load_umt5_encoder(tmp_path)


def test_input_errors(io, encoder):
  ids, mask = io["input_ids"], io["attention_mask"]
  with pytest.raises(ValueError, match="input_ids must be integer"):
    encoder(ids.astype(np.float32), mask)
  with pytest.raises(ValueError, match="input_ids must be integer"):
    encoder(ids[0], mask[0])
  with pytest.raises(ValueError, match="attention_mask must be shaped like input_ids"):
    encoder(ids, mask[:, :-1])
  with pytest.raises(ValueError, match="attention_mask must be bool or integer"):
    encoder(ids, mask.astype(np.float32))
  with pytest.raises(ValueError, match="config must be a UMT5Config"):
    UMT5Encoder({"d_model": 8}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="feed_forward_proj"):
    UMT5Config(feed_forward_proj="gated-silu")


def test_tokenizer_errors(tmp_path):
  tokenizer = load_tokenizer(FIXTURE / "tokenizer")
  for bad in (0, 1, True, 8.0):
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
      tokenizer(["a cat"], max_length=bad)
  for bad in ([], [1], None):
    with pytest.raises(ValueError, match="prompts must be a string or a non-empty list of strings"):
      tokenizer(bad)
  with pytest.raises(ValueError, match="has no tokenizer.json"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match="not a readable tokenizers file"):
    load_tokenizer(tmp_path)
  folder = tmp_path / "tokenizer"
  shutil.copytree(FIXTURE / "tokenizer", folder)
  config = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<nope>"}))
  with pytest.raises(ValueError, match="pad_token '<nope>' is not in the tokenizer's vocabulary"):
    load_tokenizer(folder)
  with pytest.raises(ValueError, match="tokenizer must be a WanTokenizer"):
    encode_prompts(None, None, ["a cat"])


@pytest.mark.gpu
def test_parity_on_gpu(io):
  with jax.default_matmul_precision("highest"):
    out = load_umt5_encoder(ENCODER, dtype=jnp.float32)(io["input_ids"], io["attention_mask"])
  assert _max_error(out, io["last_hidden_state"]) <= 1e-4
  out = load_umt5_encoder(ENCODER)(io["input_ids"], io["attention_mask"])
  assert _max_error(out, io["last_hidden_state"]) <= 1.5 * _max_error(
    io["last_hidden_state_bf16"], io["last_hidden_state"]
  )


@pytest.mark.gpu
def test_umt5_xxl_shapes_on_gpu():
  """Wan's text encoder at its real size (random weights, bf16): two 512-token prompts, finite output."""
  config = umt5_xxl()
  encoder = nnx.jit(lambda: UMT5Encoder(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16))()
  ids = jax.random.randint(jax.random.key(0), (2, 512), 0, config.vocab_size)
  mask = (jnp.arange(512)[None, :] < jnp.array([[37], [512]])).astype(jnp.int32)
  out = nnx.jit(lambda model, ids, mask: model(ids, mask))(encoder, ids, mask)
  assert out.shape == (2, 512, 4096) and out.dtype == jnp.bfloat16
  assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
