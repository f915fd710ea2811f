"""Distillation step time: sparse vs dense student, and the teacher-forward / student-fwd+bwd split.

    python -m benchmarks.distill                      # Wan2.1-1.3B shape, 480p (32,760 tokens), all devices
    python -m benchmarks.distill --preset tiny        # seconds on a CPU, to check the script
    python -m benchmarks.distill --layers 10          # if memory forces a cut (the report says so)

Builds the trainer's own jitted step (``train.step.make_train_step``: AdamW update of a student
that matches a frozen dense teacher) with random weights, and times, each as the median of
``--steps`` runs after ``--warmup``:

- ``step``: the whole distillation step (teacher forward + student forward/backward + update);
- ``teacher_forward``: the dense teacher alone (it bounds the gain: it is never sparse);
- ``student_fwd_bwd``: the student's loss and gradient alone;

once with a sparse and once with a dense student, in the same process. The batch is split over a
``(data=1, fsdp=N)`` mesh of all devices (FSDP); the default batch is one video per device, and each
device attends over its own videos only (``WanConfig.batch_axes``, as in the trainer).
The default mask is Top-k 5% (``--mode topk``), which pins sparsity near 95% whatever the random
weights do; the realised sparsity is recorded. Writes ``benchmarks/results/distill-x<devices>-<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.results import results_path, write_results
from sparge_jax.models.wan import AttentionConfig, WanModel
from sparge_jax.models.wan.model import REMAT_SAVEABLE
from train import models, sharding
from train import step as step_lib
from train.configs import DataConfig, MeshConfig, tiny, validate, wan2_1_1_3b


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", choices=("wan2_1_1_3b", "tiny"), default="wan2_1_1_3b")
  parser.add_argument("--layers", type=int, default=None, help="cut the model to this many blocks")
  parser.add_argument(
    "--latent",
    type=int,
    nargs=3,
    default=None,
    metavar=("FRAMES", "HEIGHT", "WIDTH"),
    help="latent video size (default: 21 60 104 = 480p for 1.3B, 4 16 16 for tiny)",
  )
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: one per device)")
  parser.add_argument("--mode", default="topk", choices=("topk", "topp", "hybrid"))
  parser.add_argument("--topk", type=float, default=0.05)
  parser.add_argument("--topp", type=float, default=0.2)
  parser.add_argument("--remat", type=int, choices=(0, 1), default=1)
  parser.add_argument(
    "--remat-saves",
    nargs="*",
    default=[],
    choices=REMAT_SAVEABLE,
    help="block intermediates kept through the backward pass (WanConfig.remat_saves)",
  )
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--out", default=None, help="results file (default: benchmarks/results/distill-x<devices>-<device>.json)"
  )
  args = parser.parse_args(argv)
  for name in ("layers", "batch", "steps"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1")
  return args


def make_config(args):
  base = wan2_1_1_3b() if args.preset == "wan2_1_1_3b" else tiny()
  frames, height, width = args.latent or ((21, 60, 104) if args.preset == "wan2_1_1_3b" else (4, 16, 16))
  model = dataclasses.replace(
    base.model,
    remat=bool(args.remat),
    remat_saves=tuple(args.remat_saves),
    num_layers=args.layers or base.model.num_layers,
  )
  attention = dataclasses.replace(base.attention, kind="sparse", mode=args.mode, topk=args.topk, topp=args.topp)
  config = dataclasses.replace(
    base,
    model=model,
    attention=attention,
    teacher="random",
    pretrain_teacher=dataclasses.replace(base.pretrain_teacher, steps=0),
    batch_size=args.batch or jax.device_count(),
    mesh=MeshConfig(data=1, fsdp=-1),
    data=DataConfig(frames=frames, height=height, width=width, text_len=base.data.text_len),
  )
  validate(config)
  return config


def timed(fn, warmup: int, steps: int) -> list[float]:
  """Seconds per call of ``fn()`` (which must block on its result), ``steps`` samples after warm-up."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def benchmark(config, args) -> dict:
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  # As in the trainer: each device attends over its own videos (WanConfig.batch_axes, sharding.on_mesh).
  teacher_config, sparse_config = models.model_configs(config, batch_axes=sharding.BATCH_AXES)
  dense_config = dataclasses.replace(sparse_config, attention=AttentionConfig(kind="dense"))
  abstract = nnx.split(nnx.eval_shape(lambda: WanModel(teacher_config, rngs=nnx.Rngs(0))))[1]
  param_shardings = sharding.param_shardings(abstract, mesh)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  teacher_params = models.init_params(teacher_config, config.seed, param_shardings)
  if config.compute_dtype == "bfloat16":
    teacher_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), teacher_params)
  teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher_params)
  d = config.data
  key = jax.random.key(0)
  batch = {
    "latents": jax.device_put(
      jax.random.normal(key, (config.batch_size, d.frames, d.height, d.width, config.model.in_channels)), batch_sharding
    ),
    "context": jax.device_put(
      jax.random.normal(key, (config.batch_size, d.text_len, config.model.text_dim)), batch_sharding
    ),
  }
  tokens = config.batch_size * d.frames * d.height * d.width // int(np.prod(config.model.patch_size))
  graphdef = {
    name: nnx.split(nnx.eval_shape(lambda c=c: WanModel(c, rngs=nnx.Rngs(0))))[0]
    for name, c in (("teacher", teacher_config), ("sparse", sparse_config), ("dense", dense_config))
  }
  optimizer, _ = step_lib.make_optimizer(config)
  opt_shardings = optax.tree_map_params(
    optimizer,
    lambda _, s: s,
    jax.eval_shape(optimizer.init, abstract.to_pure_dict()),
    param_shardings,
    transform_non_params=lambda _: replicated,
  )
  results = {}

  dtype = teacher_config.compute_dtype
  teacher_forward = sharding.on_mesh(
    jax.jit(
      lambda tp, b: nnx.merge(graphdef["teacher"], tp)(
        b["latents"].astype(dtype), jnp.full((config.batch_size,), 500.0), b["context"].astype(dtype)
      )
    ),
    mesh,
  )
  results["teacher_forward_ms"] = 1e3 * float(
    np.median(timed(lambda: teacher_forward(teacher_params, batch).block_until_ready(), args.warmup, args.steps))
  )

  for name in ("sparse", "dense"):
    student_config = sparse_config if name == "sparse" else dense_config
    run_config = dataclasses.replace(config, attention=student_config.attention)
    # A copy: the student is donated to the step, the teacher must survive it.
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), teacher_params)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    distill_loss = step_lib.make_loss_fn(run_config, graphdef["teacher"], graphdef[name])
    student_loss = step_lib.make_loss_fn(dataclasses.replace(run_config, loss="diffusion"), None, graphdef[name])
    fwd_bwd = sharding.on_mesh(
      jax.jit(jax.value_and_grad(lambda p, b, k: student_loss(p, None, b, k), has_aux=True)), mesh
    )
    step = sharding.on_mesh(
      step_lib.make_train_step(
        distill_loss, optimizer, param_shardings, opt_shardings, teacher_shardings, batch_sharding, replicated
      ),
      mesh,
    )
    (_, sparsity), _ = fwd_bwd(params, batch, key)
    t_student = timed(lambda: jax.block_until_ready(fwd_bwd(params, batch, key)), args.warmup, args.steps)
    state = {"params": params, "opt_state": opt_state}

    def one_step():
      state["params"], state["opt_state"], metrics = step(
        state["params"], state["opt_state"], teacher_params, batch, key, jnp.int32(0)
      )
      jax.block_until_ready(metrics)

    t_step = timed(one_step, args.warmup, args.steps)
    results[name] = {
      "step_ms": 1e3 * float(np.median(t_step)),
      "student_fwd_bwd_ms": 1e3 * float(np.median(t_student)),
      "tokens_per_s": tokens / float(np.median(t_step)),
      "sparsity": float(np.mean(sparsity)),
      "step_ms_all": [1e3 * t for t in t_step],
    }
    state.clear()  # free this student before the next one is built
    params = opt_state = None
  results["speedup_step"] = results["dense"]["step_ms"] / results["sparse"]["step_ms"]
  results["speedup_student_fwd_bwd"] = results["dense"]["student_fwd_bwd_ms"] / results["sparse"]["student_fwd_bwd_ms"]
  results["tokens_per_step"] = tokens
  stats = jax.devices()[0].memory_stats() or {}
  results["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30 or None
  return results


def main(argv=None) -> None:
  args = parse_args(argv)
  config = make_config(args)
  results = benchmark(config, args)
  record = {
    "benchmark": "distill",
    "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    "setup": {
      "preset": args.preset,
      "layers": config.model.num_layers,
      "batch": config.batch_size,
      "latent": [config.data.frames, config.data.height, config.data.width],
      "tokens_per_video": results["tokens_per_step"] // config.batch_size,
      "attention": dataclasses.asdict(config.attention),
      "remat": config.model.remat,
      "remat_saves": list(config.model.remat_saves),
      "compute_dtype": config.compute_dtype,
      "mesh": {"data": 1, "fsdp": jax.device_count()},
      "batch_axes": list(sharding.BATCH_AXES),
      "steps": args.steps,
      "warmup": args.warmup,
    },
    **results,
  }
  out = args.out or results_path(f"distill-x{jax.device_count()}")
  write_results(out, record)
  s, d = results["sparse"], results["dense"]
  print(
    f"{record['device']}, {record['setup']['tokens_per_video']} tokens x batch {config.batch_size}, "
    f"{config.model.num_layers} layers"
  )
  print(f"teacher forward (dense):       {results['teacher_forward_ms']:9.1f} ms")
  print(
    f"student fwd+bwd  sparse/dense: {s['student_fwd_bwd_ms']:9.1f} / {d['student_fwd_bwd_ms']:.1f} ms "
    f"({results['speedup_student_fwd_bwd']:.2f}x; sparsity {s['sparsity']:.3f})"
  )
  print(
    f"whole step       sparse/dense: {s['step_ms']:9.1f} / {d['step_ms']:.1f} ms "
    f"({results['speedup_step']:.2f}x; {s['tokens_per_s']:.0f} vs {d['tokens_per_s']:.0f} tokens/s)"
  )
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
