"""The Wan VAE against diffusers' AutoencoderKLWan (fixture from scripts/make_wan_vae_fixture.py), its causal
chunking, its loader's checks, and the full-size shapes."""

import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sparge_jax.models.wan_vae import (
  WanVAE,
  WanVAEConfig,
  config_from_diffusers,
  denormalize_latents,
  load_wan_vae,
  normalize_latents,
)
from sparge_jax.models.wan_vae.loading import WEIGHTS_NAME
from sparge_jax.models.wan_vae.model import Decoder, Encoder

FIXTURE = Path(__file__).parent / "fixtures" / "wan_vae_tiny"
CHANNELS_LAST = (0, 2, 3, 4, 1)  # diffusers is [batch, channels, frames, height, width]

_encode = nnx.jit(lambda vae, video: vae.encode(video, return_logvar=True))
_decode = nnx.jit(lambda vae, latents: vae.decode(latents))


@pytest.fixture(autouse=True)
def float32_matmuls():
  """Full float32 convolutions and matmuls on every backend (GPUs otherwise may use TF32); one setting for
  every test, so that they share compiled programs."""
  with jax.default_matmul_precision("float32"):
    yield


@pytest.fixture(scope="module")
def io():
  return {name: array.transpose(CHANNELS_LAST) for name, array in load_file(FIXTURE / "io.safetensors").items()}


@pytest.fixture(scope="module")
def vae():
  return load_wan_vae(FIXTURE / "vae")


def _max_abs(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - b).max())


@pytest.mark.parametrize("suffix", ["", "_1"], ids=["3_chunks", "1_frame"])
def test_encode_matches_diffusers(vae, io, suffix):
  mean, logvar = _encode(vae, io["video" + suffix])
  assert mean.shape == logvar.shape == io["mean" + suffix].shape
  assert _max_abs(mean, io["mean" + suffix]) <= 1e-4
  assert _max_abs(logvar, io["logvar" + suffix]) <= 1e-4


@pytest.mark.parametrize("suffix", ["", "_1"], ids=["4_chunks", "1_frame"])
def test_decode_matches_diffusers(vae, io, suffix):
  video = _decode(vae, io["latents" + suffix])
  expected = io["decoded" + suffix]
  assert video.shape == expected.shape
  assert _max_abs(video, expected) <= 1e-4
  assert float(jnp.abs(video).max()) <= 1.0


def test_encode_is_causal_over_chunks(vae, io):
  """Latent frame i sees video frames up to 4i: later frames leave it bit for bit unchanged."""
  video = io["video"]
  mean, _ = _encode(vae, video)
  for first_changed, unchanged_latents in ((5, 2), (4, 1)):
    edited = video.copy()
    edited[:, first_changed:] = -edited[:, first_changed:]
    edited_mean, _ = _encode(vae, edited)
    np.testing.assert_array_equal(edited_mean[:, :unchanged_latents], mean[:, :unchanged_latents])
    assert _max_abs(edited_mean[:, unchanged_latents:], np.asarray(mean[:, unchanged_latents:])) > 1e-3


def test_decode_is_causal_over_chunks(vae, io):
  """Video frames 4(i-1)+1 .. 4i come from latent frames up to i: later latents leave them unchanged."""
  latents = io["latents"]
  video = _decode(vae, latents)
  edited = latents.copy()
  edited[:, 2] += 1.0
  edited_video = _decode(vae, edited)
  np.testing.assert_array_equal(edited_video[:, :5], video[:, :5])
  assert _max_abs(edited_video[:, 5:], np.asarray(video[:, 5:])) > 1e-3


def test_bf16_is_close_to_float32_diffusers(io):
  vae = load_wan_vae(FIXTURE / "vae", dtype=jnp.bfloat16)
  assert vae.decoder.conv_out.kernel[...].dtype == jnp.bfloat16
  mean, _ = _encode(vae, io["video"])
  video = _decode(vae, io["latents"])
  assert mean.dtype == video.dtype == jnp.bfloat16
  assert _max_abs(mean, io["mean"]) <= 0.05 * np.abs(io["mean"]).max()
  error = np.abs(np.asarray(video, np.float32) - io["decoded"])
  assert error.max() <= 0.2 and error.mean() <= 0.02


def test_latent_normalization_is_diffusers():
  config = config_from_diffusers(json.loads((FIXTURE / "vae" / "config.json").read_text()))
  latents = jax.random.normal(jax.random.key(0), (2, 3, 5, 4, config.z_dim))
  mean, std = np.asarray(config.latents_mean, np.float32), np.asarray(config.latents_std, np.float32)
  normalized = normalize_latents(latents, config)
  np.testing.assert_allclose(normalized, (np.asarray(latents) - mean) / std, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(denormalize_latents(normalized, config), latents, rtol=1e-6, atol=1e-6)
  half = denormalize_latents(latents.astype(jnp.bfloat16), config)
  assert half.dtype == jnp.bfloat16


def test_full_size_shapes_for_81_frames():
  """Wan2.1's VAE (abstract: no memory): 81 frames -> 21 latent frames -> 81 frames, 8x spatially."""
  config = WanVAEConfig()
  vae = nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16))
  video = jax.ShapeDtypeStruct((1, 81, 16, 24, 3), jnp.float32)
  mean, logvar = nnx.eval_shape(lambda vae, video: vae.encode(video, return_logvar=True), vae, video)
  assert mean.shape == logvar.shape == (1, 21, 2, 3, 16) and mean.dtype == jnp.bfloat16
  decoded = nnx.eval_shape(lambda vae, latents: vae.decode(latents), vae, mean)
  assert decoded.shape == (1, 81, 16, 24, 3) and decoded.dtype == jnp.bfloat16
  params = sum(v.size for _, v in nnx.to_flat_state(nnx.state(vae, nnx.Param)))
  assert 125e6 < params < 130e6  # the published Wan2.1 VAE's 126.9M


@pytest.mark.parametrize("latent_frames", [2, 5])
def test_network_is_traced_twice_for_any_length(vae, monkeypatch, latent_frames):
  """The first chunk and the scan's step: no per-chunk unrolling, so compile time does not grow with frames."""
  calls = {"encoder": 0, "decoder": 0}
  for name, module in (("encoder", Encoder), ("decoder", Decoder)):

    def counted(self, *args, _name=name, _call=module.__call__, **kwargs):
      calls[_name] += 1
      return _call(self, *args, **kwargs)

    monkeypatch.setattr(module, "__call__", counted)
  video = jax.ShapeDtypeStruct((1, 1 + 4 * (latent_frames - 1), 16, 24, 3), jnp.float32)
  latents = nnx.eval_shape(lambda vae, video: vae.encode(video), vae, video)
  nnx.eval_shape(lambda vae, latents: vae.decode(latents), vae, latents)
  assert calls == {"encoder": 2, "decoder": 2}


def test_bad_inputs_raise(vae):
  with pytest.raises(ValueError, match="frames must be 1 \\+ 4k"):
    vae.encode(jnp.zeros((1, 10, 16, 24, 3)))
  with pytest.raises(ValueError, match="multiples of 8, got 20x24"):
    vae.encode(jnp.zeros((1, 5, 20, 24, 3)))
  with pytest.raises(ValueError, match=r"video must be \[batch, frames, height, width, 3\]"):
    vae.encode(jnp.zeros((1, 5, 16, 24, 4)))
  with pytest.raises(ValueError, match=r"latents must be \[batch, frames >= 1, height, width, 4\]"):
    vae.decode(jnp.zeros((1, 2, 3, 4, 16)))


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(temperal_downsample=[True, True, True]), "at most 2 temporal halvings"),
    (dict(temperal_downsample=[True]), "len\\(dim_mult\\) - 1 = 3"),
    (dict(z_dim=8), "latents_mean must have z_dim = 8 entries"),
    (dict(base_dim=0), "base_dim must be a positive int"),
    (dict(dim_mult="1244"), "dim_mult must be a list"),
    (dict(latents_std=[1.0] * 15 + [0.0]), "latents_std must be positive"),
  ],
)
def test_bad_configs_raise(fields, message):
  with pytest.raises(ValueError, match=message):
    WanVAEConfig(**fields)


def _copy(tmp_path, *, config=None, tensors=None):
  """A copy of the fixture's vae/ folder with config fields and/or tensors changed (None values delete)."""
  target = tmp_path / "vae"
  target.mkdir()
  fields = json.loads((FIXTURE / "vae" / "config.json").read_text())
  arrays = load_file(FIXTURE / "vae" / WEIGHTS_NAME)
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
    (dict(config={"clip_output": True}), r"unknown fields \['clip_output'\]"),
    (dict(config={"is_residual": True}), "is_residual=True; only False"),
    (dict(config={"patch_size": 2}), "patch_size=2"),
    (dict(config={"attn_scales": [0.5]}), "attn_scales"),
    (dict(config={"_class_name": "AutoencoderKL"}), "not a AutoencoderKLWan"),
    (dict(config={"temperal_downsample": [False, True]}), "config.json: temperal_downsample"),
    (dict(tensors={"decoder.norm_out.gamma": None}), r"missing keys \['decoder.norm_out.gamma'\]"),
    (dict(tensors={"encoder.extra.bias": np.ones(3, np.float32)}), r"unexpected keys \['encoder.extra.bias'\]"),
    (
      dict(tensors={"quant_conv.weight": np.ones((8, 8, 1, 1), np.float32)}),
      r"quant_conv.weight: expected shape \(8, 8, 1, 1, 1\), found \(8, 8, 1, 1\)",
    ),
    (dict(config={"base_dim": 10}), r"encoder.conv_in.weight: expected shape \(10, 3, 3, 3, 3\), found \(8, 3"),
  ],
)
def test_bad_checkpoints_raise(tmp_path, edit, message):
  with pytest.raises(ValueError, match=message):
    load_wan_vae(_copy(tmp_path, **edit))


def test_bad_paths_raise(tmp_path):
  with pytest.raises(ValueError, match="not a diffusers VAE folder"):
    load_wan_vae(tmp_path / "nowhere")
  folder = tmp_path / "vae"
  shutil.copytree(FIXTURE / "vae", folder)
  (folder / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json: cannot be read as JSON"):
    load_wan_vae(folder)
  (folder / "config.json").write_text((FIXTURE / "vae" / "config.json").read_text())
  (folder / WEIGHTS_NAME).unlink()
  with pytest.raises(ValueError, match="neither"):
    load_wan_vae(folder)


def test_load_onto_a_mesh(vae):
  mesh = jax.make_mesh((1,), ("model",))
  placed = load_wan_vae(FIXTURE / "vae", mesh=mesh, rules=[("vae_channels", "model")])
  P = jax.sharding.PartitionSpec
  assert placed.encoder.conv_in.kernel[...].sharding.spec == P(None, None, None, None, "model")
  assert placed.decoder.norm_out.gamma[...].sharding.spec == P("model")
  np.testing.assert_array_equal(placed.decoder.conv_out.kernel[...], vae.decoder.conv_out.kernel[...])


@pytest.mark.gpu
def test_decode_and_encode_81_frames_480p_gpu():
  """The real size with random weights, bf16: runs, and gives finite frames of the right shape."""
  vae = WanVAE(WanVAEConfig(), rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  latents = jax.random.normal(jax.random.key(1), (1, 21, 60, 104, 16), jnp.bfloat16)
  for name, run, x, shape in (
    ("decode", _decode, latents, (1, 81, 480, 832, 3)),
    ("encode", _encode, jnp.zeros((1, 81, 480, 832, 3), jnp.bfloat16), (1, 21, 60, 104, 16)),
  ):
    out = jax.block_until_ready(run(vae, x))
    start = time.perf_counter()
    out = jax.block_until_ready(run(vae, x))
    seconds = time.perf_counter() - start
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == shape and bool(jnp.isfinite(out).all())
    peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2**30
    print(f"{name} 81 frames 480p bf16: {seconds:.2f} s, peak {peak:.1f} GiB")
