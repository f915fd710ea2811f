"""Pallas kernels of sparge-jax: block-sparse attention (forward, dQ, dK/dV) and mask pooling.

Kernels only; the public API is `sparge_jax.attention`. Importable without Flax.
"""
