"""Faults injected into checkpoints (damaged steps, a full disk), the error reporting of commands, and a
resume that puts them together.

Each test asserts the outcome (resumed, refused or stopped), the message, and that nothing was lost: the
checkpoint that remains restores bit for bit. A real full disk needs a mount: it runs in a user mount
namespace (``unshare -Urm``) where the machine allows one, and is skipped elsewhere. The other fault
tests: tests/test_faults_workdir.py (paths, lock, identity), tests/test_faults_loaders.py (safetensors,
dataset shards) and tests/test_faults_trainer.py (whole trainer runs).
"""

import errno
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from fault_helpers import in_mount_namespace, needs_mount_namespace

from train import checkpoint, errors, identity, resume, workdir

DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


# ----------------------------------------------------------------------------- checkpoints


def _params(seed: int) -> dict:
  """Random params of several dtypes, on shapes that are not powers of two. The kernel is large enough
  that its values are most of the bytes of its data file (``_flip_bytes`` hits them)."""
  k = jax.random.split(jax.random.key(seed), 3)
  return {
    "dense": {"kernel": jax.random.normal(k[0], (129, 257)), "bias": jax.random.normal(k[1], (257,))},
    "table": jax.random.normal(k[2], (3, 11)).astype(jnp.bfloat16),
  }


OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))


def _state(seed: int):
  """(params, opt_state) after one update with random gradients: no zero moments."""
  params = _params(seed)
  grads = jax.tree.map(lambda x: x * 0.5 + 1, _params(seed + 100))
  updates, opt_state = OPTIMIZER.update(grads, OPTIMIZER.init(params), params)
  return optax.apply_updates(params, updates), opt_state


def _meta(step: int) -> dict:
  return {"step": step, "data_position": 8 * step, "rng": [0, 17 + step], "config": {"seed": 3, "steps": 10}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=DEVICE), tree)


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save(directory, steps, keep=3) -> dict:
  saved = {}
  with checkpoint.Checkpoints(str(directory), keep=keep) as checkpoints:
    for step in steps:
      params, opt_state = _state(step)
      checkpoints.save(step, params, opt_state, _meta(step))
      saved[step] = (params, opt_state)
  return saved


def _files(folder, data_only=False):
  files = [f for f in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(f)]
  # Array values live in the OCDBT data files (d/<hash>); the rest is metadata.
  return [f for f in files if os.path.basename(os.path.dirname(f)) == "d"] if data_only else files


def _truncate(folder, data_only=False):
  for f in _files(folder, data_only):
    os.truncate(f, os.path.getsize(f) // 2)


def _overwrite(folder, data_only=False):
  for f in _files(folder, data_only):
    with open(f, "wb") as out:
      out.write(np.random.default_rng(0).bytes(os.path.getsize(f)))


def _flip_bytes(folder):
  """Flips bytes in the middle of the largest data file: the header and its b-tree stay intact."""
  size, largest = max((os.path.getsize(f), f) for f in _files(folder, data_only=True))
  with open(largest, "r+b") as f:
    f.seek(size // 2)
    byte = f.read(1)
    f.seek(size // 2)
    f.write(bytes([byte[0] ^ 0xFF]))


def _edit_meta(folder):
  """A valid JSON meta with one value changed."""
  path = os.path.join(folder, "metadata")
  with open(path) as f:
    meta = json.load(f)
  meta["data_position"] += 8
  with open(path, "w") as f:
    json.dump(meta, f)


DAMAGE = {
  "truncate": _truncate,
  "overwrite": _overwrite,
  "delete": shutil.rmtree,
  "truncate_data": lambda folder: _truncate(folder, data_only=True),
  "overwrite_data": lambda folder: _overwrite(folder, data_only=True),
  "flip_bytes": _flip_bytes,
  "edit": _edit_meta,
}
CASES = [
  *[(item, d) for item in ("params", "opt_state") for d in DAMAGE if d != "edit"],
  *[("meta", d) for d in ("truncate", "overwrite", "delete", "edit")],
]
# What each damage is reported as: the reason in the damaged/ folder name.
KIND = {
  "truncate": "unreadable",
  "overwrite": "unreadable",
  "delete": "missing",
  "truncate_data": "unreadable",
  "overwrite_data": "unreadable",
  "flip_bytes": "checksum",
  "edit": "checksum",
}


@pytest.mark.parametrize("item, damage", CASES)
def test_damaged_newest_step_is_moved_aside_and_the_previous_restores_bit_for_bit(tmp_path, capfd, item, damage):
  directory = tmp_path / "checkpoints"
  saved = _save(directory, [1, 2])
  DAMAGE[damage](str(directory / "2" / item))
  capfd.readouterr()
  params_1, opt_state_1 = saved[1]

  with checkpoint.Checkpoints(str(directory), keep=3) as checkpoints:
    restored = checkpoints.restore_latest(_abstract(params_1), _abstract(opt_state_1))
    assert restored.step == 1
    _assert_same(restored.params, params_1)
    _assert_same(restored.opt_state, opt_state_1)
    assert {k: restored.meta[k] for k in _meta(1)} == _meta(1)
    moved = str(directory / "damaged" / f"2-{item}-{KIND[damage]}")
    assert restored.moved_aside == [moved]
    assert checkpoints.steps() == [1]
    # Training goes on: the same step can be saved again beside the damaged copy.
    checkpoints.save(2, *saved[2], _meta(2))
  err = capfd.readouterr().err.splitlines()
  assert len(err) == 1, err
  assert err[0].startswith(f"warning: checkpoint step 2 is damaged ({item} ") and err[0].endswith(
    "resuming from step 1"
  )
  assert moved in err[0]
  if damage != "delete":  # kept for a post-mortem, not deleted
    assert os.path.isdir(os.path.join(moved, item)) and _files(os.path.join(moved, item))
  with checkpoint.Checkpoints(str(directory), keep=3) as checkpoints:
    assert checkpoints.steps() == [1, 2]
    _assert_same(checkpoints.restore(2, _abstract(params_1), _abstract(opt_state_1))[0], saved[2][0])


def test_when_no_step_restores_one_error_names_each_and_nothing_moves(tmp_path):
  directory = tmp_path / "checkpoints"
  saved = _save(directory, [1, 2])
  _truncate(str(directory / "2" / "params"))
  shutil.rmtree(directory / "1" / "meta")
  with checkpoint.Checkpoints(str(directory), keep=3) as checkpoints:
    with pytest.raises(errors.CommandError) as e:
      checkpoints.restore_latest(_abstract(saved[1][0]), _abstract(saved[1][1]))
  message = str(e.value)
  assert "\n" not in message and f"no checkpoint in {directory} restores" in message
  assert "step 2: params cannot be read" in message or "step 2: params metadata cannot be read" in message
  assert "step 1: meta is missing" in message and "Nothing was moved" in message
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_arrays_unlike_the_run_are_damage_never_a_silent_cast(tmp_path, capfd):
  directory = tmp_path / "checkpoints"
  saved = _save(directory, [1])
  params, opt_state = saved[1]
  with checkpoint.Checkpoints(str(directory), keep=3) as checkpoints:
    # A newer step written by another model: a bf16 kernel where the run has float32 (orbax would cast).
    other = {**params, "dense": {**params["dense"], "kernel": params["dense"]["kernel"].astype(jnp.bfloat16)}}
    assert other["dense"]["kernel"].shape == (129, 257)
    checkpoints.save(2, other, opt_state, _meta(2))
  with checkpoint.Checkpoints(str(directory), keep=3) as checkpoints:
    restored = checkpoints.restore_latest(_abstract(params), _abstract(opt_state))
    assert restored.step == 1
    _assert_same(restored.params, params)
  err = capfd.readouterr().err
  assert "params stores dense.kernel as bfloat16[129, 257], the run has float32[129, 257]" in err
  assert os.path.isdir(directory / "damaged" / "2-params-mismatch")

  expected = {"dense": {"kernel": jax.ShapeDtypeStruct((5, 8), jnp.float32)}}
  assert checkpoint.tree_problem({"dense": {"kernel": params["dense"]["kernel"]}}, expected) == (
    "stores dense.kernel as float32[129, 257], the run has float32[5, 8]"
  )
  assert checkpoint.tree_problem({}, expected) == "lacks 1 of the run's arrays (first: dense.kernel)"
  assert checkpoint.tree_problem({"x": params["table"], **expected}, expected).startswith("has 1 arrays")


@pytest.mark.parametrize(
  "change, problem",
  [
    (lambda m: m.pop("rng"), "has no 'rng'"),
    (lambda m: m.update(step="2"), "'step' is '2', not a JSON integer"),
    (lambda m: m.update(step=3), "says step 3, in the directory of step 2"),
    (lambda m: m.update(data_position=-8), "'data_position' is -8, negative"),
    (lambda m: m.update(rng=[0, -1]), "'rng' is not a list of uint32 key words"),
    (lambda m: m.update(config=[1]), "'config' is [1], not a JSON dict"),
    (lambda m: m.update(checksums={"params": {"a": "x"}}), "'checksums' is not"),
  ],
)
def test_meta_problems_are_named(change, problem):
  meta = _meta(2)
  assert checkpoint.meta_problem(meta, 2) is None
  change(meta)
  assert checkpoint.meta_problem(meta, 2).startswith(problem)
  assert checkpoint.meta_problem([meta], 2) == "is a JSON list, not an object"


def test_an_error_of_check_meta_passes_through_and_moves_nothing(tmp_path):
  directory = tmp_path / "checkpoints"
  saved = _save(directory, [1, 2])

  def refuse(meta):
    identity.check_resume(meta["config"], {**meta["config"], "seed": 4}, step=meta["step"])

  with checkpoint.Checkpoints(str(directory), keep=3) as checkpoints:
    with pytest.raises(identity.ConfigChanged, match="at step 2 being resumed in 1 field"):
      checkpoints.restore_latest(_abstract(saved[1][0]), _abstract(saved[1][1]), check_meta=refuse)
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_no_directory_until_the_first_save_and_no_threads_after_close(tmp_path):
  directory = tmp_path / "run" / "checkpoints"
  with pytest.raises(ValueError, match="teacher"):
    with checkpoint.Checkpoints(str(directory), keep=2) as checkpoints:
      assert checkpoints.latest_step() is None and checkpoints.steps() == []
      raise ValueError("no teacher")  # a run that fails before its first save
  assert not os.path.exists(tmp_path / "run")
  _save(directory, [1])
  assert sorted(os.listdir(directory)) == ["1"]
  assert not checkpoint.orbax_threads()
  (tmp_path / "file").write_text("")
  with pytest.raises(errors.CommandError, match="exists and is not a directory"):
    checkpoint.Checkpoints(str(tmp_path / "file"), keep=1)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capfd):
  """ENOSPC injected into orbax's JSON writer, with keep=1: the only older step must survive."""
  directory = tmp_path / "checkpoints"
  saved = _save(directory, [1], keep=1)
  params, opt_state = saved[1]

  async def full_disk(self, x, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))

  capfd.readouterr()
  checkpoints = checkpoint.Checkpoints(str(directory), keep=1)
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)
  with pytest.raises(checkpoint.SaveFailed) as e:
    checkpoints.save(2, *_state(2), _meta(2))
    checkpoints.wait()
  monkeypatch.undo()
  checkpoints.close()
  assert str(e.value) == (
    f"saving checkpoint step 2 in {directory} failed (the disk is full); the previous checkpoint, step 1 "
    f"({directory / '1'}), is kept. Fix the cause (free space) and run again to resume from there"
  )
  assert capfd.readouterr().err == ""  # orbax's thread tracebacks are not printed
  assert sorted(os.listdir(directory)) == ["1"]  # the temporary directory is gone too
  assert not checkpoint.orbax_threads()
  with checkpoint.Checkpoints(str(directory), keep=1) as checkpoints:
    restored = checkpoints.restore_latest(_abstract(params), _abstract(opt_state))
  assert restored.step == 1 and not restored.moved_aside
  _assert_same(restored.params, params)
  _assert_same(restored.opt_state, opt_state)


FULL_DISK = """
import sys, jax, jax.numpy as jnp, numpy as np
from train import checkpoint, errors
directory = sys.argv[1] + "/checkpoints"
params = {"w": jax.random.normal(jax.random.key(0), (150_000,))}  # 600 kB: one fits in 1 MB, two do not
meta = lambda step: {"step": step, "data_position": 0, "rng": [0, step], "config": {}}

@errors.command
def main():
  with checkpoint.Checkpoints(directory, keep=1) as checkpoints:
    for step in (1, 2):
      checkpoints.save(step, jax.tree.map(lambda x: x + step, params), {"count": jnp.int32(step)}, meta(step))

code = main()
device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
target = {"w": jax.ShapeDtypeStruct((150_000,), jnp.float32, sharding=device)}
with checkpoint.Checkpoints(directory, keep=1) as checkpoints:
  restored = checkpoints.restore_latest(target, {"count": jax.ShapeDtypeStruct((), jnp.int32, sharding=device)})
print(code, restored.step, bool(np.array_equal(restored.params["w"], params["w"] + 1)))
"""


@needs_mount_namespace
def test_full_disk_on_a_real_one_megabyte_tmpfs(tmp_path):
  result = in_mount_namespace('mount -t tmpfs -o size=1m tmpfs "$0"', tmp_path, FULL_DISK)
  assert result.stdout.split() == ["1", "1", "True"], result.stderr[-3000:]
  assert result.stderr.splitlines() == [
    f"error: saving checkpoint step 2 in {tmp_path}/checkpoints failed (the disk is full); the previous "
    f"checkpoint, step 1 ({tmp_path}/checkpoints/1), is kept. Fix the cause (free space) and run again to "
    "resume from there"
  ]


def test_load_newest_params_skips_damaged_steps_without_moving_them(tmp_path, capfd):
  directory = tmp_path / "checkpoints"
  saved = _save(directory, [1, 2, 3])
  _truncate(str(directory / "3" / "params"), data_only=True)
  params, found = checkpoint.load_newest_params(str(tmp_path), _abstract(saved[1][0]))
  assert found == str(directory / "2" / "params")
  _assert_same(params, saved[2][0])
  assert capfd.readouterr().err.startswith(f"warning: skipped the damaged checkpoint {directory / '3' / 'params'}:")
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]
  for step in ("1", "2"):
    shutil.rmtree(directory / step / "params" / "d")
  with pytest.raises(ValueError, match=f"no checkpoint under {tmp_path} restores: .*3/params: cannot be read"):
    checkpoint.load_params(str(tmp_path), _abstract(saved[1][0]))


# ----------------------------------------------------------------------------- errors


def _run_command(function, capsys):
  code = errors.command(function)()
  out, err = capsys.readouterr()
  return code, err


@pytest.mark.parametrize(
  "error, line",
  [
    (ValueError("--config.steps=0: must be >= 1"), "error: --config.steps=0: must be >= 1"),
    (
      FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x"),
      "error: /data/x: No such file or directory",
    ),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/a"), "error: /runs/a: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/a/b"), "error: /runs/a/b: No space left on device"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "error: /a -> /b: Invalid cross-device link"),
    (errors.CommandError("workdir busy"), "error: workdir busy"),
    (ValueError('DATA_LOSS: Error opening "zarr" driver:\n  reading /x\n  [tensorstore]'), None),
  ],
)
def test_expected_faults_give_one_error_line_and_exit_status_1(error, line, capsys, monkeypatch):
  monkeypatch.delenv(errors.DEBUG_VARIABLE, raising=False)

  def main():
    raise error

  code, err = _run_command(main, capsys)
  assert code == 1
  assert err.count("\n") == 1 and "Traceback" not in err
  assert err == (line or 'error: DATA_LOSS: Error opening "zarr" driver: reading /x [tensorstore]') + "\n"


def test_debug_variable_shows_the_traceback_and_bugs_keep_theirs(capsys, monkeypatch):
  def main():
    raise ValueError("bad value")

  monkeypatch.setenv(errors.DEBUG_VARIABLE, "1")
  code, err = _run_command(main, capsys)
  assert code == 1 and err.startswith("Traceback") and err.endswith("ValueError: bad value\nerror: bad value\n")

  monkeypatch.delenv(errors.DEBUG_VARIABLE)
  with pytest.raises(TypeError):  # a bug, not a fault the user can fix
    errors.command(lambda: None + 1)()
  long = ValueError("x" * 5000)
  assert errors.describe(long).endswith(f"... ({errors.DEBUG_VARIABLE}=1 shows the whole message)")
  assert len(errors.describe(long)) < 1600

  def interrupted():
    raise KeyboardInterrupt

  assert _run_command(interrupted, capsys) == (130, "error: interrupted\n")
  assert errors.command(lambda: None)() == 0 and errors.command(lambda: 3)() == 3


def test_full_disk_and_out_of_memory_are_recognised():
  assert errors.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
  assert errors.is_disk_full(ValueError("RESOURCE_EXHAUSTED: ... Failed to write [os_error_code='28']"))
  assert not errors.is_disk_full(ValueError("RESOURCE_EXHAUSTED: Out of memory"))
  oom = type("JaxRuntimeError", (RuntimeError,), {})("RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB\nmore")
  assert errors.is_expected(oom) and not errors.is_expected(RuntimeError("RESOURCE_EXHAUSTED"))
  assert (
    errors.describe(oom) == "the accelerator ran out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB)"
  )


# ----------------------------------------------------------------------------- resume: the pieces together


def test_resume_checks_the_config_and_keeps_the_workdir_records_consistent(tmp_path, capfd):
  run = str(tmp_path)
  directory = tmp_path / "checkpoints"
  metrics = tmp_path / workdir.METRICS_NAME
  metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))  # a run killed before saving
  params, opt_state = _abstract(_state(0)[0]), _abstract(_state(0)[1])
  with checkpoint.Checkpoints(str(directory), keep=3) as checkpoints:
    assert resume.resume(checkpoints, params, opt_state, {"seed": 3, "steps": 10}, run) is None
  assert metrics.read_text() == "" and [r["event"] for r in workdir.read_history(run)] == ["start"]

  saved = _save(directory, [2, 4])
  metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
  before = (metrics.read_text(), workdir.read_history(run), sorted(os.listdir(directory)))
  with checkpoint.Checkpoints(str(directory), keep=3) as checkpoints:
    with pytest.raises(identity.ConfigChanged, match="at step 4 being resumed in 1 field"):
      resume.resume(checkpoints, params, opt_state, {"seed": 4, "steps": 10}, run)
    with pytest.raises(identity.AlreadyPast, match="already at step 4, past --config.steps=3"):
      resume.resume(checkpoints, params, opt_state, {"seed": 3, "steps": 3}, run)
  assert (metrics.read_text(), workdir.read_history(run), sorted(os.listdir(directory))) == before  # unchanged

  _truncate(str(directory / "4" / "opt_state"))
  capfd.readouterr()
  with checkpoint.Checkpoints(str(directory), keep=3) as checkpoints:
    restored = resume.resume(checkpoints, params, opt_state, {"seed": 4, "steps": 10}, run, allow=["seed"])
  assert restored.step == 2
  _assert_same(restored.params, saved[2][0])
  assert capfd.readouterr().err.startswith("warning: checkpoint step 4 is damaged (opt_state ")
  assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
  records = workdir.read_history(run)[1:]
  assert [r["event"] for r in records] == ["damaged_checkpoint", "config_change", "resume"]
  assert records[0]["moved_to"] == str(directory / "damaged" / "4-opt_state-unreadable")
  assert (records[1]["step"], records[1]["changes"]) == (2, {"seed": [3, 4]})
