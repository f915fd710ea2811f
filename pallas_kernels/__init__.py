"""The ops of sparge-jax, one package each: its plain-JAX reference, its XLA backend and its Pallas kernels.

- `block_mask`: pooled block scores, Top-k ∪ Top-p selection, index tables.
- `block_sparse_attention`: attention over the kept blocks (forward, dQ, dK/dV).

No Flax and no public API here: `sparge_jax.attention` is the interface.
"""
