"""`AttentionConfig`: how a model's self-attention runs, validated once, when it is built.

The same type serves the functional API (`sparge_jax.attention`), the Wan model (`WanConfig.attention`) and
the trainer's config (`train.configs.Config.attention`). It is frozen and hashable, so it can be static
`jax.jit` data; building one never traces or compiles anything.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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
  """ValueError naming `name` unless `value` is a concrete float in [0, 1] (NaN fails).

  For settings (`AttentionConfig`, schedules); the API's arguments, which may be per-head arrays or traced,
  go through `check_fraction_argument`.
  """
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


# ------------------------------------------------------------------------------ call-time checks
# The attention API validates its arguments here, before any work, so each rule is stated once.

FRACTION_FOR_NAN = 1.0  # a traced NaN topk or topp keeps every allowed block: dense attention, never less


def check_fraction_argument(name: str, value, heads: int) -> None:
  """ValueError naming `name` unless `value` is a float or a [heads] array, each in [0, 1] where concrete.

  Traced values pass (their contents are unknown while tracing); `clamp_fractions` states what happens to
  traced values outside [0, 1].
  """
  shape = getattr(value, "shape", None)
  if shape is None and isinstance(value, (list, tuple)):
    shape = (len(value),)
  shape = () if shape is None else tuple(shape)
  if shape not in ((), (heads,)):
    raise ValueError(f"{name} must be a float or an array of shape [heads] = ({heads},), got shape {shape}")
  if isinstance(value, bool) or (hasattr(value, "dtype") and value.dtype == bool):
    raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
  if _is_traced(value):
    return
  values = np.asarray(value, dtype=np.float64).reshape(-1)
  if not np.all((values >= 0.0) & (values <= 1.0)):  # NaN fails
    raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def clamp_fractions(value):
  """float32 `value` clipped to [0, 1], NaN -> FRACTION_FOR_NAN: the rule a traced topk or topp follows."""
  value = jnp.asarray(value, jnp.float32)
  return jnp.where(jnp.isnan(value), FRACTION_FOR_NAN, jnp.clip(value, 0.0, 1.0))


def _is_traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def check_choice(name: str, value, choices) -> None:
  """ValueError naming `name` unless `value` is one of `choices`."""
  if not any(value is c or (c is not None and value == c) for c in choices):
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_scale(scale) -> None:
  """ValueError unless `scale` is None or a positive finite float."""
  ok = isinstance(scale, (int, float, np.floating, np.integer)) and not isinstance(scale, bool)
  if scale is not None and not (ok and np.isfinite(scale) and scale > 0):
    raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")


def check_qkv(q, k, v, names=("q", "k", "v")) -> None:
  """ValueError naming the argument unless q: [B, T, N, H], k and v: [B, S, K, H] with N % K == 0.

  All three share a floating dtype; every size is at least 1.
  """
  q_name, k_name, v_name = names
  for name, x in zip(names, (q, k, v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or len(x.shape) != 4:
      raise ValueError(
        f"{name} must be a 4-D array [batch, seq, heads, head_dim], got shape {getattr(x, 'shape', type(x))}"
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype (bfloat16, float16 or float32), got {x.dtype}")
    for axis, what in enumerate(("batch", "sequence", "heads", "head_dim")):
      if x.shape[axis] < 1:
        raise ValueError(f"{name} has an empty {what} axis (axis {axis}): shape {tuple(x.shape)}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"{q_name}, {k_name} and {v_name} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  shapes = f"{q_name} {tuple(q.shape)}, {k_name} {tuple(k.shape)}, {v_name} {tuple(v.shape)}"
  for axis, what in ((0, "batch"), (3, "head_dim")):
    if not (q.shape[axis] == k.shape[axis] == v.shape[axis]):
      raise ValueError(f"{q_name}, {k_name} and {v_name} must agree in {what} (axis {axis}): {shapes}")
  if k.shape[1] != v.shape[1]:
    raise ValueError(f"{k_name} and {v_name} must have the same sequence length: {shapes}")
  if k.shape[2] != v.shape[2]:
    raise ValueError(f"{k_name} and {v_name} must have the same number of heads: {shapes}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"the heads of {q_name} must be a multiple of the heads of {k_name} and {v_name}: {shapes}")


def check_seq_lengths(name: str, lengths, batch: int) -> None:
  """ValueError naming `name` unless `lengths` is None or an int32 [batch] array, ≥ 0 where concrete.

  Values above the sequence length count as the whole sequence.
  """
  if lengths is None:
    return
  if not hasattr(lengths, "shape") or not hasattr(lengths, "dtype"):
    raise ValueError(f"{name} must be an int32 array of shape [batch] = ({batch},), got {type(lengths).__name__}")
  if tuple(lengths.shape) != (batch,):
    raise ValueError(f"{name} must have shape [batch] = ({batch},), got {tuple(lengths.shape)}")
  if lengths.dtype != np.int32:
    raise ValueError(f"{name} must have dtype int32, got {lengths.dtype}")
  if not _is_traced(lengths) and np.any(np.asarray(lengths) < 0):
    raise ValueError(f"{name} must be ≥ 0, got {np.asarray(lengths).tolist()}")
