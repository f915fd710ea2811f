"""Pallas kernels of sparge-jax: block-sparse attention (forward, dQ, dK/dV),
mask pooling, block selection and index tables.

Kernels only; the public API is `sparge_jax.attention`. Importable without Flax.
"""
