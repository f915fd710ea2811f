"""Faults injected into whole runs of the commands (`python -m train.distill`, `train.sample`,
`train.make_dataset` in subprocesses, as a user runs them).

Each test asserts the outcome (resumed or stopped), the message, and that nothing was lost: a checkpoint
that remains restores bit for bit, a resumed run reproduces the uninterrupted one's losses and arrays. One
4-step run (checkpoints at steps 2 and 4) is shared and copied.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fault_helpers import in_read_only_folder

from train import distill, make_dataset, sample

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
  "--config.checkpoint_every=2",
  "--config.keep_checkpoints=3",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": ROOT,
    # Unoptimised XLA code: these runs are a few steps each, so compile time dominates.
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
  }


def start(args, env, code=None):
  command = [sys.executable, *(["-c", code] if code else ["-m", "train.distill"]), *SMALL, *args]
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args, env, code=None, timeout=600):
  process = start(args, env, code)
  try:
    out, err = process.communicate(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()
      process.communicate()
  return process.returncode, out, err


def steps_logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if "loss" in r]  # the training lines, not the eval ones


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}  # not the eval records


def saved_arrays(workdir, step):
  """The params and optimizer state of checkpoint `step`, as numpy arrays in leaf order."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  arrays = []
  with ocp.StandardCheckpointer() as checkpointer:
    for item in ("params", "opt_state"):
      path = os.path.join(workdir, "checkpoints", str(step), item)
      metadata = checkpointer.metadata(path).item_metadata
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
      arrays += [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target))]
  return arrays


def assert_same_checkpoint(workdir, reference, step):
  """Checkpoint `step` of `workdir` holds the arrays of `reference`'s, bit for bit."""
  ours, theirs = saved_arrays(workdir, step), saved_arrays(reference, step)
  assert len(ours) == len(theirs) > 20
  for a, b in zip(ours, theirs):
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def snapshot(workdir):
  """Every file's bytes under `workdir` (checkpoints included), to show that nothing changed."""
  files = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


@pytest.fixture(scope="module")
def finished(env, tmp_path_factory):
  """A finished 4-step run: checkpoints 2 and 4, metrics for steps 1-4."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  code, out, err = run(["--config.steps=4", "--workdir", str(workdir)], env)
  assert code == 0, err[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  return workdir


@pytest.fixture
def copy(finished, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(finished, target)
  return target


def test_a_run_that_fails_before_its_first_save_leaves_no_checkpoints_directory(env, tmp_path):
  workdir = tmp_path / "run"
  code, _, err = run(["--config.steps=2", "--config.teacher=/nonexistent/teacher", "--workdir", str(workdir)], env)
  assert code == 1
  assert err.splitlines() == [
    "error: --config.teacher='/nonexistent/teacher': no such file or directory (use 'random', a diffusers "
    "Wan transformer folder, or a workdir of ours)"
  ]
  assert not os.path.exists(workdir / "checkpoints")


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--config.model.num_layers=0"], "--config.model.num_layers=0: must be >= 1"),
    (["--config.model.num_attention_heads=0"], "--config.model.num_attention_heads=0: must be >= 1"),
    (["--config.batch_size=0"], "--config.batch_size=0: must be >= 1"),
    (["--config.seed=-1"], "--config.seed=-1: must be >= 0"),
    (["--config.learning_rate=inf"], "--config.learning_rate=inf: must be > 0 and finite"),
    (["--config.time.mean=nan"], "--config.time.mean=nan: must be finite"),
    (["--config.model.rope_max_seq_len=4"], "--config.model.rope_max_seq_len=4: must cover the data's patch grid"),
    (["--allow-config-change=sead"], "--allow-config-change: ['sead'] are not config fields"),
  ],
)
def test_bad_values_stop_before_the_workdir_is_made(argv, message, tmp_path, capsys):
  workdir = tmp_path / "run"
  assert distill.main([*SMALL, *argv, "--workdir", str(workdir)]) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
  assert not workdir.exists()


def test_a_resume_that_fails_after_restoring_exits_at_once_and_keeps_the_checkpoints(env, copy):
  before = snapshot(copy / "checkpoints")
  args = ["--config.steps=6", "--config.teacher=/nonexistent/teacher", "--allow-config-change=teacher"]
  code, _, err = run([*args, "--workdir", str(copy)], env, timeout=120)  # the manager is open: no hang
  assert code == 1
  assert err.splitlines() == [  # no orbax thread's traceback
    "error: --config.teacher='/nonexistent/teacher': no such file or directory (use 'random', a diffusers "
    "Wan transformer folder, or a workdir of ours)"
  ]
  assert snapshot(copy / "checkpoints") == before


def test_a_damaged_newest_checkpoint_is_moved_aside_and_training_resumes_from_the_previous(env, finished, copy):
  data_files = [
    os.path.join(folder, name)
    for folder, _, names in os.walk(copy / "checkpoints" / "4" / "params")
    for name in names
    if os.path.basename(folder) == "d"
  ]
  for path in data_files:
    os.truncate(path, os.path.getsize(path) // 2)
  code, _, err = run(["--config.steps=4", "--workdir", str(copy)], env)
  assert code == 0, err[-3000:]
  warnings = [line for line in err.splitlines() if line.startswith(("warning:", "error:"))]
  assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint step 4 is damaged (params ")
  assert warnings[0].endswith("resuming from step 2")
  assert os.path.isdir(copy / "checkpoints" / "damaged" / "4-params-unreadable")
  assert json.load(open(copy / "summary.json"))["resumed_from_step"] == 2
  assert steps_logged(copy) == [1, 2, 3, 4]  # each step once
  assert losses(copy) == losses(finished)  # an exact resume: nothing was lost
  assert_same_checkpoint(copy, finished, 2)
  assert_same_checkpoint(copy, finished, 4)


def test_a_changed_config_stops_the_resume_unless_allowed_and_the_change_is_recorded(env, copy):
  before = snapshot(copy)
  code, _, err = run(["--config.steps=6", "--config.seed=1", "--workdir", str(copy)], env)
  assert code == 1
  assert err.splitlines() == [
    "error: the config differs from the checkpoint at step 4 being resumed in 1 field(s): seed: 0 -> 1. Resume "
    "with the stored values, start a new --workdir, or pass --allow-config-change=seed to change them (recorded "
    "in the workdir's history.jsonl)"
  ]
  assert snapshot(copy) == before
  code, _, err = run(["--config.steps=6", "--config.seed=1", "--allow-config-change=seed", "--workdir", str(copy)], env)
  assert code == 0, err[-3000:]
  history = [json.loads(line) for line in open(copy / "history.jsonl")]
  assert [r["event"] for r in history[-2:]] == ["config_change", "resume"]
  assert {"step": 4, "changes": {"seed": [0, 1]}}.items() <= history[-2].items()
  assert steps_logged(copy) == [1, 2, 3, 4, 5, 6]


def test_a_finished_run_asked_for_fewer_steps_says_so_and_changes_nothing(env, copy):
  before = snapshot(copy)
  code, out, err = run(["--config.steps=2", "--workdir", str(copy)], env)
  assert code == 1
  assert err.splitlines() == [
    "error: the workdir is already at step 4, past --config.steps=2; nothing was changed (pass --config.steps "
    "above 4 to train further, or use a new --workdir)"
  ]
  assert snapshot(copy) == before


def test_a_finished_run_asked_for_the_same_steps_is_complete_and_rewrites_nothing(env, copy):
  before = snapshot(copy)
  code, out, err = run(["--config.steps=4", "--workdir", str(copy)], env)
  assert code == 0 and err == "", err[-3000:]
  assert out.splitlines() == [
    f"{copy} is already complete at step 4; nothing to do (pass a larger --config.steps to train further)"
  ]
  after = snapshot(copy)
  history, history_before = after.pop("history.jsonl"), before.pop("history.jsonl")
  assert after == before  # checkpoints, metrics.jsonl, summary.json, config.json
  assert history.startswith(history_before)
  assert [json.loads(line)["event"] for line in history[len(history_before) :].splitlines()] == ["already_complete"]


def test_a_read_only_workdir_stops_before_any_work(copy):
  argv = [*SMALL, "--config.steps=6", "--workdir", str(copy)]
  result, reason = in_read_only_folder(copy, f"import sys; from train import distill; sys.exit(distill.main({argv!r}))")
  assert result.returncode == 1
  assert result.stderr.splitlines() == [f"error: --workdir {copy}: cannot write in {copy} ({reason})"]


# The command with its long part replaced by a failure: the test shows the outputs are checked before it.
WITHOUT_THE_WORK = """
import sys
from train import {module}
def work(*args, **kwargs):
  raise AssertionError("the work started before the output was checked")
{replaced} = work
sys.exit({module}.main({argv!r}))
"""


def test_sample_checks_its_output_before_sampling(finished, tmp_path):
  folder = tmp_path / "read-only"
  folder.mkdir()
  out = folder / "samples.gif"
  code = WITHOUT_THE_WORK.format(
    module="sample",
    replaced="sample.load_models = sample.sample_models",
    argv=["--workdir", str(finished), "--out", str(out)],
  )
  result, reason = in_read_only_folder(folder, code)
  assert result.returncode == 1
  assert result.stderr.splitlines() == [f"error: --out {out}: cannot write in {folder} ({reason})"]


@pytest.mark.parametrize(
  "config, message",
  [
    ("{", "Expecting property name enclosed in double quotes"),
    ('{"name": 1}', "config.name: expected str, got 1"),
  ],
)
def test_sample_names_a_damaged_config_json(finished, tmp_path, capsys, monkeypatch, config, message):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  (workdir / "config.json").write_text(config)
  monkeypatch.setattr(sample, "load_models", lambda *a, **k: pytest.fail("read past a damaged config.json"))
  assert sample.main(["--workdir", str(workdir)]) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {workdir / 'config.json'}: {message}"), err


def test_make_dataset_checks_its_output_before_sampling(tmp_path, capsys):
  folder = tmp_path / "read-only"
  folder.mkdir()
  out = folder / "dataset"
  argv = ["--out", str(out), "--source", "teacher", "--num_examples", "2"]
  code = WITHOUT_THE_WORK.format(
    module="make_dataset",
    replaced="make_dataset.write_dataset = make_dataset.teacher_examples = make_dataset.synthetic",
    argv=argv,
  )
  result, reason = in_read_only_folder(folder, code)
  assert result.returncode == 1
  assert result.stderr.splitlines() == [f"error: --out {out}: cannot write in {folder} ({reason})"]
  (tmp_path / "exists").mkdir()
  assert make_dataset.main(["--out", str(tmp_path / "exists"), "--num_examples", "2"]) == 1
  assert capsys.readouterr().err.splitlines() == [
    f"error: --out {tmp_path / 'exists'}: already exists; choose a new directory"
  ]
  assert os.listdir(tmp_path / "exists") == []


def test_a_run_with_a_pretrained_teacher_is_checked_before_the_teacher_is_touched(env, tmp_path):
  workdir = tmp_path / "run"
  pretrain = ["--config.pretrain_teacher.steps=2", "--workdir", str(workdir)]
  code, _, err = run(["--config.steps=2", *pretrain], env)
  assert code == 0, err[-3000:]
  before = snapshot(workdir)
  code, _, err = run(["--config.steps=4", *pretrain, "--config.pretrain_teacher.steps=3"], env)
  assert code == 1
  assert err.splitlines() == [
    "error: the config differs from the checkpoint at step 2 being resumed in 1 field(s): pretrain_teacher.steps: "
    "2 -> 3. Resume with the stored values, start a new --workdir, or pass "
    "--allow-config-change=pretrain_teacher.steps to change them (recorded in the workdir's history.jsonl)"
  ]
  assert snapshot(workdir) == before  # the teacher was not trained further
  code, out, err = run(["--config.steps=4", *pretrain], env)
  assert code == 0, err[-3000:]
  assert "pretraining the teacher" not in out
  teacher_history = [json.loads(line)["event"] for line in open(workdir / "teacher" / "history.jsonl")]
  assert teacher_history == ["start", "already_complete"]  # checked like any resume, and left as it was
  assert {k: v for k, v in snapshot(workdir / "teacher").items() if k != "history.jsonl"} == {
    k.removeprefix("teacher/"): v
    for k, v in before.items()
    if k.startswith("teacher/") and k != "teacher/history.jsonl"
  }
  assert json.load(open(workdir / "summary.json"))["resumed_from_step"] == 2


def test_a_second_trainer_on_the_same_workdir_stops_at_once_naming_the_first(env, copy):
  first = start(["--config.steps=1000", "--workdir", str(copy)], env)
  try:
    deadline = time.time() + 300
    while len(steps_logged(copy)) <= 4:  # the first trainer is training
      assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
      time.sleep(0.1)
    code, _, err = run(["--config.steps=1000", "--workdir", str(copy)], env, timeout=30)  # at once
    assert code == 1
    assert len(err.splitlines()) == 1
    assert err.startswith(
      f"error: --workdir {copy} is in use by pid {first.pid} on host {socket.gethostname()}, since "
    )
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()


def test_a_workdir_that_is_a_file_stops_with_one_line(env, tmp_path):
  (tmp_path / "file").write_text("not a folder")
  code, _, err = run(["--config.steps=2", "--workdir", str(tmp_path / "file")], env)
  assert code == 1
  assert err.splitlines() == [f"error: --workdir {tmp_path / 'file'}: exists and is not a directory"]


FULL_DISK_AT_STEP_4 = """
import errno, os, sys
import orbax.checkpoint as ocp
from train import distill
write = ocp.JsonCheckpointHandler._save_fn
async def full_disk_at_step_4(self, x, directory):
    if any(part == "4" or part.startswith("4.") for part in directory.parts):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
    await write(self, x, directory)
ocp.JsonCheckpointHandler._save_fn = full_disk_at_step_4
sys.exit(distill.main(sys.argv[1:]))
"""


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so(env, tmp_path, finished):
  workdir = tmp_path / "run"
  code, _, err = run(["--config.steps=4", "--workdir", str(workdir)], env, code=FULL_DISK_AT_STEP_4)
  assert code == 1
  assert err.splitlines()[-1:] == [
    f"error: saving checkpoint step 4 in {workdir / 'checkpoints'} failed (the disk is full); the previous "
    f"checkpoint, step 2 ({workdir / 'checkpoints' / '2'}), is kept. Fix the cause (free space) and run again to "
    "resume from there"
  ]
  assert len(err.splitlines()) == 1, err[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  code, _, err = run(["--config.steps=4", "--workdir", str(workdir)], env)  # space again: resumes from step 2
  assert code == 0, err[-3000:]
  assert losses(workdir) == losses(finished) and steps_logged(workdir) == [1, 2, 3, 4]
  assert_same_checkpoint(workdir, finished, 2)
  assert_same_checkpoint(workdir, finished, 4)


# Dies right after starting the save of step 6: the metrics of steps 5 and 6 are written, step 4 is complete.
KILL_AT_SAVE_6 = """
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


def test_a_run_killed_during_a_save_resumes_exactly_and_logs_each_step_once(env, finished, copy):
  code, _, _ = run(["--config.steps=8", "--workdir", str(copy)], env, code=KILL_AT_SAVE_6)
  assert code == -signal.SIGKILL
  before_kill = losses(copy)
  assert sorted(before_kill) == [1, 2, 3, 4, 5, 6]
  code, _, err = run(["--config.steps=8", "--workdir", str(copy)], env)
  assert code == 0, err[-3000:]
  assert json.load(open(copy / "summary.json"))["resumed_from_step"] in (4, 6)  # 6 if its save finished in time
  assert steps_logged(copy) == list(range(1, 9))
  after = losses(copy)
  assert {s: after[s] for s in before_kill} == before_kill  # steps 5 and 6 again, the same
  assert_same_checkpoint(copy, finished, 4)
