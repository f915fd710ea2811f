"""The block-sparse attention op: attention over the kept tiles of a block mask, forward and backward.

- `reference`: dense float32 attention with the block mask applied token by token (tests only).
- `xla`: the plain-JAX backend (gathers over the index tables); runs anywhere.
- `triton`: Pallas Triton kernels (any CUDA GPU of compute capability 8.0 or newer).
- `mosaic`: Pallas Mosaic GPU kernels (Hopper: wgmma, TMA, warp specialisation): the entry points and limits;
  the kernels are `mosaic_forward`, `mosaic_dq` and `mosaic_dkv`, their shared pieces `mosaic_pipeline`.
- `schedule`: work items of uneven cost dealt to persistent CTAs.

Every backend has the same `forward` and `backward` signatures and conventions; `sparge_jax.backends` holds
what each supports.
"""
