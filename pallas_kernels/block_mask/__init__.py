"""The block mask op: pooled block scores, Top-k ∪ Top-p selection and index tables.

- `reference`: the plain-JAX mask (pooling, pooled probabilities, selection), the "xla" implementation.
- `index_table`: the kernels' per-row lists of kept blocks, in plain JAX.
- `triton_pool`, `triton_select`, `triton_index_table`: the same stages as Pallas Triton kernels.
"""
