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

from train import distill
from train.configs import PRESETS, cli, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.data.frames=4", "--config.data.height=16", "--config.data.width=16", "--config.batch_size=8",
         "--config.data.synthetic_examples=64", "--config.warmup_steps=0", "--config.learning_rate=3e-4",
         "--config.pretrain_teacher.steps=0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


def start(args, env, devices=1, code=None):
    env = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
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
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def final_params(workdir, step):
    """The saved student params as numpy arrays, whatever mesh they were saved from."""
    path = os.path.join(workdir, "checkpoints", str(step), "params")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target))]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("argv, message", [
    (["--config.stepz=3"], "unknown config field --config.stepz"),
    (["--config.attention.topkk=0.1"], "unknown config field --config.attention.topkk"),
    (["--config.steps=ten"], "--config.steps: expected int, got 'ten'"),
    (["--config.steps=0"], "--config.steps=0: must be >= 1"),
    (["--config.attention.topk=1.5"], "--config.attention.topk=1.5: must be in [0, 1]"),
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
])
def test_bad_config_fails_before_any_work(argv, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert distill.main([*argv, "--workdir", str(workdir)]) == 1
    assert message in capsys.readouterr().err
    assert not workdir.exists()


def test_overrides_and_presets():
    config, flags = cli.parse(["--config", "tiny", "--config.steps=20", "--config.attention.topk", "0.05",
                               "--config.time.shift=3", "--config.data.shuffle=false", "--workdir", "d"],
                              PRESETS, "tiny", distill.FLAGS)
    assert (config.steps, config.attention.topk, config.time.shift, config.data.shuffle) == (20, 0.05, 3.0, False)
    assert flags["workdir"] == "d" and config.attention.topp == PRESETS["tiny"]().attention.topp
    per_head, _ = cli.parse(["--config.attention.topk=0.1,0.2"], PRESETS, "tiny", {})
    assert per_head.attention.topk == (0.1, 0.2)
    for name, preset in PRESETS.items():
        validate(preset())
        assert preset().name == name


# ----------------------------------------------------------------------------- training


def test_distillation_lowers_the_loss_on_fixed_eval_batches(env, tmp_path):
    workdir = tmp_path / "run"
    out, _ = run([*SMALL, "--config.pretrain_teacher.steps=200", "--config.steps=60",
                  "--config.checkpoint_every=1000", "--workdir", str(workdir)], env)
    summary = json.load(open(workdir / "summary.json"))
    assert summary["eval_loss_after"] < 0.75 * summary["eval_loss_before"], summary
    assert 0.3 < summary["sparsity"] < 1.0 and len(summary["sparsity_per_layer"]) == 2
    assert "pretrained for 200 steps" in summary["teacher"]
    teacher = json.load(open(workdir / "teacher" / "summary.json"))
    assert teacher["loss"] == "diffusion" and teacher["eval_loss_after"] < 0.5 * teacher["eval_loss_before"]
    # Outputs the summary points at exist: the final checkpoint, TensorBoard events, metrics.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["60"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert f"{summary['eval_loss_before']:.5g}" in out and str(workdir / "checkpoints") in out
    record = json.loads(open(workdir / "metrics.jsonl").readlines()[-1])
    assert record["step"] == 60 and record["tokens_per_s"] > 0 and 0 < record["sparsity"] < 1

    # The student can be the next run's teacher (teacher = one of our workdirs).
    teacher_run = tmp_path / "next"
    run([*SMALL, "--config.steps=1", f"--config.teacher={workdir}", "--workdir", str(teacher_run)], env)
    summary = json.load(open(teacher_run / "summary.json"))
    assert str(workdir / "checkpoints" / "60" / "params") in summary["teacher"]


def test_sharded_step_equals_single_device_step(env, tmp_path):
    args = [*SMALL, "--config.steps=3", "--config.checkpoint_every=3"]
    run([*args, "--workdir", str(tmp_path / "one")], env, devices=1)
    run([*args, "--config.mesh.data=2", "--config.mesh.fsdp=4", "--workdir", str(tmp_path / "eight")], env,
        devices=8)
    assert "8 x cpu (mesh data=2, fsdp=4)" in json.load(open(tmp_path / "eight" / "summary.json"))["devices"]
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    np.testing.assert_allclose([eight[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5)
    p1, p8 = final_params(tmp_path / "one", 3), final_params(tmp_path / "eight", 3)
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
    assert summary["resumed_from_step"] in (4, 6, 8) and summary["resumed_from_step"] % 2 == 0
    assert losses(killed) == expected

    # Killed while the step-6 checkpoint is being written.
    mid_save = tmp_path / "mid_save"
    run([*args, "--workdir", str(mid_save)], env, code=KILL_DURING_SAVE, expect=-signal.SIGKILL)
    run([*args, "--workdir", str(mid_save)], env)
    assert json.load(open(mid_save / "summary.json"))["resumed_from_step"] in (4, 6)
    assert losses(mid_save) == expected
    assert sorted(os.listdir(mid_save / "checkpoints")) == ["10", "8"]  # keep_checkpoints=2, no temporaries
    for a, b in zip(final_params(mid_save, 10), final_params(tmp_path / "straight", 10)):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_loss_stops_with_message_and_keeps_checkpoints(env, tmp_path):
    workdir = tmp_path / "run"
    _, err = run([*SMALL, "--config.steps=20", "--config.checkpoint_every=1", "--config.keep_checkpoints=100",
                  "--config.learning_rate=1e30", "--config.grad_clip_norm=0", "--workdir", str(workdir)],
                 env, expect=1)
    assert "is not finite; stopped without saving" in err
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
    failed = max(losses(workdir)) + 1  # the failing step is not recorded
    assert steps and steps[-1] == failed - 1 < 20
    assert f"Last good checkpoint: {workdir / 'checkpoints' / str(steps[-1])}" in err
