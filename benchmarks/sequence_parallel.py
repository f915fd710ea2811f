"""What the sequence-parallel path costs: `sparge_jax.parallel`'s Ulysses, ring and USP attention inside
`jax.shard_map`, against plain `sparse_attention` on the same inputs, in the same run.

    python -m benchmarks.sequence_parallel            # 32,760 tokens × 12 heads × 128, Top-k 5%, all devices
    python -m benchmarks.sequence_parallel --devices 1

On one device the mesh axes have size 1, the collectives move nothing, and the difference is the shard_map
path's own overhead (target: at most 2% over plain sparse_attention). Each scheme runs over a mesh of
`--devices` devices: one "sequence" axis for Ulysses and ring, ("ulysses", "ring") = (devices, 1) for USP;
q, k and v are sharded along the sequence, and so is the output. Times are device time per call
(`timing.device_ms`, span; on several devices the first device's), forward (mask + attention) and
forward+backward, bf16, batch 1. A scheme the library lacks (or cannot run at these shapes) is skipped with
its reason. Writes benchmarks/results/sequence-parallel-x<devices>-<device>.json.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import inputs, results, timing
from benchmarks.attention import why_unsupported
from sparge_jax import attention

OVERHEAD_TARGET = 1.02  # a scheme's time over plain sparse_attention's, on one device
SCHEMES = ("ulysses", "ring", "usp")


def scheme_fns(scheme: str, devices, *, topk: float, block_q: int = 128, block_kv: int = 64, interpret=False):
  """(forward(q, k, v), forward_backward(q, k, v, d_out) -> (dq, dk, dv), sharding of q, k, v), jitted, for
  `scheme` ("plain" is `sparse_attention` without a mesh); raises ImportError where `sparge_jax.parallel`
  is missing."""
  settings = dict(topk=topk, topp=0.0, mode="topk", block_q=block_q, block_kv=block_kv)
  if interpret:
    settings["interpret"] = True
  if scheme == "plain":
    attend = lambda q, k, v: attention.sparse_attention(q, k, v, **settings)
    sharding = None
  else:
    parallel = importlib.import_module("sparge_jax.parallel")
    axes = ("ulysses", "ring") if scheme == "usp" else ("sequence",)
    mesh = jax.make_mesh((len(devices),) + (1,) * (len(axes) - 1), axes, devices=devices)
    spec = P(None, axes if scheme == "usp" else "sequence")
    if scheme == "usp":
      local = lambda q, k, v: parallel.usp_attention(q, k, v, ulysses_axis="ulysses", ring_axis="ring", **settings)
    else:
      scheme_fn = getattr(parallel, f"{scheme}_attention")
      local = lambda q, k, v: scheme_fn(q, k, v, axis_name="sequence", **settings)
    attend = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    sharding = NamedSharding(mesh, spec)
  forward = jax.jit(attend)
  forward_backward = jax.jit(lambda q, k, v, d_out: jax.vjp(attend, q, k, v)[1](d_out))
  return forward, forward_backward, sharding


def overheads(times: dict) -> list[dict]:
  """{(scheme, "fwd" | "fwd_bwd"): ms} -> each scheme's time over plain sparse_attention's, with the target."""
  rows = []
  for (scheme, what), ms in times.items():
    if scheme != "plain" and (("plain", what) in times):
      value = ms / times[("plain", what)]
      rows.append(dict(scheme=scheme, what=what, ms=ms, over_plain=value, target=OVERHEAD_TARGET))
      rows[-1]["met"] = value <= OVERHEAD_TARGET
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  inputs.add_shape_arguments(parser)
  parser.add_argument("--topk", type=float, default=0.05)
  parser.add_argument("--devices", type=int, default=None, help="mesh size (default: every device)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  inputs.check_positive(parser, args, "seq_len", "heads", "head_dim", "devices")
  if not 0 < args.topk <= 1:
    parser.error(f"--topk must lie in (0, 1], got {args.topk}")
  if jax.default_backend() != "gpu":
    parser.error("this benchmark reads GPU kernel times and needs a CUDA GPU")
  devices = jax.devices()[: args.devices or jax.device_count()]
  if args.devices and len(devices) < args.devices:
    parser.error(f"--devices {args.devices}: only {len(devices)} devices")

  key = jax.random.PRNGKey(0)
  q, k, v, d_out = inputs.random_qkv(
    key, batch=1, seq_len=args.seq_len, heads=args.heads, head_dim=args.head_dim, dtype=jnp.bfloat16
  )
  calls, skipped, reference = {}, [], None
  for scheme in ("plain", *SCHEMES):
    try:
      forward, forward_backward, sharding = scheme_fns(scheme, devices, topk=args.topk)
    except (ImportError, AttributeError) as e:
      skipped.append(dict(scheme=scheme, reason=f"{type(e).__name__}: {e}"))
      print(f"skip {scheme}: {skipped[-1]['reason']}", flush=True)
      continue
    args_fwd = tuple(x if sharding is None else jax.device_put(x, sharding) for x in (q, k, v))
    args_bwd = (*args_fwd, d_out if sharding is None else jax.device_put(d_out, sharding))
    reason = why_unsupported(forward, *args_fwd) or why_unsupported(forward_backward, *args_bwd)
    try:
      out = None if reason else np.asarray(forward(*args_fwd), np.float32)
    except Exception as e:  # compiles but fails to run: a result for this scheme, not a crash
      reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if reason:
      skipped.append(dict(scheme=scheme, reason=reason))
      print(f"skip {scheme}: {reason}", flush=True)
      continue
    if reference is None:
      reference = out
    error = float(np.max(np.abs(out - reference)))
    print(f"{scheme}: largest difference from plain sparse_attention {error:.2e}", flush=True)
    calls[(scheme, "fwd")] = (forward, args_fwd)
    calls[(scheme, "fwd_bwd")] = (forward_backward, args_bwd)
  times = {label: t.span for label, t in timing.device_ms(calls).items()}
  rows = overheads(times)
  for label, ms in times.items():
    print(f"{label[0]:>8} {label[1]:>8}: {ms:8.3f} ms")
  for r in rows:
    verdict = f"target <= {r['target']}: {'met' if r['met'] else 'NOT met'}" if len(devices) == 1 else ""
    print(f"{r['scheme']} {r['what']}: {r['over_plain']:.3f}x plain sparse_attention  {verdict}")
  path = args.out or results.results_path(f"sequence-parallel-x{len(devices)}")
  results.write_results(
    path,
    {
      "command": " ".join(["python -m benchmarks.sequence_parallel", *(sys.argv[1:] if argv is None else argv)]),
      "seq_len": args.seq_len,
      "heads": args.heads,
      "head_dim": args.head_dim,
      "topk": args.topk,
      "devices": len(devices),
      "ms": {f"{scheme} {what}": ms for (scheme, what), ms in times.items()},
      "overheads": rows,
      "skipped": skipped,
    },
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
