"""The Wan text-to-video pipeline end to end on tiny random models, attention schedules, video files and
the `train.generate` and `benchmarks.generate` commands.

The tiny Wan folder (wan_tiny_folder.py) holds the committed tiny UMT5 text encoder, tokenizer and VAE
fixtures (random models made with transformers and diffusers) and a random transformer saved with
`save_diffusers`; `WanPipeline.from_pretrained` loads it with the real loaders."""

import dataclasses
import json
import math
import os
import pathlib
import re
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from wan_tiny_folder import FIXTURES, tiny_folder

from sparge_jax.config import AttentionConfig
from sparge_jax.files import creation_mode
from sparge_jax.models.wan import WanModel
from sparge_jax.models.wan_vae import normalize_latents
from sparge_jax.pipelines import AttentionSchedule, LayerSparsity, export_video
from sparge_jax.pipelines.wan import WanPipeline, default_flow_shift

# Small tiles so the tiny videos' 18-token sequences span several blocks.
TILES = dict(block_q=16, block_kv=16)
PROMPT, NEGATIVE = "a red fox runs through fresh snow", "blurry, static"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tiny_folder(tmp_path_factory.mktemp("wan") / "Wan-tiny")


@pytest.fixture(scope="module")
def pipe(folder):
  return WanPipeline.from_pretrained(folder, dtype=jnp.float32, attention=AttentionConfig(**TILES))


@pytest.fixture(scope="module")
def size(pipe):
  """(height, width, frames) of a small video with 3 latent frames, in multiples of 16 (which train.generate
  asks of Wan's sizes): 2 x 3 patches with Wan's VAE."""
  multiple = math.lcm(16, pipe.spatial_factor * pipe.transformer.config.patch_size[1])
  return 2 * multiple, 3 * multiple, 2 * pipe.temporal_factor + 1


@pytest.fixture(scope="module")
def inputs(pipe, size):
  """(noise, context, negative context) for `denoise`."""
  height, width, frames = size
  shape = pipe.latent_shape(1, height, width, frames)
  embeddings = pipe.encode_prompts([PROMPT, NEGATIVE])
  return jax.random.normal(jax.random.key(3), shape, jnp.float32), embeddings[:1], embeddings[1:]


def test_a_prompt_gives_a_video_file(pipe, size, tmp_path):
  height, width, frames = size
  video = pipe(PROMPT, height=height, width=width, num_frames=frames, num_steps=3, seed=1, progress=False)
  assert video.shape == (1, frames, height, width, 3) and video.dtype == np.uint8
  assert video.std() > 5  # not a constant picture
  again = pipe(PROMPT, height=height, width=width, num_frames=frames, num_steps=3, seed=1, progress=False)
  np.testing.assert_array_equal(video, again)  # the seed fixes the noise
  other = pipe(PROMPT, height=height, width=width, num_frames=frames, num_steps=3, seed=2, progress=False)
  assert np.abs(video.astype(int) - other).mean() > 1

  path = export_video(video[0], tmp_path / "fox.mp4", fps=16)
  import imageio_ffmpeg  # here, not at the top: the GPU test needs no ffmpeg

  reader = imageio_ffmpeg.read_frames(str(path))
  meta = next(reader)
  decoded = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
  assert meta["size"] == (width, height) and meta["fps"] == 16 and len(decoded) == frames
  assert [p.name for p in tmp_path.iterdir()] == ["fox.mp4"]  # no temporary file left
  assert stat.S_IMODE(path.stat().st_mode) == creation_mode()  # as open() makes files, not mkstemp's 0600


def test_decode_is_the_diffusers_vae_on_denormalized_latents(pipe):
  """The pipeline's last stage on the VAE fixture's diffusers run: latents as the transformer sees them
  (normalized) -> uint8 frames of diffusers' `vae.decode` output."""
  io = load_file(FIXTURES / "wan_vae_tiny" / "io.safetensors")
  latents = io["latents"].transpose(0, 2, 3, 4, 1)  # [batch, frames, height, width, z], as the VAE takes them
  frames = pipe.decode(normalize_latents(jnp.asarray(latents), pipe.vae.config))
  expected = np.round((np.clip(io["decoded"].transpose(0, 2, 3, 4, 1), -1, 1) + 1) * 127.5)
  assert frames.shape == expected.shape and frames.dtype == np.uint8
  assert np.abs(frames.astype(int) - expected).max() <= 1 and frames.std() > 5


def test_latent_shape_follows_size_and_frames(pipe):
  # Wan's: 81 frames at 480 x 832 -> 21 x 60 x 104 (with the real VAE's factors 4 and 8).
  t, s = pipe.temporal_factor, pipe.spatial_factor
  z = pipe.vae.config.z_dim
  assert pipe.latent_shape(2, 480, 832, 81) == (2, 80 // t + 1, 480 // s, 832 // s, z)
  for kwargs, match in (
    (dict(height=480 + s), "height"),
    (dict(width=0), "width"),
    (dict(num_frames=t + 2), "num_frames"),
  ):
    args = dict(batch=1, height=480, width=832, num_frames=81) | kwargs
    with pytest.raises(ValueError, match=match):
      pipe.latent_shape(**args)


def test_sparse_attention_keeping_every_block_equals_dense(folder, pipe, inputs):
  noise, context, negative = inputs
  dense = pipe.denoise(noise, context, negative, num_steps=3, progress=False)
  full_keep = AttentionConfig(kind="sparse", topk=1.0, topp=1.0, **TILES)
  sparse_pipe = WanPipeline.from_pretrained(folder, dtype=jnp.float32, attention=full_keep)
  sparse = sparse_pipe.denoise(noise, context, negative, num_steps=3, progress=False)
  np.testing.assert_allclose(sparse, dense, atol=2e-5, rtol=0)
  assert np.abs(np.asarray(dense) - np.asarray(noise)).max() > 0.1  # the run moved the latents


def test_layer_sparsity_at_full_keep_equals_dense_and_lower_keeps_differ(pipe, inputs):
  noise, context, _ = inputs
  model, c = pipe.transformer, pipe.transformer.config
  t = jnp.array([700.0])
  ones = jnp.ones((c.num_layers, c.num_attention_heads))
  dense = nnx.jit(lambda m: m(noise, t, context))(model)
  forward = nnx.jit(lambda m, s: m(noise, t, context, layer_sparsity=s, return_sparsity=True))
  kept, skipped = forward(model, LayerSparsity(ones, ones))
  np.testing.assert_allclose(kept, dense, atol=1e-5, rtol=0)
  np.testing.assert_allclose(skipped, 0, atol=1e-6)
  # Layer 1 sparse only: layer 0 keeps every block, layer 1 skips some, and the output changes.
  topk = ones.at[1].set(0.0)
  out, skipped = forward(model, LayerSparsity(topk, topk))
  assert float(skipped[0].max()) < 1e-6 < float(skipped[1].min())
  assert np.abs(np.asarray(out) - np.asarray(dense)).max() > 1e-4
  with pytest.raises(ValueError, match=r"layer_sparsity.topk must be \[num_layers, heads\]"):
    forward(model, LayerSparsity(ones[0], ones[0]))


def test_guidance_one_equals_the_conditional_branch(pipe, inputs):
  noise, context, negative = inputs
  single = pipe.denoise(noise, context, None, num_steps=3, progress=False)
  batched = pipe.denoise(noise, context, negative, num_steps=3, guidance=1.0, progress=False)
  np.testing.assert_allclose(batched, single, atol=2e-5, rtol=0)
  guided = pipe.denoise(noise, context, negative, num_steps=3, guidance=5.0, progress=False)
  assert np.abs(np.asarray(guided) - np.asarray(single)).max() > 1e-2  # the negative prompt matters


def test_schedule_changes_do_not_retrace_the_step(pipe, inputs, monkeypatch):
  noise, context, negative = inputs
  traces = []
  call = WanModel.__call__
  monkeypatch.setattr(WanModel, "__call__", lambda self, *a, **k: traces.append(1) or call(self, *a, **k))
  schedules = [
    AttentionSchedule(topk=0.3, topp=0.0, dense_steps=1),  # Radial / Sparse VideoGen style
    AttentionSchedule(topk=(1.0, 0.6, 0.2, 0.0), topp=0.0),  # sglang's per-step topk
    AttentionSchedule(topk=0.0, topp=0.5, dense_layers=1, dense_last_steps=1),  # xDiT style
  ]
  outputs = []
  for i, schedule in enumerate(schedules):
    guidance = 4.0 + i  # a traced argument too
    outputs.append(
      pipe.denoise(noise, context, negative, num_steps=4, guidance=guidance, schedule=schedule, progress=False)
    )
  assert len(traces) <= 1  # at most the first run traces (an earlier test may have compiled it)
  assert min(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(outputs, outputs[1:])) > 1e-4
  # A schedule that is dense throughout runs the dense kernel and gives the dense result.
  dense = pipe.denoise(noise, context, negative, num_steps=4, progress=False)
  everywhere = AttentionSchedule(dense_steps=4)
  all_dense = pipe.denoise(noise, context, negative, num_steps=4, schedule=everywhere, progress=False)
  np.testing.assert_array_equal(all_dense, dense)


def test_schedule_tables():
  schedule = AttentionSchedule(topk=(0.9, 0.5, 0.2, 0.1), topp=0.3, dense_steps=1, dense_last_steps=1, dense_layers=1)
  tables = schedule.tables(num_steps=4, num_layers=3, heads=2)
  assert tables.topk.shape == tables.topp.shape == (4, 3, 2) and tables.topk.dtype == np.float32
  np.testing.assert_allclose(tables.topk[:, :, 0], [[1, 1, 1], [1, 0.5, 0.5], [1, 0.2, 0.2], [1, 1, 1]])
  np.testing.assert_allclose(tables.topp[:, :, 1], [[1, 1, 1], [1, 0.3, 0.3], [1, 0.3, 0.3], [1, 1, 1]])
  assert not schedule.is_dense(4, 3)
  assert AttentionSchedule(dense_steps=9).is_dense(4, 3)
  assert AttentionSchedule(topk=1.0, topp=0.0).is_dense(4, 3, "topk")
  assert not AttentionSchedule(topk=1.0, topp=0.0).is_dense(4, 3, "topp")
  with pytest.raises(ValueError, match="topk has 4 per-step values, but the run has num_steps=5"):
    schedule.tables(num_steps=5, num_layers=3, heads=2)
  with pytest.raises(ValueError, match=r"topk\[1\] must be in \[0, 1\]"):
    AttentionSchedule(topk=(0.5, 1.5))
  with pytest.raises(ValueError, match="dense_layers must be an int >= 0"):
    AttentionSchedule(dense_layers=-1)


def test_bad_inputs_are_named(folder, pipe, size, inputs):
  height, width, frames = size
  call = dict(height=height, width=width, num_frames=frames, num_steps=2, progress=False)
  for kwargs, match in (
    (dict(prompt=[]), "prompt"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt"),
    (dict(num_steps=0), "num_steps"),
    (dict(seed=-1), "seed"),
    (dict(num_frames=frames + 1), "num_frames"),
  ):
    with pytest.raises(ValueError, match=match):
      pipe(**{"prompt": PROMPT, **call, **kwargs})
  noise, context, _ = inputs
  with pytest.raises(ValueError, match="negative_context"):
    pipe.denoise(noise, context, context[:, :, :-1])
  with pytest.raises(ValueError, match="guidance"):
    pipe.denoise(noise, context, context, guidance=float("nan"))
  with pytest.raises(ValueError, match="text_encoder"):
    narrow = dataclasses.replace(pipe.transformer.config, text_dim=pipe.transformer.config.text_dim + 1)
    WanPipeline.from_pretrained(folder, transformer=nnx.eval_shape(lambda: WanModel(narrow, rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match="no transformer/, text_encoder/, tokenizer/, vae/, scheduler/"):
    WanPipeline.from_pretrained(folder / "transformer")


SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from sparge_jax.config import AttentionConfig
from sparge_jax.pipelines.wan import WanPipeline

folder, out, run = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
assert jax.device_count() == 4
mesh = jax.make_mesh((1, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
pipe = WanPipeline.from_pretrained(
  folder, dtype=jnp.float32, attention=AttentionConfig(**run["tiles"]), mesh=mesh, rules=[("embed", "fsdp")]
)
# Each model's parameters live on the mesh, the large ones split four ways along their model width.
for name, param in (
  ("transformer", pipe.transformer.blocks.ffn_in.kernel), ("text_encoder", pipe.text_encoder.blocks.query.kernel),
  ("text_encoder", pipe.text_encoder.embedding.embedding),
):
  value = param[...]
  assert "fsdp" in value.sharding.spec and len(value.sharding.device_set) == 4, (name, value.sharding)
  assert value.addressable_shards[0].data.size == value.size // 4, (name, value.addressable_shards[0].data.shape)
vae_kernel = pipe.vae.decoder.conv_in.kernel[...]
assert len(vae_kernel.sharding.device_set) == 4 and vae_kernel.sharding.is_fully_replicated  # no rule: replicated

embeddings = pipe.encode_prompts(run["prompts"])
noise = jax.random.normal(jax.random.key(run["seed"]), pipe.latent_shape(1, *run["size"]), jnp.float32)
latents = pipe.denoise(noise, embeddings[:1], embeddings[1:], num_steps=run["steps"], progress=False)
np.savez(out, embeddings=embeddings, latents=latents, video=pipe.decode(latents))
"""


def test_pipeline_shards_every_model_over_a_mesh(folder, pipe, size, inputs, tmp_path):
  """On 4 CPU devices: the text encoder and transformer sharded along their width, the VAE replicated;
  every stage gives what the unsharded pipeline gives."""
  # The flags of conftest.py (cheap code generation) and four host devices; a new process for the device count.
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  root = pathlib.Path(__file__).parent.parent
  out = tmp_path / "sharded.npz"
  run = dict(tiles=TILES, prompts=[PROMPT, NEGATIVE], seed=3, size=list(size), steps=3)
  done = subprocess.run(
    [sys.executable, "-c", SHARDED, str(folder), str(out), json.dumps(run)],
    cwd=root,
    env=dict(env, PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")])),
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  sharded = np.load(out)
  noise, context, negative = inputs
  np.testing.assert_allclose(sharded["embeddings"], np.concatenate([context, negative]), atol=1e-5, rtol=0)
  latents = pipe.denoise(noise, context, negative, num_steps=3, progress=False)
  np.testing.assert_allclose(sharded["latents"], latents, atol=1e-4, rtol=0)
  video = pipe.decode(latents)
  assert sharded["video"].shape == video.shape == (1, size[2], size[0], size[1], 3)
  assert np.abs(sharded["video"].astype(int) - video).max() <= 1


def test_default_flow_shift_is_wans():
  assert default_flow_shift(480, 832) == 3.0 and default_flow_shift(720, 1280) == 5.0


def test_export_video_formats_and_errors(tmp_path):
  frames = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
  gif = export_video(frames, tmp_path / "a.gif", fps=8)
  import imageio.v3 as iio

  assert iio.imread(gif).shape == (5, 16, 24, 3)
  pngs = export_video(frames, tmp_path / "frames")
  assert stat.S_IMODE(gif.stat().st_mode) == creation_mode() and stat.S_IMODE(pngs.stat().st_mode) == creation_mode(
    0o777
  )
  assert sorted(p.name for p in pngs.iterdir()) == [f"frame_{i:05d}.png" for i in range(5)]
  np.testing.assert_array_equal(iio.imread(pngs / "frame_00003.png"), frames[3])
  for args, match in (
    ((frames, tmp_path / "a.avi"), "unknown video format"),
    ((frames, tmp_path / "missing" / "a.mp4"), "does not exist"),
    ((frames, tmp_path / "frames"), "not empty"),
    ((frames.astype(np.float32), tmp_path / "b.mp4"), "uint8"),
    ((frames[:, :15], tmp_path / "b.mp4"), "even"),
  ):
    with pytest.raises(ValueError, match=match):
      export_video(*args)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "frames"]


# ------------------------------------------------------------------------------------ train.generate


def _generate_args(folder, size, out, *extra, **options):
  height, width, frames = size
  options = {
    "model": folder, "prompt": PROMPT, "out": out, "steps": 2, "height": height, "width": width, "frames": frames,
    "dtype": "float32", **options,
  }  # fmt: skip
  return [a for name, value in options.items() for a in (f"--{name}", str(value))] + ["--no-progress", *extra]


def test_generate_command_writes_the_video(folder, size, tmp_path, capsys):
  from train import generate

  out = tmp_path / "fox.mp4"
  args = _generate_args(folder, size, out, "--sparse-topk", "0.5", "--sparse-topp", "0", "--dense-steps", "1")
  assert generate.main(args) == 0
  assert out.is_file() and "schedule attention" in capsys.readouterr().out
  import imageio_ffmpeg

  reader = imageio_ffmpeg.read_frames(str(out))
  assert next(reader)["size"] == (size[1], size[0]) and sum(1 for _ in reader) == size[2]


@pytest.mark.parametrize(
  "options, match",
  [
    (dict(out="{tmp}/missing/v.mp4"), "does not exist"),
    (dict(out="{tmp}/v.avi"), "unknown video format"),
    (dict(model="{tmp}/nothing"), "does not exist"),
    (dict(frames=10), "--frames must be 4 n [+] 1"),
    (dict(height=40), "--height must be a multiple of 16"),
    (dict(sparse_topk="1.5"), r"topk must be in \[0, 1\]"),
    (dict(dense_steps=1), "need --sparse-topk"),
    (dict(student="{tmp}"), "not a distillation workdir"),
    (dict(student_diffusers="{tmp}"), "not a diffusers folder"),
  ],
)
def test_generate_command_faults_are_one_error_line(folder, size, tmp_path, capsys, options, match):
  from train import generate

  options = {"out": tmp_path / "v.mp4"} | {k.replace("_", "-"): str(v).format(tmp=tmp_path) for k, v in options.items()}
  assert generate.main(_generate_args(folder, size, options.pop("out"), **options)) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ")
  assert re.search(match, err[0]), err[0]
  assert list(tmp_path.iterdir()) == []  # nothing written
  many_topk = _generate_args(folder, size, tmp_path / "v.mp4", "--sparse-topk", "0.1", "0.2", "0.3")
  assert generate.main(many_topk) == 1 and "--sparse-topk needs 1 or --steps" in capsys.readouterr().err


def test_generate_with_a_distilled_student(folder, pipe, size, tmp_path):
  """A workdir's newest checkpoint drives the pipeline: the video equals the pipeline run on its params."""
  from train import checkpoint, generate
  from train.configs import Config, ModelConfig, to_dict

  trained = ModelConfig.from_wan(pipe.transformer.config)
  attention = AttentionConfig(kind="sparse", topk=0.5, topp=0.0, **TILES)
  run = Config(name="tiny-student", model=trained, attention=attention)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(to_dict(run)))
  rng = np.random.default_rng(7)  # the teacher's weights, moved: a "trained" student
  params = jax.tree.map(lambda a: a + 0.05 * rng.normal(size=a.shape).astype(a.dtype), nnx.state(pipe.transformer))
  student = nnx.merge(nnx.graphdef(pipe.transformer), params)
  student.set_attention(attention)
  params = params.to_pure_dict()
  saver = checkpoint.Checkpoints(str(workdir / "checkpoints"), keep=1)
  saver.save(3, params, {"count": jnp.zeros(())}, {"step": 3})
  saver.wait()
  saver.close()

  out = tmp_path / "student"  # PNG frames: lossless
  assert generate.main(_generate_args(folder, size, out, student=workdir, seed=5)) == 0
  height, width, frames = size
  expected = WanPipeline.from_pretrained(folder, dtype=jnp.float32, transformer=student)(
    PROMPT, height=height, width=width, num_frames=frames, num_steps=2, seed=5, progress=False
  )[0]
  import imageio.v3 as iio

  np.testing.assert_array_equal(np.stack([iio.imread(p) for p in sorted(out.iterdir())]), expected)


# ------------------------------------------------------------------------------- benchmarks.generate


def test_generate_benchmark_at_a_tiny_size(tmp_path):
  from benchmarks import generate

  out = tmp_path / "results" / "generate.json"
  args = ["--model", "tiny", "--size", "tiny", "--steps", "3", "--dtype", "float32", "--out", str(out)]
  # No torch here: the baseline is "skipped". Two variants, the kernel check, then the per-step mode.
  assert generate.main([*args, "--variants", "dense", "dense-first", "--kernel-check"]) == 0
  assert generate.main([*args, "--variants", "sparse", "--per-step", "1", "--no-baseline"]) == 0
  saved = json.loads(out.read_text())
  assert saved["device"] == "cpu" and "git_commit" in saved and [p.name for p in out.parent.iterdir()] == [out.name]
  run, per_step = saved["runs"]["tiny-tiny-3steps"], saved["runs"]["tiny-tiny-per-step1"]
  assert set(run) == {"jax", "diffusers", "speedups", "commands"} and len(run["commands"]) == 1
  assert run["diffusers"] == {"skipped": "torch, diffusers not importable"}
  assert run["jax"]["tokens"] == 18 and set(run["jax"]["variants"]) == {"dense", "dense-first"}
  for record in run["jax"]["variants"].values():
    assert record["total_s"] == pytest.approx(record["text_encoding_s"] + record["denoising_s"] + record["decode_s"])
    assert record["per_step_s"] == pytest.approx(record["denoising_s"] / 3)
  schedule = run["jax"]["variants"]["dense-first"]["schedule"]
  assert schedule["topk"] == generate.SPARSE_TOPK and schedule["dense_steps"] == 1 and schedule["dense_layers"] == 1
  assert set(run["speedups"]) == {"dense-first_vs_dense_denoising"}
  assert set(run["jax"]["kernel_check"]) == {"dense_ms", "sparse_full_keep_ms", "sparse_95_ms"}
  (record,) = per_step["jax"]["variants"].values()
  assert per_step["jax"]["steps"] == 1 and "decode_s" not in record and record["per_step_s"] == record["denoising_s"]
  assert record["schedule"] == {
    "topk": generate.SPARSE_TOPK,
    "topp": 0.0,
    **dict.fromkeys(["dense_steps", "dense_last_steps", "dense_layers"], 0),
  }


def test_generate_benchmark_calls_add_up():
  from benchmarks.generate import merge_run

  def jax(**variants):
    return {
      "jax": {"tokens": 18, "variants": {k: {"denoising_s": v, "per_step_s": v / 2} for k, v in variants.items()}}
    }

  run = merge_run({}, jax(dense=4.0), "a")
  run = merge_run(run, jax(sparse=1.0), "b")
  run = merge_run(run, {"diffusers": {"per_step_s": 4.0, "total_s": 9.0}}, "a")
  assert set(run["jax"]["variants"]) == {"dense", "sparse"} and run["commands"] == ["b", "a"]
  assert run["speedups"] == {
    "sparse_vs_dense_denoising": 4.0,
    "dense_vs_diffusers_denoising": 2.0,
    "sparse_vs_diffusers_denoising": 8.0,
  }
  run = merge_run(run, jax(sparse=2.0), "c")  # run again: the newer record replaces the older
  assert run["jax"]["variants"]["sparse"]["denoising_s"] == 2.0 and run["speedups"]["sparse_vs_dense_denoising"] == 2.0


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_bf16_pipeline_full_keep_matches_dense_and_schedules_compile_once(tmp_path, monkeypatch):
  """On a GPU in bf16 with head_dim 64 and 64-token tiles (the Mosaic kernels on Hopper, Triton elsewhere)."""
  folder = tiny_folder(tmp_path / "Wan-gpu", attention_head_dim=64)
  tiles = AttentionConfig(block_q=64, block_kv=64)
  pipe = WanPipeline.from_pretrained(folder, dtype=jnp.bfloat16, attention=tiles)
  height = width = 16 * pipe.spatial_factor  # 8 x 8 patches: 64 tokens a frame, 3 frames
  shape = pipe.latent_shape(1, height, width, 2 * pipe.temporal_factor + 1)
  noise = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  embeddings = pipe.encode_prompts([PROMPT, NEGATIVE])
  run = dict(num_steps=4, progress=False)
  dense = np.asarray(pipe.denoise(noise, embeddings[:1], embeddings[1:], **run))
  traces = []
  call = WanModel.__call__
  monkeypatch.setattr(WanModel, "__call__", lambda self, *a, **k: traces.append(1) or call(self, *a, **k))
  full_keep = AttentionSchedule(topk=(1.0, 1.0, 1.0, 0.999), topp=0.0)  # not dense by the rule: the sparse kernel
  kept = np.asarray(pipe.denoise(noise, embeddings[:1], embeddings[1:], schedule=full_keep, **run))
  sparse = AttentionSchedule(topk=0.25, topp=0.0, dense_steps=1)
  pipe.denoise(noise, embeddings[:1], embeddings[1:], schedule=sparse, **run)
  assert len(traces) == 1
  assert np.abs(kept - dense).max() <= 0.03 * np.abs(dense).max()
  video = pipe.decode(jnp.asarray(kept))
  assert video.shape == (1, shape[1] * pipe.temporal_factor - pipe.temporal_factor + 1, height, width, 3)
