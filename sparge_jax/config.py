"""`AttentionConfig`: how a model's self-attention runs, validated once, when it is built.

The same type serves the functional API (`sparge_jax.attention`), the Wan model (`WanConfig.attention`) and
the trainer's config (`train.configs.Config.attention`). It is frozen and hashable, so it can be static
`jax.jit` data; building one never traces or compiles anything.
"""

from __future__ import annotations

import dataclasses

KINDS = ("dense", "sparse")
MODES = ("hybrid", "topk", "topp")
IMPLEMENTATIONS = (None, "mosaic", "triton", "xla")
# The largest tile any backend runs: bigger tiles overflow shared memory (Pallas GPU) or the int32 grid
# arithmetic of the index tables.
MAX_BLOCK = 1024


def check_block(name: str, block) -> None:
  """ValueError naming `name` unless `block` is a power of two in [16, MAX_BLOCK]."""
  if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block > MAX_BLOCK or block & (block - 1):
    raise ValueError(f"{name} must be a power of two in [16, {MAX_BLOCK}], got {block!r}")


def check_fraction(name: str, value) -> None:
  """ValueError naming `name` unless `value` is a concrete float in [0, 1] (NaN fails)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
    raise ValueError(f"{name} must be in [0, 1] (a float), got {value!r}")


def _as_fraction_or_tuple(name: str, value):
  """A float in [0, 1], or a non-empty tuple of them (from a list, tuple or array of per-head values)."""
  if hasattr(value, "tolist"):  # numpy or jax arrays, concrete
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    if not value:
      raise ValueError(f"{name} must be a float or a non-empty per-head sequence, got {value!r}")
    for i, v in enumerate(value):
      check_fraction(f"{name}[{i}]", v)
    return tuple(float(v) for v in value)
  check_fraction(name, value)
  return float(value)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """How self-attention runs. `kind="dense"` ignores the other fields.

  Attributes:
    kind: "dense" (cuDNN/XLA full attention) or "sparse" (the block-sparse kernels).
    topk: fraction of kv blocks each query block keeps (Top-k), a float in [0, 1] or one per head.
    topp: attention mass each query block keeps (Top-p), a float in [0, 1] or one per head.
    mode: "hybrid" (Top-k ∪ Top-p), "topk" or "topp".
    block_q: query tile size in tokens, a power of two in [16, MAX_BLOCK].
    block_kv: key/value tile size in tokens, a power of two in [16, MAX_BLOCK].
    implementation: None (auto), "mosaic", "triton" or "xla".
  """

  kind: str = "dense"
  topk: float | tuple[float, ...] = 0.03
  topp: float | tuple[float, ...] = 0.2
  mode: str = "hybrid"
  block_q: int = 128
  block_kv: int = 64
  implementation: str | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
    # Per-head values become tuples: lists and arrays would make the config unhashable.
    object.__setattr__(self, "topk", _as_fraction_or_tuple("topk", self.topk))
    object.__setattr__(self, "topp", _as_fraction_or_tuple("topp", self.topp))
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    check_block("block_q", self.block_q)
    check_block("block_kv", self.block_kv)
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")

  def check_heads(self, heads: int) -> None:
    """ValueError unless per-head topk/topp have one value per head."""
    for name in ("topk", "topp"):
      value = getattr(self, name)
      if isinstance(value, tuple) and len(value) != heads:
        raise ValueError(f"{name} has {len(value)} per-head values, but the model has {heads} heads")

  @property
  def sparse(self) -> bool:
    return self.kind == "sparse"
