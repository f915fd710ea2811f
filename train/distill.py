"""Velocity distillation: fine-tune a sparse-attention student to match its frozen dense teacher.

    python -m train.distill                                   # tiny default, minutes on a CPU
    python -m train.distill --config tiny --config.steps=20 --config.attention.topk=0.05 --workdir DIR
    python -m train.distill --config wan2_1_1_3b --config.teacher=PATH --workdir runs/wan13b
    python -m train.distill --config my_config.py             # get_config() returns a train.configs.Config

(``sparge-distill`` once installed.) The student starts as a copy of the teacher with sparse
self-attention; both see the same x_t, t and text. Only the student is differentiated, optimised and
checkpointed; the teacher is an argument of the jitted step that is never donated. Restarting with the
same ``--workdir`` resumes from its newest checkpoint. Multi-host: pass ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID) on every process; see docs/TRAINING.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import time
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from sparge_jax.files import write_json_atomic

from . import checkpoint, cli, errors, identity, resume, sharding, teacher
from .configs import PRESETS, Config, to_dict, validate
from .evaluate import VideoEval
from .export import export_student
from .loader import Batches
from .models import abstract_model, model_configs
from .sources import make_sources
from .step import make_loss_fn, make_optimizer, make_train_step
from .workdir import Lock, check_directory


@dataclasses.dataclass(frozen=True)
class Args:
  """The command line of ``train.distill``."""

  config: Config
  workdir: str | None = None
  """The run's folder (default runs/<name>-<date>-<time>); the same one again resumes its newest checkpoint."""
  coordinator_address: str | None = None
  """host:port of process 0, for a run over several processes (or JAX_COORDINATOR_ADDRESS)."""
  num_processes: int | None = None
  """Number of processes (or JAX_NUM_PROCESSES)."""
  process_id: int | None = None
  """This process's index (or JAX_PROCESS_ID)."""
  allow_config_change: Annotated[str | None, tyro.conf.arg(metavar="FIELD,...")] = None
  """Resume although these config fields differ from the checkpoint's (fields or groups, e.g.
  --allow-config-change=seed,attention; recorded in <workdir>/history.jsonl). steps, the eval, log and
  checkpoint intervals, mesh, remat and the kernel implementation may always change; see docs/RELIABILITY.md."""


class NonFiniteLoss(errors.CommandError):
  """Raised when a step produces a NaN or inf loss or gradient; nothing after it was saved."""


# ----------------------------------------------------------------------------- the loop


def pretrain_teacher(config: Config, workdir: str, progress: bool, allow: tuple[str, ...] = ()) -> None:
  """Trains (or resumes, or checks) the run's dense teacher in ``<workdir>/teacher``."""
  directory, steps = teacher.pretrained_dir(workdir), config.pretrain_teacher.steps
  with checkpoint.Checkpoints(os.path.join(directory, "checkpoints"), keep=1) as existing:
    done = existing.latest_step()
  if (done is None or done < steps) and progress and jax.process_index() == 0:
    print(f"pretraining the teacher: {steps} steps of the diffusion loss, dense attention")
  try:  # a finished teacher is checked like any resumed run, and left as it is
    run(teacher.pretraining_config(config), directory, progress=progress, allow=allow)
  except identity.AlreadyPast:
    raise identity.AlreadyPast(
      f"the teacher in {directory} is already pretrained for {done} steps, past "
      f"--config.pretrain_teacher.steps={steps}; nothing was changed"
    ) from None
  except identity.ConfigChanged as e:
    raise identity.ConfigChanged(f"the teacher pretrained in {directory}: {e}") from None


def default_workdir(config: Config) -> str:
  return os.path.join("runs", f"{config.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def run(config: Config, workdir: str, *, progress: bool = True, allow: tuple[str, ...] = ()) -> dict | None:
  """Runs (or resumes) ``config`` in ``workdir``; returns the summary printed by ``main``, or None when
  the workdir is already at ``config.steps`` (then nothing is rewritten).

  A resume continues from the newest checkpoint that restores (``resume.resume``): its config must equal
  ``config`` but for ``identity.FREE_FIELDS`` and the fields in `allow` (``identity.parse_allowed``).
  A run that pretrains its teacher (``Config.pretrains_teacher``) first runs ``teacher.pretraining_config``
  in ``<workdir>/teacher``, unless that is already done. The caller holds the workdir's lock.
  """
  validate(config)
  # Closed on every exit path: no orbax thread outlives the run, and a failed save is reported.
  with checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints) as checkpoints:
    return _run(config, workdir, checkpoints, progress=progress, allow=allow)


def _run(
  config: Config, workdir: str, checkpoints: checkpoint.Checkpoints, *, progress: bool, allow: tuple[str, ...]
) -> dict | None:
  from tensorboardX import SummaryWriter  # noqa: PLC0415 (heavy import, only needed here)
  from tqdm import tqdm  # noqa: PLC0415

  lead = jax.process_index() == 0
  m = config.mesh
  mesh = sharding.make_mesh(m.data, m.fsdp, m.sequence, m.ring if m.sequence_parallel == "usp" else None)
  if config.batch_size % sharding.batch_devices(mesh):
    raise ValueError(
      f"--config.batch_size={config.batch_size}: must be a multiple of the devices it is split over "
      f"({sharding.batch_devices(mesh)}: the device count over mesh.sequence)"
    )
  teacher_config, student_config = model_configs(
    config, batch_axes=sharding.BATCH_AXES, sequence_axes=sharding.sequence_axes(mesh)
  )
  source, heldout = make_sources(config, student_config)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  rows = sharding.process_rows(batch_sharding, config.batch_size)
  d = config.data
  batches = Batches(
    source,
    batch_size=config.batch_size,
    seed=config.seed,
    shuffle=d.shuffle,
    rows=rows,
    workers=d.workers,
    prefetch=d.prefetch,
  )

  teacher_graphdef, abstract_state = abstract_model(teacher_config)
  student_graphdef = abstract_model(student_config)[0]
  abstract_params = abstract_state.to_pure_dict()
  param_shardings = sharding.param_shardings(abstract_state, mesh)

  optimizer, schedule = make_optimizer(config)
  # Moments are sharded like their parameters; counters are replicated.
  abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
  opt_shardings = optax.tree_map_params(
    optimizer, lambda _, s: s, abstract_opt_state, param_shardings, transform_non_params=lambda _: replicated
  )

  # Before any teacher work: a resume with another config, or past its steps, stops here.
  os.makedirs(workdir, exist_ok=True)
  restored = resume.resume(
    checkpoints,
    checkpoint.abstract(abstract_params, param_shardings),
    checkpoint.abstract(abstract_opt_state, opt_shardings),
    to_dict(config),
    workdir,
    allow=allow,
    lead=lead,
  )
  if restored is not None and restored.step == config.steps:
    return None

  if config.pretrains_teacher:
    pretrain_teacher(config, workdir, progress, allow)
  teacher_params, teacher_source = teacher.load_teacher(
    teacher.teacher_spec(config, workdir), teacher_config, abstract_params, param_shardings, config.seed, mesh
  )
  if config.pretrains_teacher:
    teacher_source = teacher.describe_pretrained(config, workdir)
  if restored is None:
    # The student is a separate copy: its buffers are donated every step, the teacher's never are.
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), teacher_params)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
  else:
    params, opt_state = restored.params, restored.opt_state
  if config.compute_dtype == "bfloat16":
    teacher_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), teacher_params)
  if config.loss == "diffusion":
    teacher_params, teacher_source = None, f"none (loss=diffusion; student initialised from {teacher_source})"
  teacher_shardings = None if teacher_params is None else jax.tree.map(lambda x: x.sharding, teacher_params)

  key = jax.random.key(config.seed)
  start_step, position, data_state, resumed_from = 0, 0, None, None
  if restored is not None:
    meta = restored.meta
    start_step, position, data_state = meta["step"], meta["data_position"], meta.get("data_state")
    resumed_from = restored.step
    key = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
  train_key, eval_key = jax.random.split(key)
  if lead:
    write_json_atomic(os.path.join(workdir, "config.json"), to_dict(config))

  loss_fn = make_loss_fn(config, teacher_graphdef, student_graphdef)
  # The models split attention over the batch axes of the context mesh (WanConfig.batch_axes).
  train_step = sharding.on_mesh(
    make_train_step(loss_fn, optimizer, param_shardings, opt_shardings, teacher_shardings, batch_sharding, replicated),
    mesh,
  )
  global_batch = functools.partial(sharding.global_batch, sharding=batch_sharding, batch_size=config.batch_size)
  # Fixed held-out batches, t and noise, so every eval compares the same thing.
  heldout_batches = Batches(heldout, batch_size=config.batch_size, seed=config.seed, shuffle=False, rows=rows)
  eval_batches = [
    global_batch(heldout_batches.batch(i * config.batch_size))
    for i in range(math.ceil(len(heldout) / config.batch_size))
  ]
  eval_loss = sharding.on_mesh(jax.jit(lambda p, tp, b, k: loss_fn(p, tp, b, k)[0]), mesh)

  def evaluate(params):
    return float(
      np.mean(
        [eval_loss(params, teacher_params, b, jax.random.fold_in(eval_key, i)) for i, b in enumerate(eval_batches)]
      )
    )

  eval_before = evaluate(params)
  videos = None
  if config.eval.every and config.eval.videos and teacher_params is not None:
    videos = VideoEval(config, heldout, teacher_params, mesh, workdir)

  tokens_per_example = math.prod(s // p for s, p in zip(source.latent_shape[:3], config.model.patch_size))
  # resume.resume cut metrics.jsonl back to start_step; TensorBoard drops its events past it on reading.
  writer = SummaryWriter(workdir, purge_step=start_step + 1 if start_step else None) if lead else None
  metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a") if lead else None
  # No bar where stderr is not a terminal (a log file): there, metrics.jsonl shows the progress.
  bar = tqdm(
    total=config.steps, initial=start_step, disable=None if progress and lead else True, unit="step", dynamic_ncols=True
  )
  losses, sparsities, step_times = [], [], []

  def log_eval(step, loss):
    record = {"step": step, "eval_loss": loss}
    if videos is not None:
      record.update({f"eval_{k}": v for k, v in videos(params, step, writer=writer).items()})
    if lead:
      for name, value in record.items():
        if name != "step":
          writer.add_scalar(f"eval/{name.removeprefix('eval_')}", value, step)
      metrics_file.write(json.dumps(record) + "\n")
      metrics_file.flush()

  if config.eval.every and start_step == 0:
    log_eval(0, eval_before)
  iterator = batches.iterator(data_state, position=position)
  last_time = time.perf_counter()
  try:
    for step in range(start_step, config.steps):
      local_batch = next(iterator)
      params, opt_state, metrics = train_step(
        params, opt_state, teacher_params, global_batch(local_batch), train_key, jnp.int32(step)
      )
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      step_time, last_time = now - last_time, now
      done = step + 1
      if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
        checkpoints.wait()
        last_good = checkpoints.latest_step()
        raise NonFiniteLoss(
          f"step {done}: loss {metrics['loss']}, grad norm {metrics['grad_norm']} is not finite; "
          f"stopped without saving. Last good checkpoint: "
          f"{os.path.join(checkpoints.directory, str(last_good)) if last_good is not None else 'none'}."
          " Lower --config.learning_rate or set --config.grad_clip_norm."
        )
      losses.append(float(metrics["loss"]))
      sparsities.append(np.asarray(metrics["sparsity"], np.float64))
      if step > start_step:  # the first step includes compilation
        step_times.append(step_time)
      bar.update(1)
      bar.set_postfix(loss=f"{losses[-1]:.4g}", sparsity=f"{sparsities[-1].mean():.2f}")
      if lead and (done % config.log_every == 0 or done == config.steps):
        record = {
          "step": done,
          "loss": losses[-1],
          "grad_norm": float(metrics["grad_norm"]),
          "learning_rate": float(schedule(step)),
          "sparsity": float(sparsities[-1].mean()),
        }
        if step > start_step:
          record.update(step_time_s=step_time, tokens_per_s=config.batch_size * tokens_per_example / step_time)
        for name, value in record.items():
          if name != "step":
            writer.add_scalar(f"train/{name}", value, done)
        for layer, value in enumerate(sparsities[-1]):
          writer.add_scalar(f"sparsity/layer_{layer:02d}", value, done)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
      if config.eval.every and (done % config.eval.every == 0 or done == config.steps):
        log_eval(done, evaluate(params))
      # After the step's records: a checkpoint never holds a step that metrics.jsonl lacks.
      if done % config.checkpoint_every == 0 or done == config.steps:
        checkpoints.save(
          done,
          params,
          opt_state,
          {
            "step": done,
            "data_position": iterator.position,
            "data_state": iterator.get_state(),
            "rng": np.asarray(jax.random.key_data(key)).tolist(),
            "config": to_dict(config),
          },
        )
    checkpoints.wait()
  finally:
    iterator.close()
    bar.close()
    if lead:
      writer.close()
      metrics_file.close()

  eval_after = evaluate(params)
  export = export_student(config, params, workdir)
  mean_sparsity = np.mean(sparsities, axis=0) if sparsities else np.zeros(config.model.num_layers)
  summary = {
    "workdir": os.path.abspath(workdir),
    "checkpoints": checkpoints.directory,
    "teacher": teacher_source,
    "loss": config.loss,
    "resumed_from_step": resumed_from,
    "steps": config.steps,
    "eval_loss_before": eval_before,
    "eval_loss_after": eval_after,
    "eval_examples": len(heldout),
    "export": os.path.abspath(export),
    "train_losses": losses,
    "sparsity_per_layer": mean_sparsity.tolist(),
    "sparsity": float(mean_sparsity.mean()),
    "step_time_s": float(np.median(step_times)) if step_times else None,
    "tokens_per_step": config.batch_size * tokens_per_example,
    "devices": f"{mesh.size} x {jax.devices()[0].device_kind} (mesh data={mesh.shape['data']}, "
    f"fsdp={mesh.shape['fsdp']}{sequence_note(config, mesh)}), {jax.process_count()} process(es)",
  }
  if lead:
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  return summary


def sequence_note(config: Config, mesh) -> str:
  """ ", sequence=4 (ulysses)" for the summary's devices line, or "" without sequence parallelism."""
  sequence = math.prod(mesh.shape[a] for a in sharding.sequence_axes(mesh))
  return f", sequence={sequence} ({config.mesh.sequence_parallel})" if sharding.sequence_axes(mesh) else ""


def print_summary(summary: dict) -> None:
  resumed = summary["resumed_from_step"]
  start = f"step {resumed}" if resumed is not None else "start"
  lines = [
    "",
    f"teacher:   {summary['teacher']}",
    f"devices:   {summary['devices']}",
    f"{summary['loss']} loss on {summary['eval_examples']} held-out examples: {summary['eval_loss_before']:.5g} at {start} -> "
    f"{summary['eval_loss_after']:.5g} after step {summary['steps']}",
  ]
  if summary["train_losses"]:
    first, last = summary["train_losses"][:10], summary["train_losses"][-10:]
    lines.append(f"train loss (mean of first / last 10 steps): {np.mean(first):.5g} -> {np.mean(last):.5g}")
  lines.append(
    f"realized sparsity (fraction of attention blocks skipped): {summary['sparsity']:.3f}; "
    f"per layer {[round(s, 3) for s in summary['sparsity_per_layer']]}"
  )
  if summary["step_time_s"]:
    lines.append(
      f"step time {summary['step_time_s'] * 1e3:.1f} ms (median), "
      f"{summary['tokens_per_step'] / summary['step_time_s']:.0f} tokens/s"
    )
  workdir = summary["workdir"]
  lines += [
    f"checkpoints:  {summary['checkpoints']}",
    f"TensorBoard:  tensorboard --logdir {workdir}",
    f"metrics:      {os.path.join(workdir, 'metrics.jsonl')} (per step), {os.path.join(workdir, 'summary.json')}",
    f"samples:      {cli.command('train.sample')} --workdir {workdir}",
    f"student:      {summary['export']} (diffusers folder)",
  ]
  print("\n".join(lines))


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
  """``jax.distributed.initialize`` from flags, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID; does nothing when no coordinator is given (single process)."""
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    return
  count = os.environ.get("JAX_NUM_PROCESSES") if num_processes is None else num_processes
  index = os.environ.get("JAX_PROCESS_ID") if process_id is None else process_id
  for name, value in (("num_processes", count), ("process_id", index)):
    if value is None or not str(value).isdigit():
      raise ValueError(
        f"--{name} (or JAX_{name.upper()}) must be a non-negative integer with a coordinator address, got {value!r}"
      )
  jax.distributed.initialize(address, int(count), int(index))


def check(args: Args) -> None:
  """The checks before any work: the config's values, then the processes (nothing is traced before this)."""
  validate(args.config)
  initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  if jax.process_count() > 1 and not args.workdir:
    raise ValueError("--workdir is required with several processes (they must share it)")


@errors.command
def main(argv: list[str] | None = None) -> int:
  args, code = cli.parse(
    Args, argv, prog="train.distill", description=__doc__, presets=PRESETS, default="tiny", check=check
  )
  if code is not None:
    return code
  config, lead = args.config, jax.process_index() == 0
  allow = identity.parse_allowed(args.allow_config_change, to_dict(config))
  path = check_directory(args.workdir or default_workdir(config), "--workdir")
  # One trainer per workdir; the other processes of a multi-process run share process 0's.
  with Lock(path) if lead else contextlib.nullcontext():
    summary = run(config, path, allow=allow)
  if lead:
    if summary is None:
      print(
        f"{path} is already complete at step {config.steps}; nothing to do "
        "(pass a larger --config.steps to train further)"
      )
    else:
      print_summary(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
