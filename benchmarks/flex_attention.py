"""PyTorch FlexAttention beside ours: the attention suite's shapes and kept-count law, timed against torch's
own cuDNN SDPA in the same run, and written into the attention suite's results file.

    python -m benchmarks.attention        # first: our rows, benchmarks/results/attention-<device>.json
    python -m benchmarks.flex_attention   # then: FlexAttention's rows and the ours/flex ratios, same file

Needs torch with CUDA and Triton (FlexAttention is compiled with `torch.compile`). For each non-causal,
one-kv-head-per-head case of `inputs.SUITE`, bf16, batch 1, [batch, heads, seq, head_dim] as torch lays
them out: `flex_attention` on a `BlockMask` built with `BlockMask.from_kv_blocks` from the kv block lists
of `inputs.random_block_mask` at 128×128 blocks (FlexAttention's default; every row keeps
`inputs.kept_count(sparsity, n_kv_blocks)` random blocks, as in our suite), the kept blocks listed as full
blocks (no mask inside them, so the compiled kernel runs no mask_mod), forward and forward+backward; and
`scaled_dot_product_attention` restricted to cuDNN, forward and forward+backward. Times are medians of CUDA
event samples of back-to-back calls (`torch_timing.median_ms`). Before timing, flex's output is checked
against masked dense attention at a small shape.

jax runs on the CPU here, to build the masks: the GPU is torch's alone. The file gains a "flex_attention"
section (its own provenance and records) and "flex_comparison": for each of our rows at the same case and
sparsity, ours over flex in time (flex_ms / ours_ms; the targets: >= 1.5 at 0.95 and 0.9, forward and
forward+backward) and in speedup over each library's own cuDNN.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import jax
import numpy as np

from benchmarks import inputs, results, torch_timing
from sparge_jax import mask as mask_lib

BLOCK = 128  # FlexAttention's block size; its 128x64 backward does not compile
LEAD_TARGET = 1.5  # ours over flex, in time, at the TARGET_SPARSITIES
TARGET_SPARSITIES = (0.95, 0.9)


def flex_cases(suite=inputs.SUITE) -> list[inputs.Case]:
  """The suite's cases that FlexAttention runs here: one kv head per query head, not causal."""
  return [case for case in suite if not (case.is_gqa or case.is_causal)]


def kv_block_lists(key, case: inputs.Case, sparsity: float, *, batch: int = 1, block: int = BLOCK):
  """(kv_block_count int32 [batch, heads, n_q], kv_block_index int32 [batch, heads, n_q, n_kv], mask bool
  [batch, heads, n_q, n_kv]), numpy: a random mask with the suite's law and its kept blocks, ascending per
  row."""
  n = -(-case.seq_len // block)
  mask = inputs.random_block_mask(key, batch, case.heads, n, n, inputs.kept_count(sparsity, n))
  index, count = mask_lib.index_table(mask)
  return np.asarray(count), np.asarray(index), np.asarray(mask)


def flex_block_mask(kv_block_count, kv_block_index, *, seq_len: int, block: int = BLOCK, device="cuda"):
  """A FlexAttention `BlockMask` whose rows attend, in full, the listed kv blocks of `block`×`block` tiles.

  The blocks are listed as full blocks, so the compiled kernel evaluates no mask_mod inside them. Eager
  FlexAttention ignores block lists (it applies the mask_mod, here none): only the compiled one honours it.
  """
  import torch
  from torch.nn.attention.flex_attention import BlockMask

  count = torch.as_tensor(kv_block_count, dtype=torch.int32, device=device)
  index = torch.as_tensor(kv_block_index, dtype=torch.int32, device=device)
  return BlockMask.from_kv_blocks(
    torch.zeros_like(count),
    index,
    full_kv_num_blocks=count,
    full_kv_indices=index,
    BLOCK_SIZE=block,
    seq_lengths=(seq_len, seq_len),
  )


def check_flex(flex, *, device, seq_len=1000, heads=2, head_dim=64, sparsity=0.5) -> float:
  """Largest |flex - masked dense attention| at a small shape (float32; the seq_len is not a block multiple).
  `flex` must be compiled: eager FlexAttention does not skip blocks."""
  import torch

  case = inputs.Case(seq_len, heads, head_dim, (sparsity,))
  count, index, mask = kv_block_lists(jax.random.PRNGKey(7), case, sparsity)
  generator = torch.Generator(device=device).manual_seed(0)
  q, k, v = (torch.randn(1, heads, seq_len, head_dim, device=device, generator=generator) for _ in range(3))
  got = flex(q, k, v, block_mask=flex_block_mask(count, index, seq_len=seq_len, device=device))
  tokens = np.repeat(np.repeat(mask, BLOCK, -2), BLOCK, -1)[..., :seq_len, :seq_len]
  want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.as_tensor(tokens, device=device))
  return float((got - want).abs().max())


def measure(case: inputs.Case, *, flex, device, seed=0) -> list[dict]:
  """FlexAttention and cuDNN SDPA records for one case at each of its sparsities."""
  import torch
  from torch.nn.attention import SDPBackend, sdpa_kernel

  generator = torch.Generator(device=device).manual_seed(seed)
  shape = (1, case.heads, case.seq_len, case.head_dim)
  q, k, v, d_out = (torch.randn(shape, device=device, dtype=torch.bfloat16, generator=generator) for _ in range(4))
  q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))

  def cudnn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
      return torch.nn.functional.scaled_dot_product_attention(q, k, v)

  def forward(attend):
    def run():
      with torch.no_grad():
        return attend(q, k, v)

    return run

  def forward_backward(attend):
    return lambda: torch.autograd.grad(attend(q_, k_, v_), (q_, k_, v_), d_out)

  cudnn_fwd_ms = torch_timing.median_ms(forward(cudnn))
  cudnn_fwd_bwd_ms = torch_timing.median_ms(forward_backward(cudnn))
  records = []
  for target in case.sparsities:
    count, index, mask = kv_block_lists(jax.random.PRNGKey(seed + 1), case, target)
    sparsity = 1.0 - float(np.mean(mask))
    block_mask = flex_block_mask(count, index, seq_len=case.seq_len, device=device)
    attend = lambda q, k, v, block_mask=block_mask: flex(q, k, v, block_mask=block_mask)
    fwd_ms = torch_timing.median_ms(forward(attend))
    fwd_bwd_ms = torch_timing.median_ms(forward_backward(attend))
    records.append(
      dict(
        case=case.label,
        seq_len=case.seq_len,
        heads=case.heads,
        head_dim=case.head_dim,
        block=BLOCK,
        target_sparsity=target,
        sparsity=sparsity,
        fwd_ms=fwd_ms,
        fwd_bwd_ms=fwd_bwd_ms,
        cudnn_fwd_ms=cudnn_fwd_ms,
        cudnn_fwd_bwd_ms=cudnn_fwd_bwd_ms,
        fwd_speedup=cudnn_fwd_ms / fwd_ms,
        fwd_bwd_speedup=cudnn_fwd_bwd_ms / fwd_bwd_ms,
      )
    )
    r = records[-1]
    print(
      f"{case.label:>14} {r['sparsity']:6.3f}  flex {fwd_ms:7.3f} / {fwd_bwd_ms:7.3f} ms  cuDNN {cudnn_fwd_ms:7.2f} / "
      f"{cudnn_fwd_bwd_ms:7.2f} ms  {r['fwd_speedup']:5.2f}x / {r['fwd_bwd_speedup']:5.2f}x",
      flush=True,
    )
  return records


def compare(ours: list[dict], flex_records: list[dict]) -> list[dict]:
  """For each of our records with a flex record of the same case and target sparsity: ours over flex in
  time (flex ms / our ms) and in speedup over each one's cuDNN, forward and forward+backward; at the
  TARGET_SPARSITIES, whether the time ratios reach LEAD_TARGET."""
  by_row = {(r["case"], r["target_sparsity"]): r for r in flex_records}
  rows = []
  for r in ours:
    flex = by_row.get((r.get("case"), r["target_sparsity"]))
    if flex is None:
      continue
    row = dict(case=r["case"], backend=r["backend"], target_sparsity=r["target_sparsity"])
    for key in ("fwd", "fwd_bwd"):
      row[f"{key}_ours_over_flex"] = flex[f"{key}_ms"] / r[f"{key}_ms"]
      row[f"{key}_speedup_ours_over_flex"] = r[f"{key}_speedup"] / flex[f"{key}_speedup"]
    if r["target_sparsity"] in TARGET_SPARSITIES:
      row["target"] = LEAD_TARGET
      row["met"] = min(row["fwd_ours_over_flex"], row["fwd_bwd_ours_over_flex"]) >= LEAD_TARGET
    rows.append(row)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=None, help="results file (default benchmarks/results/attention-<device>.json)")
  args = parser.parse_args(argv)
  if importlib.util.find_spec("torch") is None:
    parser.error("this peer needs PyTorch (torch with CUDA and Triton)")
  import torch
  from torch.nn.attention.flex_attention import flex_attention

  if not torch.cuda.is_available():
    parser.error("this peer times FlexAttention on a CUDA GPU; torch sees none")
  jax.config.update("jax_platforms", "cpu")  # jax builds the masks; the GPU stays torch's
  device, name = "cuda", torch_timing.device_name()
  print(f"device: {name}  {torch_timing.versions()}", flush=True)
  # Each case compiles a forward and a forward+backward: past dynamo's recompile limit, flex would fall back
  # to eager, which ignores the block lists (dense attention, timed as if sparse).
  for limit in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, limit):
      setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
  flex = torch.compile(flex_attention, dynamic=False)
  check_error = check_flex(flex, device=device)
  print(f"check: flex vs masked dense attention, largest difference {check_error:.2e}", flush=True)
  # A wrong block (kept or skipped) moves outputs by O(0.1); TF32 matmuls, if torch allows them, by ~1e-3.
  if not check_error < 2e-2:
    raise SystemExit(f"error: FlexAttention disagrees with masked dense attention ({check_error:.2e})")
  flex_records, skipped = [], []
  for case in flex_cases():
    try:
      flex_records += measure(case, flex=flex, device=device)
    except Exception as e:  # one case failing (say, to compile) must not hide the others
      skipped.append(
        dict(case=case.label, reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
      )
      print(f"skip {case.label}: {skipped[-1]['reason']}", flush=True)
      torch.cuda.empty_cache()

  path = args.out or results.results_path("attention", name)
  ours = results.read_results(path).get("records", []) if os.path.exists(path) else []
  comparison = compare(ours, flex_records)
  section = {
    "command": "python -m benchmarks.flex_attention",
    "versions": torch_timing.versions(),
    "check_max_abs_error": check_error,
    "records": flex_records,
    "skipped": skipped,
  }
  results.add_sections(path, {"flex_attention": {**results.provenance(name), **section}, "flex_comparison": comparison})
  if not ours:
    print(f"no benchmarks.attention records in {path}: run it first for the ours/flex ratios")
  for row in comparison:
    verdict = "" if "met" not in row else f"  target >= {row['target']}: {'met' if row['met'] else 'NOT met'}"
    print(
      f"ours ({row['backend']}) over flex, {row['case']} at {row['target_sparsity']}: forward "
      f"{row['fwd_ours_over_flex']:.2f}x, forward+backward {row['fwd_bwd_ours_over_flex']:.2f}x{verdict}"
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
