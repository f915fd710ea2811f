"""Ways to build the compact kv-block index table from a block mask, timed against each other.

    python -m benchmarks.index_tables                       # 32,760 x 12 heads shape: mask [1, 12, 256, 512]
    python -m benchmarks.index_tables --rows 256 --cols 512 --heads 40 --sparsity 0.95

`sparge_jax.mask.index_table` turns a bool mask [..., rows, cols] into (index, count): row r keeps the
columns index[r, :count[r]] in ascending order, zeros after. Every variant here must give the same arrays
(checked before timing). `sparge_jax.mask.index_table` is `cumsum_scatter`: on the H100 none of the XLA
variants beat it (benchmarks/NOTES.md, "Index tables"). Writes `benchmarks/results/index-tables-<device>.json`.

Variants (cumsum c[r, j] = kept columns up to and including j):
- cumsum_scatter: c by `jnp.cumsum`, then kept column j is scattered to slot c[j] - 1 (the original).
- matmul_scatter: c by a matmul with an upper-triangular ones matrix (exact: 0/1 inputs, f32 sums), then
  the same scatter; a 512-long cumsum is a reduce-window in XLA, a matmul is one tensor-core pass.
- matmul_count: c by matmul; index[r, s] = #{j : c[r, j] <= s} (the (s+1)-th kept column), a compare-and-sum
  that XLA fuses into one reduction with no scatter.
- argsort: a stable argsort of ~mask (kept columns first, in order).
- pallas_kernel: `pallas_kernels.block_mask.triton_index_table` (rows in registers, each column written once to
  its rank); what the Pallas backends use since 2026-11-26.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import inputs, results, timing
from pallas_kernels.block_mask import triton_index_table as index_table
from sparge_jax import mask as mask_lib


def _cumsum_matmul(flat):
  cols = flat.shape[-1]
  upper = jnp.triu(jnp.ones((cols, cols), jnp.bfloat16))  # upper[i, j] = 1 where i <= j
  return jnp.dot(flat.astype(jnp.bfloat16), upper, preferred_element_type=jnp.float32).astype(jnp.int32)


def _scatter(flat, cumsum):
  rows, cols = flat.shape
  slot = jnp.where(flat, cumsum - 1, cols)
  target = (jnp.arange(rows, dtype=jnp.int32)[:, None] * (cols + 1) + slot).reshape(-1)
  column = jnp.broadcast_to(jnp.arange(cols, dtype=jnp.int32), flat.shape).reshape(-1)
  index = jnp.zeros(rows * (cols + 1), jnp.int32).at[target].set(column, mode="drop")
  return index.reshape(rows, cols + 1)[:, :cols]


def _count(flat, cumsum):
  cols = flat.shape[-1]
  slots = jnp.arange(cols, dtype=jnp.int32)
  index = jnp.sum(cumsum[:, None, :] <= slots[None, :, None], axis=-1, dtype=jnp.int32)
  return jnp.where(slots[None, :] < cumsum[:, -1:], index, 0)


def cumsum_scatter(flat):
  return _scatter(flat, jnp.cumsum(flat, axis=-1, dtype=jnp.int32))


def matmul_scatter(flat):
  return _scatter(flat, _cumsum_matmul(flat))


def matmul_count(flat):
  return _count(flat, _cumsum_matmul(flat))


def argsort(flat):
  order = jnp.argsort(~flat, axis=-1, stable=True).astype(jnp.int32)
  count = jnp.sum(flat, axis=-1, dtype=jnp.int32)
  return jnp.where(jnp.arange(flat.shape[-1])[None, :] < count[:, None], order, 0)


def pallas_kernel(flat):
  return index_table.index_table(flat, interpret=jax.default_backend() != "gpu")[0]


VARIANTS = {
  "cumsum_scatter": cumsum_scatter,
  "matmul_scatter": matmul_scatter,
  "matmul_count": matmul_count,
  "argsort": argsort,
  "pallas_kernel": pallas_kernel,
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--rows", type=int, default=256)
  parser.add_argument("--cols", type=int, default=512)
  parser.add_argument("--sparsity", type=float, nargs="+", default=[0.95, 0.0])
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if min(args.heads, args.rows, args.cols) < 1 or not all(0 <= s < 1 for s in args.sparsity):
    parser.error("--heads/--rows/--cols must be >= 1 and --sparsity in [0, 1)")
  found = []
  print(
    f"device: {results.device_name()}; mask [1, {args.heads}, {args.rows}, {args.cols}], forward + transposed table"
  )
  for sparsity in args.sparsity:
    mask = inputs.random_block_mask(
      jax.random.key(0), 1, args.heads, args.rows, args.cols, inputs.kept_count(sparsity, args.cols)
    )
    expected = mask_lib.index_tables(mask)
    for name, variant in VARIANTS.items():

      def table(m, variant=variant):
        *lead, cols = m.shape
        return variant(m.reshape(-1, cols)).reshape(*lead, cols), jnp.sum(m, axis=-1, dtype=jnp.int32)

      both = jax.jit(lambda m, table=table: (table(m), table(jnp.swapaxes(m, -1, -2))))
      got = both(mask)
      same = all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected))
      )
      ms = timing.median_ms(both, mask) if same else None
      found.append({"sparsity": sparsity, "variant": name, "equal": same, "ms": ms})
      print(f"sparsity {sparsity:.2f} {name:>15}: {'WRONG' if not same else f'{ms:.4f} ms'}", flush=True)
  out = args.out or results.results_path("index-tables")
  results.write_results(
    out,
    {
      "command": "python -m benchmarks.index_tables",
      "heads": args.heads,
      "rows": args.rows,
      "cols": args.cols,
      "results": found,
    },
  )
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
