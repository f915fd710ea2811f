"""Faults injected into the trainer's building blocks: checkpoints, workdirs, run identity, errors, loaders.

Each test asserts the outcome (resumed, refused or stopped), the message, and that nothing was lost: the
checkpoint that remains restores bit for bit. Faults that need a mount (a full disk, a read-only folder)
run in a user mount namespace (``unshare -Urm``) where the machine allows one, and are skipped elsewhere.
The trainer-level faults are in tests/test_faults_trainer.py.
"""

import errno
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from train import checkpoint, errors, identity, resume, workdir
from train.configs import tiny, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _can_unshare() -> bool:
  if shutil.which("unshare") is None:
    return False
  return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


needs_mount_namespace = pytest.mark.skipif(not _can_unshare(), reason="no user mount namespaces (unshare -Urm)")


def _in_mount_namespace(setup: str, folder, code: str, timeout=300) -> subprocess.CompletedProcess:
  """Runs `setup` (a shell command on "$0", the folder) then `code` in Python, in a new mount namespace."""
  script = f'{setup} && exec "$1" -c "$2" "$0"'
  return subprocess.run(
    ["unshare", "-Urm", "sh", "-c", script, str(folder), sys.executable, textwrap.dedent(code)],
    capture_output=True,
    text=True,
    env=ENV,
    timeout=timeout,
    cwd=ROOT,
  )


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
  result = _in_mount_namespace('mount -t tmpfs -o size=1m tmpfs "$0"', tmp_path, FULL_DISK)
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


# ----------------------------------------------------------------------------- workdir


def test_paths_are_checked_before_any_work(tmp_path):
  new = tmp_path / "runs" / "a"
  assert workdir.check_directory(str(new)) == str(new) and new.is_dir()
  assert os.listdir(new) == []  # the write probe leaves nothing
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.CommandError, match=f"^--workdir {tmp_path}/file: exists and is not a directory$"):
    workdir.check_directory(str(tmp_path / "file"))
  with pytest.raises(errors.CommandError, match=r"/file/sub: cannot be created \(Not a directory\)$"):
    workdir.check_directory(str(tmp_path / "file" / "sub"))
  with pytest.raises(errors.CommandError, match=r"^--out .*runs: is a directory, expected a file name$"):
    workdir.check_output_file(str(tmp_path / "runs"))
  with pytest.raises(errors.CommandError, match=r"^--out .*file/x.gif: .*file is not a directory$"):
    workdir.check_output_file(str(tmp_path / "file" / "x.gif"))
  assert workdir.check_output_file(str(tmp_path / "out" / "x.gif")) == str(tmp_path / "out" / "x.gif")
  with pytest.raises(errors.CommandError, match="^--out .*runs/a: already exists; choose a new directory$"):
    workdir.check_new_directory(str(new))
  assert workdir.check_new_directory(str(tmp_path / "data" / "new")) == str(tmp_path / "data" / "new")


READ_ONLY = """
import sys
from train import errors, workdir
folder = sys.argv[1]
for check, path in [
  (workdir.check_directory, folder),
  (workdir.check_directory, folder + "/new"),
  (workdir.check_output_file, folder + "/samples.gif"),
  (workdir.check_new_directory, folder + "/dataset"),
]:
  print(errors.command(lambda: check(path))())
"""


def test_a_read_only_folder_stops_each_check_with_one_line(tmp_path):
  folder = tmp_path / "read-only"
  folder.mkdir()
  if os.geteuid() != 0:  # root writes through permission bits; a read-only mount stops it
    folder.chmod(0o555)
    result = subprocess.run([sys.executable, "-c", READ_ONLY, str(folder)], capture_output=True, text=True, env=ENV)
    reason = "Permission denied"
  elif _can_unshare():
    result = _in_mount_namespace('mount --bind "$0" "$0" && mount -o remount,ro,bind "$0"', folder, READ_ONLY)
    reason = "Read-only file system"
  else:
    pytest.skip("root without mount namespaces: no way to make a folder read-only")
  assert result.stdout.split() == ["1"] * 4, result.stderr
  assert result.stderr.splitlines() == [
    f"error: --workdir {folder}: cannot write in {folder} ({reason})",
    f"error: --workdir {folder}/new: cannot be created ({reason})",
    f"error: --out {folder}/samples.gif: cannot write in {folder} ({reason})",
    f"error: --out {folder}/dataset: cannot write in {folder} ({reason})",
  ]


def test_a_second_lock_names_the_holder_and_release_frees_it(tmp_path):
  with workdir.Lock(str(tmp_path)) as lock:
    holder = json.loads(open(lock.path).read())
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    with pytest.raises(workdir.WorkdirBusy) as e:
      workdir.Lock(str(tmp_path)).acquire()
  assert str(e.value) == (
    f"--workdir {tmp_path} is in use by pid {os.getpid()} on host {socket.gethostname()}, since {holder['since']}: "
    "wait for that run to finish (or stop it) or choose another --workdir"
  )
  assert not os.path.exists(lock.path)
  with workdir.Lock(str(tmp_path)) as again:
    assert again.previous_holder is None


HOLD_LOCK = "import sys, time; from train import workdir; lock = workdir.Lock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capfd):
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT
  )
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(workdir.WorkdirBusy, match=f"in use by pid {holder.pid} on host {socket.gethostname()}"):
      workdir.Lock(str(tmp_path)).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert os.path.exists(tmp_path / workdir.LOCK_NAME)  # SIGKILL leaves the file; the kernel drops the lock
  capfd.readouterr()
  with workdir.Lock(str(tmp_path)) as lock:
    assert lock.previous_holder["pid"] == holder.pid
    assert json.loads(open(lock.path).read())["pid"] == os.getpid()
  err = capfd.readouterr().err
  assert err == (
    f"warning: took over the lock of {tmp_path} from pid {holder.pid} on host {socket.gethostname()}, "
    f"since {lock.previous_holder['since']}, which is no longer running\n"
  )


def test_without_flock_a_live_holder_blocks_and_a_dead_one_is_stale(tmp_path, monkeypatch, capfd):
  def no_flock(*args):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir.fcntl, "flock", no_flock)
  with workdir.Lock(str(tmp_path)):
    with pytest.raises(workdir.WorkdirBusy, match=f"in use by pid {os.getpid()} on host"):
      workdir.Lock(str(tmp_path)).acquire()
  dead = subprocess.Popen(["true"])
  dead.wait()
  path = tmp_path / workdir.LOCK_NAME
  for host, pid, taken in ((socket.gethostname(), dead.pid, True), ("elsewhere", dead.pid, False)):
    path.write_text(json.dumps({"pid": pid, "host": host}))
    lock = workdir.Lock(str(tmp_path))
    if taken:
      lock.acquire()
      assert lock.previous_holder == {"pid": pid, "host": host}
      lock.release()
    else:  # a pid on another host cannot be checked from here
      with pytest.raises(workdir.WorkdirBusy, match=f"in use by pid {pid} on host elsewhere"):
        lock.acquire()
  assert "which is no longer running" in capfd.readouterr().err


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
  path = tmp_path / workdir.METRICS_NAME
  assert workdir.truncate_metrics(str(tmp_path), 3) == 0 and not path.exists()
  records = [json.dumps({"step": s, "loss": 1 / s}) for s in range(1, 9)]
  path.write_text("\n".join(records) + '\n{"step": 9, "lo')  # the last line torn by a kill
  assert workdir.truncate_metrics(str(tmp_path), 6) == 3
  assert path.read_text() == "\n".join(records[:6]) + "\n"
  inode = os.stat(path).st_ino
  assert workdir.truncate_metrics(str(tmp_path), 6) == 0 and os.stat(path).st_ino == inode  # untouched
  assert workdir.truncate_metrics(str(tmp_path), 0) == 6 and path.read_text() == ""


def test_history_keeps_one_record_per_event(tmp_path):
  workdir.append_history(str(tmp_path), "start", step=0)
  workdir.append_history(str(tmp_path), "config_change", step=20, changes={"seed": [0, 1]})
  with open(tmp_path / workdir.HISTORY_NAME, "a") as f:
    f.write('{"time": "torn')
  first, second = workdir.read_history(str(tmp_path))
  assert (first["event"], first["step"], first["pid"], first["host"]) == ("start", 0, os.getpid(), socket.gethostname())
  assert (second["event"], second["changes"]) == ("config_change", {"seed": [0, 1]})
  assert workdir.read_history(str(tmp_path / "none")) == []


# ----------------------------------------------------------------------------- run identity


def _tiny_config() -> dict:
  return json.loads(json.dumps(to_dict(tiny())))  # as stored in a checkpoint's meta


def test_free_fields_may_change_and_identity_fields_may_not():
  stored, new = _tiny_config(), _tiny_config()
  new.update(name="renamed", steps=999, log_every=5, checkpoint_every=7, keep_checkpoints=9)
  new["mesh"]["fsdp"] = 2
  new["model"]["remat"] = True
  new["attention"]["implementation"] = "xla"
  new["model"]["attention"]["topk"] = 0.5  # ignored by the trainer
  assert identity.differences(stored, new) == {}
  new.update(seed=1, teacher="/teachers/wan", learning_rate=1.0)
  new["attention"]["topk"] = 0.2
  new["attention"]["block_q"] = 64
  new["data"]["path"] = "/data/latents"
  new["model"]["num_layers"] = 3
  new["time"]["shift"] = 3.0
  del new["weight_decay"]  # a field one version lacks is not compared
  assert identity.differences(stored, new) == {
    "attention.block_q": (32, 64),
    "attention.topk": (0.1, 0.2),
    "data.path": ("", "/data/latents"),
    "learning_rate": (0.0003, 1.0),
    "model.num_layers": (2, 3),
    "seed": (0, 1),
    "teacher": ("random", "/teachers/wan"),
    "time.shift": (1.0, 3.0),
  }
  as_tuples = {**new, "model": {**new["model"], "patch_size": (1, 2, 2)}}
  assert identity.differences(new, as_tuples) == {}


def test_a_resume_with_another_identity_stops_unless_allowed():
  stored, new = _tiny_config(), _tiny_config()
  new["seed"] = 1
  new["attention"]["topk"] = 0.2
  with pytest.raises(identity.ConfigChanged) as e:
    identity.check_resume(stored, new, step=20)
  assert str(e.value) == (
    "the config differs from the checkpoint at step 20 being resumed in 2 field(s): attention.topk: 0.1 -> 0.2; "
    "seed: 0 -> 1. Resume with the stored values, start a new --workdir, or pass "
    "--allow-config-change=attention.topk,seed to change them (recorded in the workdir's history.jsonl)"
  )
  with pytest.raises(identity.ConfigChanged, match=r"in 1 field\(s\): seed: 0 -> 1\."):
    identity.check_resume(stored, new, allow=["attention"])
  allow = identity.parse_allowed("attention.topk, seed", new)
  assert allow == ("attention.topk", "seed")
  assert identity.check_resume(stored, new, allow=allow) == {"attention.topk": (0.1, 0.2), "seed": (0, 1)}
  assert identity.check_resume(stored, stored) == {}
  with pytest.raises(ValueError, match=r"--allow-config-change: \['sead', 'attention.topkk'\] are not config fields"):
    identity.parse_allowed("sead,attention.topkk,seed", new)
  assert identity.parse_allowed(None, new) == () and identity.parse_allowed("", new) == ()


def test_a_finished_run_asked_for_fewer_steps_changes_nothing():
  assert identity.check_steps(20, 30) == 10 and identity.check_steps(20, 20) == 0
  with pytest.raises(identity.AlreadyPast) as e:
    identity.check_steps(20, 5)
  assert str(e.value) == (
    "the workdir is already at step 20, past --config.steps=5; nothing was changed "
    "(pass --config.steps above 20 to train further, or use a new --workdir)"
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
