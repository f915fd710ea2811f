"""Sequence parallelism for block-sparse attention: Ulysses, ring (merged by log-sum-exp) and USP.

Each function runs inside `jax.shard_map`, on q, k, v [batch, seq, heads, head_dim] sharded along seq over
the named mesh axis (or axes), and returns the output sharded the same way:

    spec = P(None, "sequence")
    attend = jax.shard_map(
      lambda q, k, v: ulysses_attention(q, k, v, axis_name="sequence", topk=0.05),
      mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
    )

- `ulysses_attention`: all-to-all from sequence to head sharding, each device attends over the whole
  sequence for its heads, all-to-all back (`sparge_jax.parallel.ulysses`).
- `ring_attention`: q stays, k/v shards rotate (`ppermute`); each step attends the visiting shard with its
  columns of the global mask and merges by log-sum-exp; the backward rotates dK/dV home
  (`sparge_jax.parallel.ring`).
- `usp_attention`: Ulysses over one axis around ring attention over another.
- `load_balance`, `balanced_head_order`: the kept work per device, and a head order that evens it out.

The keyword arguments are those of `sparge_jax.attention.dot_product_attention`. docs/ARCHITECTURE.md
("Sequence parallelism") says how to launch, which axis sizes fit which model, and what each scheme moves.
"""

from sparge_jax.parallel.api import ring_attention, ring_block_mask, ulysses_attention, usp_attention
from sparge_jax.parallel.balance import LoadBalance, balanced_head_order, load_balance

__all__ = [
  "LoadBalance",
  "balanced_head_order",
  "load_balance",
  "ring_attention",
  "ring_block_mask",
  "ulysses_attention",
  "usp_attention",
]
