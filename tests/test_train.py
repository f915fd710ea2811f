"""The distillation trainer (train/distill.py): config errors, learning, sharding, resume, NaN stop.

Training runs go through `python -m train.distill` in subprocesses (so XLA flags take effect and
SIGKILL is real) sharing a persistent compilation cache, at a small size: 4 x 8 x 8 = 256 tokens.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import cli, distill, make_dataset, teacher
from train.configs import PRESETS, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
  "--config.data.frames=4",
  "--config.data.height=16",
  "--config.data.width=16",
  "--config.batch_size=8",
  "--config.data.synthetic_examples=64",
  "--config.warmup_steps=0",
  "--config.learning_rate=3e-4",
  "--config.pretrain_teacher.steps=0",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": str(cache),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": ROOT,
  }


def start(args, env, devices=1, code=None):
  # Unoptimised XLA code: these runs are a few steps each, so compile time dominates.
  env = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}
  command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "train.distill", *args]
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args, env, devices=1, code=None, expect=0):
  process = start(args, env, devices, code)
  out, err = process.communicate(timeout=600)
  assert process.returncode == expect, f"exit {process.returncode}\nstdout:\n{out}\nstderr:\n{err[-5000:]}"
  return out, err


def losses(workdir):
  """step -> loss, the last record of each step (a resumed run repeats the steps after its checkpoint)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}  # not the eval records


def final_params(workdir, step):
  """The saved student params as numpy arrays, whatever mesh they were saved from."""
  path = os.path.join(workdir, "checkpoints", str(step), "params")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target))]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--config.stepz=3"], "unknown config field --config.stepz"),
    (["--config.attention.topkk=0.1"], "unknown config field --config.attention.topkk"),
    (["--config.steps=ten"], "--config.steps: expected int, got 'ten'"),
    (["--config.steps=0"], "--config.steps=0: must be >= 1"),
    (["--config.attention.topk=1.5"], "--config.attention.topk=1.5: topk must be in [0, 1]"),
    (["--config.attention.kind=medium"], "--config.attention.kind='medium'"),
    (["--config.attention.block_kv=24"], "block_kv must be a power of two"),
    (["--config.loss=l1"], "--config.loss: 'l1' is not one of ['distill', 'diffusion']"),
    (["--config.learning_rate=-1"], "--config.learning_rate=-1.0: must be > 0"),
    (["--config.data.height=15"], "--config.data.height=15: must be a positive multiple of the patch size 2"),
    (["--config.data.shuffle=maybe"], "--config.data.shuffle: expected true/false"),
    (["--config", "huge"], "--config: unknown preset 'huge'"),
    (["--config.attention=0.1"], "--config.attention is a group"),
    (["--worksdir=x"], "unknown flag --worksdir"),
    (["--config.steps"], "--config.steps needs a value"),
  ],
)
def test_bad_config_fails_before_any_work(argv, message, tmp_path, capsys):
  workdir = tmp_path / "run"
  assert distill.main([*argv, "--workdir", str(workdir)]) == 1
  assert message in capsys.readouterr().err
  assert not workdir.exists()


def parse(argv, args_type=distill.Args, **kwargs):
  args, code = cli.parse(args_type, argv, prog="test", description="", presets=PRESETS, default="tiny", **kwargs)
  assert code is None
  return args


def test_overrides_and_presets():
  args = parse(
    [
      "--config",
      "tiny",
      "--config.steps=20",
      "--config.attention.topk",
      "0.05",
      "--config.time.shift=3",
      "--config.data.shuffle=false",
      "--workdir",
      "d",
    ]
  )
  config = args.config
  assert (config.steps, config.attention.topk, config.time.shift, config.data.shuffle) == (20, 0.05, 3.0, False)
  assert args.workdir == "d" and config.attention.topp == PRESETS["tiny"]().attention.topp
  per_head = parse(["--config.attention.topk", "0.1", "0.2"]).config
  assert per_head.attention.topk == (0.1, 0.2)
  big = parse(["--config=wan2_1_1_3b", "--config.model.remat_saves", "qkv", "ffn_hidden"]).config
  assert big.model.remat_saves == ("qkv", "ffn_hidden") and big.model.num_layers == 30
  for name, preset in PRESETS.items():
    validate(preset())
    assert preset().name == name


def test_a_config_of_ones_own_from_a_python_file_or_a_saved_config_json(tmp_path):
  from train.configs import to_dict  # noqa: PLC0415

  own = tmp_path / "my_config.py"
  own.write_text(
    "import dataclasses\nfrom train.configs import tiny\n"
    "def get_config():\n  return dataclasses.replace(tiny(), name='mine', steps=7)\n"
  )
  config = parse(["--config", str(own), "--config.seed=3"]).config
  assert (config.name, config.steps, config.seed) == ("mine", 7, 3)
  saved = tmp_path / "config.json"
  saved.write_text(json.dumps(to_dict(config)))
  assert parse([f"--config={saved}"]).config == config
  # make_dataset reads the dataset fields of the same file.
  dataset_args = parse(
    ["--config", str(saved), "--out", "o"], make_dataset.Args, project=make_dataset.DatasetConfig.from_config
  )
  assert dataset_args.config.seed == 3 and dataset_args.config.model == config.model and dataset_args.out == "o"


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--config", "missing.py"], "--config missing.py: no such file"),
    (["--config", "missing.json"], "--config missing.json: No such file or directory"),
    (["--config"], "--config needs a value"),
  ],
)
def test_a_config_file_that_cannot_be_read_is_named(argv, message, tmp_path, capsys):
  assert distill.main([*argv, "--workdir", str(tmp_path / "run")]) == 1
  assert message in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def test_help_describes_each_field_and_each_command_shows_only_its_own(capsys):
  assert distill.main(["--help"]) == 0
  distill_help = capsys.readouterr().out
  for text in ("--config.steps", "Optimizer steps in all", "--config.attention.topk", "Top-k", "--workdir"):
    assert text in distill_help
  for ignored in ("model.attention.", "model.compute_dtype", "model.batch_axes", "model.param_dtype"):
    assert ignored not in distill_help
  assert make_dataset.main(["--help"]) == 0
  dataset_help = capsys.readouterr().out
  assert "--config.frames" in dataset_help and "--num_examples" in dataset_help
  for trainer_only in ("learning_rate", "warmup_steps", "checkpoint_every", "attention.topk", "--workdir"):
    assert trainer_only not in dataset_help


# A workdir's config.json as an earlier version wrote it: the model held WanConfig's run options and the
# attention said "backend".
EARLIER_CONFIG_JSON = json.loads("""{"name": "tiny",
 "model": {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
  "out_channels": 4, "text_dim": 24, "freq_dim": 16, "ffn_dim": 64, "num_layers": 2, "cross_attn_norm": true,
  "eps": 1e-06, "rope_max_seq_len": 1024, "attention": {"kind": "dense", "topk": 0.03, "topp": 0.2,
  "mode": "hybrid", "block_q": 128, "block_kv": 64, "backend": "auto"}, "remat": false, "remat_saves": [],
  "param_dtype": "float32", "compute_dtype": "float32", "batch_axes": []},
 "attention": {"kind": "sparse", "topk": 0.1, "topp": 0.3, "mode": "hybrid", "block_q": 32, "block_kv": 16,
  "backend": "auto"},
 "teacher": "random", "pretrain_teacher": {"steps": 300, "learning_rate": 0.002}, "loss": "distill",
 "steps": 200, "batch_size": 4, "learning_rate": 0.0003, "weight_decay": 0.01, "adam_b1": 0.9, "adam_b2": 0.999,
 "grad_clip_norm": 1.0, "warmup_steps": 10, "compute_dtype": "float32", "time": {"mean": 1.5, "std": 1.6,
 "shift": 1.0}, "data": {"path": "", "shuffle": true, "synthetic_examples": 512, "frames": 8, "height": 16,
 "width": 16, "text_len": 16}, "mesh": {"data": -1, "fsdp": 1}, "checkpoint_every": 50, "keep_checkpoints": 2,
 "log_every": 1, "seed": 0}""")


def test_config_json_round_trips_and_earlier_files_still_load():
  import copy  # noqa: PLC0415

  from train.configs import Config, from_dict, to_dict  # noqa: PLC0415

  for preset in PRESETS.values():
    assert from_dict(Config, json.loads(json.dumps(to_dict(preset())))) == preset()
  assert from_dict(Config, EARLIER_CONFIG_JSON) == PRESETS["tiny"]()
  triton = copy.deepcopy(EARLIER_CONFIG_JSON)
  triton["attention"]["backend"] = "triton"
  assert from_dict(Config, triton).attention.implementation == "triton"
  for path, value, message in [
    (("model", "num_layers"), "two", "config.model.num_layers: expected int, got 'two'"),
    (("attention", "topk"), 1.5, "config.attention: topk must be in [0, 1]"),
    (("loss",), "l1", "config.loss: 'l1' is not one of ['distill', 'diffusion']"),
    (("data", "shufle"), True, "config.data: unknown field(s) ['shufle']"),
  ]:
    bad = copy.deepcopy(EARLIER_CONFIG_JSON)
    node = bad
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValueError) as error:
      from_dict(Config, bad)
    assert message in str(error.value)


def test_validating_a_config_starts_no_jax_backend():
  # So that jax.distributed.initialize, which must come before any backend, can follow the checks.
  code = (
    "from jax._src import xla_bridge; from train.configs import PRESETS, validate\n"
    "for preset in PRESETS.values(): validate(preset())\n"
    "assert not xla_bridge.backends_are_initialized()\n"
    "print('ok')"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True
  )
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
  """A short distillation from a briefly pretrained teacher: (workdir, stdout)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  out, _ = run(
    [
      *SMALL,
      "--config.pretrain_teacher.steps=150",
      "--config.pretrain_teacher.learning_rate=3e-3",
      "--config.steps=60",
      "--config.checkpoint_every=1000",
      "--workdir",
      str(workdir),
    ],
    env,
  )
  return workdir, out


def test_distillation_lowers_the_loss_on_fixed_eval_batches(trained):
  workdir, out = trained
  summary = json.load(open(workdir / "summary.json"))
  assert summary["eval_loss_after"] < 0.75 * summary["eval_loss_before"], summary
  assert 0.3 < summary["sparsity"] < 1.0 and len(summary["sparsity_per_layer"]) == 2
  assert "pretrained for 150 steps" in summary["teacher"]  # and loaded from its workdir
  teacher = json.load(open(workdir / "teacher" / "summary.json"))
  assert teacher["loss"] == "diffusion" and teacher["eval_loss_after"] < 0.5 * teacher["eval_loss_before"]
  # Outputs the summary points at exist: the final checkpoint, TensorBoard events, metrics.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["60"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  assert f"{summary['eval_loss_before']:.5g}" in out and str(workdir / "checkpoints") in out
  record = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r][-1]  # not an eval line
  assert record["step"] == 60 and record["tokens_per_s"] > 0 and 0 < record["sparsity"] < 1


def test_sample_writes_side_by_side_gif_and_psnr(trained, env):
  import imageio.v3 as iio  # noqa: PLC0415

  workdir, _ = trained
  out, _ = run(
    ["--workdir", str(workdir), "--num_videos", "2", "--num_steps", "4"],
    env,
    code="import sys; from train import sample; sys.exit(sample.main(sys.argv[1:]))",
  )
  psnr = float(out.split("PSNR student vs teacher: ")[1].split(" dB")[0])
  assert 10 < psnr < 100  # similar, not identical: the student's attention is sparse
  frames = iio.imread(workdir / "samples.gif", index=None)
  assert frames.shape == (4, 2 * 16 * 8, 3 * 16 * 8, 3)  # frames, 2 videos x H, 3 panels x W, rgb


def test_make_dataset_from_teacher_samples(trained, env, tmp_path):
  from train.data import ShardedDataset  # noqa: PLC0415

  workdir, _ = trained
  out_dir = tmp_path / "ds"
  run(
    [
      "--out",
      str(out_dir),
      "--source",
      "teacher",
      "--config.frames=4",
      "--config.height=16",
      "--config.width=16",
      "--config.batch_size=8",
      f"--config.teacher={workdir}",
      "--num_examples",
      "3",
      "--num_steps",
      "2",
      "--examples_per_shard",
      "2",
    ],
    env,
    code="import sys; from train import make_dataset; sys.exit(make_dataset.main(sys.argv[1:]))",
  )
  dataset = ShardedDataset(str(out_dir))
  assert len(dataset) == 3 and dataset.latent_shape == (4, 16, 16, 4)
  latents = np.stack([dataset.get(i)["latents"] for i in range(3)])
  assert np.isfinite(latents).all() and latents.std() > 0.1 and not np.allclose(latents[0], latents[1])


THREE_STEPS = [*SMALL, "--config.steps=3", "--config.checkpoint_every=3"]


@pytest.fixture(scope="module")
def one_device(env, tmp_path_factory):
  """Three steps on one device, the reference for the sharded and multi-process runs."""
  workdir = tmp_path_factory.mktemp("one_device") / "run"
  run([*THREE_STEPS, "--workdir", str(workdir)], env, devices=1)
  return workdir


@pytest.mark.slow
def test_sharded_step_equals_single_device_step(env, tmp_path, one_device):
  run(
    [*THREE_STEPS, "--config.mesh.data=2", "--config.mesh.fsdp=4", "--workdir", str(tmp_path / "eight")], env, devices=8
  )
  assert "8 x cpu (mesh data=2, fsdp=4)" in json.load(open(tmp_path / "eight" / "summary.json"))["devices"]
  one, eight = losses(one_device), losses(tmp_path / "eight")
  np.testing.assert_allclose([eight[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5)
  p1, p8 = final_params(one_device, 3), final_params(tmp_path / "eight", 3)
  assert len(p1) == len(p8) > 20
  for a, b in zip(p1, p8):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def wait_for_steps(process, workdir, steps, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert process.poll() is None, process.communicate()[1][-3000:]
    if os.path.exists(workdir / "metrics.jsonl") and len(losses(workdir)) >= steps:
      return
    time.sleep(0.05)
  raise TimeoutError(f"{workdir} did not reach step {steps}")


# Starts the save of step 6, then dies before orbax can finish it in the background.
KILL_DURING_SAVE = """
import os, signal, sys
from train import checkpoint, distill
save = checkpoint.Checkpoints.save
def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpoints.save = save_then_die
sys.exit(distill.main(sys.argv[1:]))
"""


def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(env, tmp_path):
  args = [*SMALL, "--config.steps=10", "--config.checkpoint_every=2", "--config.keep_checkpoints=2"]
  run([*args, "--workdir", str(tmp_path / "straight")], env)
  expected = losses(tmp_path / "straight")
  assert sorted(expected) == list(range(1, 11))

  # Killed between saves, at step >= 5: resumes from the newest complete checkpoint.
  killed = tmp_path / "killed"
  process = start([*args, "--workdir", str(killed)], env)
  wait_for_steps(process, killed, 5)
  process.send_signal(signal.SIGKILL)
  process.wait()
  run([*args, "--workdir", str(killed)], env)
  summary = json.load(open(killed / "summary.json"))
  # Step 4's (asynchronous) save may still have been in flight at the kill; then step 2 is the newest.
  assert summary["resumed_from_step"] in (2, 4, 6, 8)
  assert losses(killed) == expected

  # Killed while the step-6 checkpoint is being written.
  mid_save = tmp_path / "mid_save"
  run([*args, "--workdir", str(mid_save)], env, code=KILL_DURING_SAVE, expect=-signal.SIGKILL)
  run([*args, "--workdir", str(mid_save)], env)
  assert json.load(open(mid_save / "summary.json"))["resumed_from_step"] in (2, 4, 6)
  assert losses(mid_save) == expected
  assert sorted(os.listdir(mid_save / "checkpoints")) == ["10", "8"]  # keep_checkpoints=2, no temporaries
  for a, b in zip(final_params(mid_save, 10), final_params(tmp_path / "straight", 10)):
    np.testing.assert_array_equal(a, b)


def test_nonfinite_loss_stops_with_message_and_keeps_checkpoints(env, tmp_path):
  workdir = tmp_path / "run"
  _, err = run(
    [
      *SMALL,
      "--config.steps=20",
      "--config.checkpoint_every=1",
      "--config.keep_checkpoints=100",
      "--config.learning_rate=1e30",
      "--config.grad_clip_norm=0",
      "--workdir",
      str(workdir),
    ],
    env,
    expect=1,
  )
  assert "is not finite; stopped without saving" in err
  steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
  failed = max(losses(workdir)) + 1  # the failing step is not recorded
  assert steps and steps[-1] == failed - 1 < 20
  assert f"Last good checkpoint: {workdir / 'checkpoints' / str(steps[-1])}" in err


@pytest.mark.slow
def test_two_processes_train_together_like_one(env, tmp_path, one_device):
  """jax.distributed on localhost (CPU, gloo): 2 processes x 1 device, batch rows split between them."""
  import socket  # noqa: PLC0415

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "multi"
  processes = [
    start(
      [
        *THREE_STEPS,
        "--workdir",
        str(workdir),
        "--coordinator_address",
        f"localhost:{port}",
        "--num_processes",
        "2",
        "--process_id",
        str(i),
      ],
      env,
      devices=1,
    )
    for i in range(2)
  ]
  for i, process in enumerate(processes):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, f"process {i}:\n{err[-5000:]}"
  assert "2 x cpu (mesh data=2, fsdp=1), 2 process(es)" in json.load(open(workdir / "summary.json"))["devices"]
  multi, single = losses(workdir), losses(one_device)
  np.testing.assert_allclose([multi[s] for s in (1, 2, 3)], [single[s] for s in (1, 2, 3)], rtol=1e-5)
  for a, b in zip(final_params(workdir, 3), final_params(one_device, 3)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_teacher_from_a_diffusers_folder(tmp_path):
  import dataclasses  # noqa: PLC0415

  from flax import nnx  # noqa: PLC0415

  from sparge_jax.models.wan import WanModel, save_diffusers  # noqa: PLC0415
  from train import models, sharding  # noqa: PLC0415

  config = PRESETS["tiny"]()
  teacher_config, _ = models.model_configs(config)
  saved = WanModel(teacher_config, rngs=nnx.Rngs(7))
  save_diffusers(saved, tmp_path / "transformer")
  mesh = sharding.make_mesh(-1, 1)
  abstract = nnx.state(nnx.eval_shape(lambda: WanModel(teacher_config, rngs=nnx.Rngs(0))))
  shardings = sharding.param_shardings(abstract, mesh)
  params, description = teacher.load_teacher(
    str(tmp_path / "transformer"), teacher_config, abstract.to_pure_dict(), shardings, 0, mesh
  )
  assert "diffusers weights" in description
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(saved).to_pure_dict())):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  wider = dataclasses.replace(teacher_config, num_layers=3)
  abstract = nnx.state(nnx.eval_shape(lambda: WanModel(wider, rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match="the checkpoint has {'num_layers': 2}"):
    teacher.load_teacher(
      str(tmp_path / "transformer"), wider, abstract.to_pure_dict(), sharding.param_shardings(abstract, mesh), 0, mesh
    )
