"""Faults at the workdir level: paths that cannot be written, a second trainer (the lock), a killed one,
metrics and history after a kill, and resumes with a changed config (the run's identity).

Read-only folders are made with a read-only bind mount in a user mount namespace (``unshare -Urm``) when
running as root, with permission bits otherwise.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from fault_helpers import ENV, ROOT, can_unshare, in_mount_namespace

from train import errors, identity, workdir
from train.configs import tiny, to_dict

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
  elif can_unshare():
    result = in_mount_namespace('mount --bind "$0" "$0" && mount -o remount,ro,bind "$0"', folder, READ_ONLY)
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
  stored["model"]["attention"], new["model"]["attention"] = {"topk": 0.1}, {"topk": 0.5}  # older files; ignored
  stored["eval"], new["eval"] = {"every": 50, "videos": 2}, {"every": 10, "videos": 4}  # measured, never trained on
  stored["data"]["workers"], new["data"]["workers"] = 0, 4
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
