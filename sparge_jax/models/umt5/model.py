"""The UMT5 text encoder in Flax NNX, number for number with transformers' `UMT5EncoderModel`.

`UMT5Encoder(config, *, rngs)(input_ids, attention_mask)` maps token ids `[batch, seq]` and their padding
mask to `last_hidden_state: [batch, seq, d_model]`. Wan2.1 encodes its prompts with the encoder of
`google/umt5-xxl` (`umt5_xxl()`).

The architecture, as transformers has it:
  - pre-norm blocks of self-attention then a gated-GELU feed-forward (`gelu(x W_gate) * (x W_up) W_down`,
    GELU with the tanh approximation), each added to the residual stream; a final RMS norm;
  - RMS norms with a scale and no bias or mean subtraction (T5's layer norm), computed in float32;
  - attention without the 1/sqrt(d_kv) factor (T5 folds it into the initialisation), plus a learned
    relative-position bias: positions are binned into `relative_attention_num_buckets` buckets (exact for
    short distances, logarithmic up to `relative_attention_max_distance`, one per direction), and every layer
    has its own bias table (T5 has one in the first layer only);
  - padded keys are masked out; padded queries are computed all the same (the pipeline discards them).

Precision. Matmuls run in `dtype` (float32 accumulation). The residual stream, the norms, the position bias
and the softmax stay in float32 (transformers' bfloat16 encoder keeps its residual stream in bfloat16; float32
costs little at text lengths and stays closer to the float32 model). The output is in `dtype`.

Layers are stacked on a leading `layers` axis and run with `nnx.scan`, so the 24 layers compile once.

Logical axis names (`nnx.with_partitioning`, no eager sharding), mapped to mesh axes with
`nnx.logical_axis_rules` or `load_umt5_encoder(mesh=, rules=)`:
  "layers"  the stacked block axis (leading axis of every block parameter)
  "vocab"   the vocabulary axis of the embedding table
  "embed"   the model width (`d_model`)
  "heads"   the attention inner width (`num_heads * d_kv`) of the q/k/v/o projections
  "mlp"     the feed-forward hidden width (`d_ff`)
  None      replicated: the relative-position bias tables [buckets, num_heads].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FEED_FORWARD_PROJ = "gated-gelu"


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """UMT5 encoder architecture, with transformers' `UMT5Config` field names and meanings."""

  vocab_size: int = 256384
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = FEED_FORWARD_PROJ

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_max_distance"):
      _check_integer(name, getattr(self, name), 1, "a positive integer")
    # Two directions, each with at least one exact and one logarithmic bucket.
    buckets = _check_integer(
      "relative_attention_num_buckets", self.relative_attention_num_buckets, 4, "an integer >= 4"
    )
    if self.relative_attention_max_distance <= buckets // 4:
      raise ValueError(
        f"relative_attention_max_distance must exceed relative_attention_num_buckets // 4 = {buckets // 4} "
        f"(the last exact distance), got {self.relative_attention_max_distance}"
      )
    eps = self.layer_norm_epsilon
    if not isinstance(eps, float | int) or isinstance(eps, bool) or not eps > 0:
      raise ValueError(f"layer_norm_epsilon must be a positive number, got {eps!r}")
    if self.feed_forward_proj != FEED_FORWARD_PROJ:
      raise ValueError(f"feed_forward_proj must be {FEED_FORWARD_PROJ!r} (UMT5's), got {self.feed_forward_proj!r}")


def _check_integer(name: str, value, minimum: int, description: str) -> int:
  if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be {description}, got {value!r}")
  return int(value)


def umt5_xxl() -> UMT5Config:
  """google/umt5-xxl's encoder (Wan2.1's text encoder): 24 layers, d_model 4096, 64 heads x 64, d_ff 10240."""
  return UMT5Config()


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """int32 [query_len, key_len]: the bucket of each (query, key) offset, bidirectional (an encoder's).

  Half the buckets are for keys after the query. Within a direction, distances below `num_buckets // 4`
  get a bucket each; longer ones share logarithmically wider buckets up to `max_distance`, beyond which
  all fall in the last. Float32 logarithms, as transformers (and Mesh TensorFlow) compute them, so that
  offsets on a bucket boundary land where they do there.
  """
  offset = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
  per_direction = num_buckets // 2
  exact = per_direction // 2
  distance = np.abs(offset)
  log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
  log_ratio = log_ratio / np.float32(math.log(max_distance / exact)) * np.float32(per_direction - exact)
  far = np.minimum(exact + log_ratio.astype(np.int64), per_direction - 1)
  bucket = np.where(distance < exact, distance, far) + (offset > 0) * per_direction
  return bucket.astype(np.int32)


def _partitioned(initializer, axes):
  """Logical axis names only; placement is the loader's (or a jit's out_shardings), so building needs no mesh."""
  return nnx.with_partitioning(initializer, axes, eager_sharding=False)


def _linear(in_features, out_features, axes, stddev, *, param_dtype, dtype, rngs) -> nnx.Linear:
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=False,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_partitioned(nnx.initializers.normal(stddev), axes),
    rngs=rngs,
  )


def _rms_norm(features, eps, *, param_dtype, rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(
    features,
    epsilon=eps,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    use_fast_variance=False,
    scale_init=_partitioned(nnx.initializers.ones_init(), ("embed",)),
    rngs=rngs,
  )


class UMT5Block(nnx.Module):
  """Self-attention with this layer's relative-position bias, then the gated-GELU feed-forward."""

  def __init__(self, config: UMT5Config, *, param_dtype, dtype, rngs: nnx.Rngs):
    c = config
    self.heads, self.head_dim, self.dtype = c.num_heads, c.d_kv, dtype
    kwargs = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
    # transformers' (Mesh TensorFlow's) initialisation: the query carries the softmax scale.
    self.attention_norm = _rms_norm(c.d_model, c.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)
    self.query = _linear(c.d_model, c.inner_dim, ("embed", "heads"), (c.d_model * c.d_kv) ** -0.5, **kwargs)
    self.key = _linear(c.d_model, c.inner_dim, ("embed", "heads"), c.d_model**-0.5, **kwargs)
    self.value = _linear(c.d_model, c.inner_dim, ("embed", "heads"), c.d_model**-0.5, **kwargs)
    self.out = _linear(c.inner_dim, c.d_model, ("heads", "embed"), c.inner_dim**-0.5, **kwargs)
    self.relative_attention_bias = nnx.Param(
      _partitioned(nnx.initializers.normal(c.d_model**-0.5), (None, None))(
        rngs.params(), (c.relative_attention_num_buckets, c.num_heads), param_dtype
      )
    )
    self.ffn_norm = _rms_norm(c.d_model, c.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)
    self.ffn_gate = _linear(c.d_model, c.d_ff, ("embed", "mlp"), c.d_model**-0.5, **kwargs)
    self.ffn_up = _linear(c.d_model, c.d_ff, ("embed", "mlp"), c.d_model**-0.5, **kwargs)
    self.ffn_down = _linear(c.d_ff, c.d_model, ("mlp", "embed"), c.d_ff**-0.5, **kwargs)

  def __call__(self, x, buckets, key_mask):
    """x: float32 [batch, seq, d_model]; buckets: int32 [seq, seq]; key_mask: bool [batch, 1, 1, seq].

    Returns the residual stream after this block, float32 [batch, seq, d_model].
    """
    batch, seq, _ = x.shape
    h = self.attention_norm(x).astype(self.dtype)
    q, k, v = (proj(h).reshape(batch, seq, self.heads, self.head_dim) for proj in (self.query, self.key, self.value))
    bias = self.relative_attention_bias[...].astype(jnp.float32)[buckets]  # [seq, seq, heads]
    attended = jax.nn.dot_product_attention(q, k, v, bias=bias.transpose(2, 0, 1)[None], mask=key_mask, scale=1.0)
    x = x + self.out(attended.reshape(batch, seq, -1)).astype(jnp.float32)

    h = self.ffn_norm(x).astype(self.dtype)
    hidden = jax.nn.gelu(self.ffn_gate(h), approximate=True) * self.ffn_up(h)
    return x + self.ffn_down(hidden).astype(jnp.float32)


class UMT5Encoder(nnx.Module):
  """UMT5's encoder stack (transformers' `UMT5EncoderModel`); see the module docstring."""

  def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32, dtype: Any = jnp.float32):
    if not isinstance(config, UMT5Config):
      raise ValueError(f"config must be a UMT5Config, got {type(config).__name__}")
    self.config, self.dtype = config, dtype
    self.embedding = nnx.Embed(
      config.vocab_size,
      config.d_model,
      param_dtype=param_dtype,
      embedding_init=_partitioned(nnx.initializers.normal(1.0), ("vocab", "embed")),
      rngs=rngs,
    )

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return UMT5Block(config, param_dtype=param_dtype, dtype=dtype, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = _rms_norm(config.d_model, config.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids, attention_mask):
    """input_ids: int [batch, seq]; attention_mask: bool or int [batch, seq], nonzero for real tokens.

    Returns last_hidden_state [batch, seq, d_model] in the compute dtype.
    """
    input_ids, attention_mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integer [batch, seq], got {input_ids.dtype} {input_ids.shape}")
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask must be shaped like input_ids {input_ids.shape}, got {attention_mask.shape}")
    if not (jnp.issubdtype(attention_mask.dtype, jnp.integer) or attention_mask.dtype == jnp.bool_):
      raise ValueError(f"attention_mask must be bool or integer, got {attention_mask.dtype}")
    c = self.config
    seq = input_ids.shape[1]
    buckets = jnp.asarray(
      relative_position_buckets(seq, seq, c.relative_attention_num_buckets, c.relative_attention_max_distance)
    )
    key_mask = (attention_mask != 0)[:, None, None, :]
    x = self.embedding(input_ids).astype(jnp.float32)

    def run_block(block, x):
      return block(x, buckets, key_mask)

    x = nnx.scan(run_block, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.blocks, x)
    return self.final_norm(x).astype(self.dtype)
