"""Wan2.1 text-to-video DiT in Flax NNX, number for number with diffusers' `WanTransformer3DModel`.

`WanModel(config, *, rngs)(x, t, context)` maps latents `x: [batch, frames, height, width, channels]`
(channels last), timesteps `t: [batch]` in [0, 1000] and text embeddings
`context: [batch, text_len, text_dim]` to the predicted velocity, shaped like `x` with `out_channels`.

Dense or sparse self-attention. `config.attention` (an `AttentionConfig`) picks it; cross-attention to
text is always dense. The setting is static configuration, not a parameter, so switching never copies
weights: `model.set_attention(AttentionConfig(kind="sparse", topk=0.03, topp=0.2))` changes the
model in place (a jitted function retraces once). A dense teacher and a sparse student can start from
the same arrays: `student = nnx.merge(*nnx.split(teacher)); student.set_attention(sparse)` makes new
Variables over the same (immutable) arrays, so training the student never touches the teacher.

Per-layer sparsity as data. `model(x, t, context, layer_sparsity=LayerSparsity(topk, topp))` runs every
self-attention with the sparse rule of `config.attention` (mode, block sizes, implementation) at each layer's
own topk/topp, given as arrays [num_layers, heads] that are scanned with the blocks: a jitted caller
changes them (per denoising step, per layer) without recompiling. A layer at topk = topp = 1 keeps every
block, which is how a schedule makes a layer dense without control flow.

Layers. The blocks' parameters are stacked on a leading `layers` axis (built with `nnx.vmap`) and the
forward runs them with `nnx.scan`, so 30-40 layers compile once; `config.remat` rematerialises each
block in the backward pass, except the intermediates named in `config.remat_saves`, which stay in
memory (per layer and video token, bf16: "qkv" 6*dim bytes, "ffn_hidden" 2*ffn_dim): memory for
fewer recomputed matmuls. Attention itself is always recomputed (a custom-vjp kernel's residuals).

Data parallelism over a mesh. The attention kernels (Pallas custom calls, cuDNN) are opaque to XLA's
sharding propagation, and with FSDP-sharded weights it otherwise prefers to split the model width and
replicate the batch, so every device would attend over the whole global batch. `config.batch_axes`
names the mesh axes that split the batch (e.g. `("data", "fsdp")`); the model then pins the residual
stream to batch sharding and runs each attention under `jax.shard_map` on its own examples. It needs
the mesh as context (`with jax.set_mesh(mesh):` around tracing); it is a run option, so weights load
and save the same with or without it, and on a one-device mesh it changes nothing.

Sequence parallelism over a mesh. `config.sequence_axes` names the mesh axes that split each video's
tokens and `config.sequence_parallel` how self-attention spans them (`sparge_jax.parallel`): "ulysses"
(one axis; all-to-all to head sharding), "ring" (one axis; k/v rotate, merged by log-sum-exp) or "usp"
(two axes, (Ulysses, ring)). The residual stream stays sharded along the tokens (norms, modulation and the
FFN act per token); cross-attention reads the whole text on every device (text is short). Where the
tokens do not split evenly (over the devices; for "ring" and "usp" into whole blocks of every device,
so that the mask is the unsharded one), they are padded at the end and the attention is told the true
length, which leaves the result unchanged. Dense self-attention runs as Ulysses around the dense kernel
where it can (no padding, heads divisible), and otherwise as the sparse kernels keeping every block. A
run option like `batch_axes`, with which it combines; traced under the mesh (`jax.set_mesh`).

Logical axis names (`nnx.with_partitioning`; no eager sharding, so building a model needs no mesh).
Map them to mesh axes with `nnx.logical_axis_rules`, e.g. for FSDP
`with nnx.logical_axis_rules([("embed", "fsdp")]): specs = nnx.get_partition_spec(nnx.state(model))`
(every name needs a rule there; `load_diffusers(mesh=, rules=)` replicates the unnamed ones itself):
  "layers"      the stacked block axis (leading axis of every block parameter)
  "embed"       the model width (`dim` = heads * head_dim)
  "heads"       the attention inner width (heads * head_dim) of q/k/v/out projections and qk-norms
  "mlp"         the feed-forward hidden width (`ffn_dim`)
  "text_embed"  the text-encoder width (`text_dim`) of the text projection's input
  None          replicated: patch volume, time frequencies, the modulation tables' 6/2 rows, the
                head's output features, and the second side of the time/text projections.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from sparge_jax.config import AttentionConfig
from sparge_jax.models.wan import attend as attend_lib
from sparge_jax.models.wan.attend import LayerSparsity, SequenceSharding

_ROPE_THETA = 10000.0
# Wan's timestep sinusoid uses the usual 10,000 period.
_TIME_MAX_PERIOD = 10000.0


# Block intermediates that `WanConfig.remat_saves` can keep through the backward pass.
REMAT_SAVEABLE = ("qkv", "ffn_hidden")
# `WanConfig.sequence_parallel` schemes and the mesh axes each takes.
SEQUENCE_PARALLEL = {"ulysses": 1, "ring": 1, "usp": 2}


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """Architecture (diffusers config.json names and meanings) plus run options.

  Architecture fields must match a checkpoint; `attention`, `remat`, `remat_saves`, `param_dtype`,
  `compute_dtype`, `batch_axes` (mesh axes that split the batch), `sequence_axes` (mesh axes that split
  the tokens) and `sequence_parallel` ("ulysses", "ring" or "usp" over them; see the module docstring)
  are run options.
  Norms, modulation and the time embedding always compute in float32.
  """

  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 12
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 8960
  num_layers: int = 30
  cross_attn_norm: bool = True
  eps: float = 1e-6
  rope_max_seq_len: int = 1024
  attention: AttentionConfig = AttentionConfig()
  remat: bool = False
  remat_saves: tuple[str, ...] = ()
  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  batch_axes: tuple[str, ...] = ()
  sequence_axes: tuple[str, ...] = ()
  sequence_parallel: str = "ulysses"

  @property
  def dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def rope_dims(self) -> tuple[int, int, int]:
    """Head-dim channels given to the frame, height and width rotary axes (diffusers' split)."""
    hw = 2 * (self.attention_head_dim // 6)
    return self.attention_head_dim - 2 * hw, hw, hw

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    if isinstance(self.batch_axes, str) or not all(isinstance(a, str) for a in self.batch_axes):
      raise ValueError(f"batch_axes must be a tuple of mesh axis names, got {self.batch_axes!r}")
    object.__setattr__(self, "batch_axes", tuple(self.batch_axes))
    if isinstance(self.sequence_axes, str) or not all(isinstance(a, str) for a in self.sequence_axes):
      raise ValueError(f"sequence_axes must be a tuple of mesh axis names, got {self.sequence_axes!r}")
    object.__setattr__(self, "sequence_axes", tuple(self.sequence_axes))
    if self.sequence_parallel not in SEQUENCE_PARALLEL:
      raise ValueError(f"sequence_parallel must be one of {tuple(SEQUENCE_PARALLEL)}, got {self.sequence_parallel!r}")
    wanted = SEQUENCE_PARALLEL[self.sequence_parallel]
    if self.sequence_axes and len(self.sequence_axes) != wanted:
      raise ValueError(
        f"sequence_parallel={self.sequence_parallel!r} takes {wanted} sequence_axes, got {self.sequence_axes!r}"
      )
    if set(self.sequence_axes) & set(self.batch_axes) or len(set(self.sequence_axes)) < len(self.sequence_axes):
      raise ValueError(f"sequence_axes {self.sequence_axes} must be distinct and not in batch_axes {self.batch_axes}")
    if isinstance(self.remat_saves, str) or not set(self.remat_saves) <= set(REMAT_SAVEABLE):
      raise ValueError(f"remat_saves must be a tuple of names from {REMAT_SAVEABLE}, got {self.remat_saves!r}")
    object.__setattr__(self, "remat_saves", tuple(self.remat_saves))
    if len(self.patch_size) != 3 or min(self.patch_size) < 1:
      raise ValueError(f"patch_size must be 3 positive ints, got {self.patch_size}")
    if any(d % 2 for d in self.rope_dims):
      raise ValueError(f"attention_head_dim {self.attention_head_dim} splits into odd rotary dims {self.rope_dims}")
    if not isinstance(self.attention, AttentionConfig):
      raise ValueError(f"attention must be an AttentionConfig, got {type(self.attention).__name__}")


def tiny() -> WanConfig:
  """A 2-layer toy with Wan's structure, for CPU tests (head_dim 16 splits into rotary dims 8/4/4)."""
  return WanConfig(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=16,
    ffn_dim=64,
    num_layers=2,
  )


def wan2_1_1_3b() -> WanConfig:
  """Wan2.1-T2V-1.3B: dim 1536, 30 layers, 12 heads x 128, ffn 8960."""
  return WanConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)


def wan2_1_14b() -> WanConfig:
  """Wan2.1-T2V-14B: dim 5120, 40 layers, 40 heads x 128, ffn 13824."""
  return WanConfig(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)


def _partitioned(initializer, axes):
  """Attach logical axis names; placement is the caller's (load_diffusers, or the trainer's jit
  out_shardings), so building a model never needs a mesh."""
  return nnx.with_partitioning(initializer, axes, eager_sharding=False)


def _linear(
  in_features: int,
  out_features: int,
  axes: tuple[str | None, str | None],
  config: WanConfig,
  rngs: nnx.Rngs,
  dtype=None,
) -> nnx.Linear:
  return nnx.Linear(
    in_features,
    out_features,
    dtype=dtype or config.compute_dtype,
    param_dtype=config.param_dtype,
    kernel_init=_partitioned(nnx.initializers.lecun_normal(), axes),
    bias_init=_partitioned(nnx.initializers.zeros_init(), (axes[1],)),
    rngs=rngs,
  )


def _layer_norm(x, eps: float):
  """Parameter-free LayerNorm in float32 (two-pass variance, like torch)."""
  x = x.astype(jnp.float32)
  centered = x - x.mean(-1, keepdims=True)
  return centered * jax.lax.rsqrt(jnp.mean(jnp.square(centered), -1, keepdims=True) + eps)


def _apply_rope(x, cos, sin):
  """Rotate interleaved channel pairs (x[2i], x[2i+1]). x: [batch, seq, heads, head_dim]; cos, sin: [seq, head_dim/2]."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def rope_tables(config: WanConfig, frames: int, height: int, width: int):
  """cos, sin float32 [frames*height*width, head_dim/2] for a token grid (after patching).

  Each axis gets its own slice of channel pairs, frequencies theta^(-2i/d_axis), angles in float64
  like diffusers; tokens are ordered frame-major, then height, then width.
  """
  per_axis = []
  for positions, dim in zip((frames, height, width), config.rope_dims):
    freqs = 1.0 / _ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.outer(np.arange(positions, dtype=np.float64), freqs)
    per_axis.append((np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)))

  def grid(tables):
    t, h, w = (jnp.asarray(a) for a in tables)
    shape = (frames, height, width)
    full = jnp.concatenate(
      [
        jnp.broadcast_to(t[:, None, None], shape + t.shape[-1:]),
        jnp.broadcast_to(h[None, :, None], shape + h.shape[-1:]),
        jnp.broadcast_to(w[None, None, :], shape + w.shape[-1:]),
      ],
      axis=-1,
    )
    return full.reshape(frames * height * width, -1)

  return grid([c for c, _ in per_axis]), grid([s for _, s in per_axis])


def timestep_sinusoid(t, dim: int):
  """t: [batch] -> float32 [batch, dim], [cos | sin] with frequencies 10000^(-i/(dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(_TIME_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class Attention(nnx.Module):
  """Multi-head attention with RMS qk-norm across all heads (Wan's `attn1`/`attn2`)."""

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    dim, heads_width = config.dim, config.dim
    self.heads = config.num_attention_heads
    self.query = _linear(dim, heads_width, ("embed", "heads"), config, rngs)
    self.key = _linear(dim, heads_width, ("embed", "heads"), config, rngs)
    self.value = _linear(dim, heads_width, ("embed", "heads"), config, rngs)
    self.out = _linear(heads_width, dim, ("heads", "embed"), config, rngs)
    norm = dict(
      epsilon=config.eps,
      dtype=config.compute_dtype,
      param_dtype=config.param_dtype,
      scale_init=_partitioned(nnx.initializers.ones_init(), ("heads",)),
      rngs=rngs,
    )
    self.query_norm = nnx.RMSNorm(heads_width, **norm)
    self.key_norm = nnx.RMSNorm(heads_width, **norm)

  def _split_heads(self, x):
    return x.reshape(*x.shape[:-1], self.heads, -1)

  def __call__(
    self,
    x,
    context=None,
    rope=None,
    attention: AttentionConfig | None = None,
    probe=None,
    batch_axes: tuple[str, ...] = (),
    sparsity: LayerSparsity | None = None,
    sequence: SequenceSharding | None = None,
  ):
    """x: [batch, seq, dim]; context: [batch, ctx_len, dim] for cross-attention, None for self;
    batch_axes: mesh axes that split the batch (checked by `WanModel`), () for none; sparsity: this
    layer's topk/topp [heads], which make it sparse with `attention`'s other settings; sequence: how
    the tokens are split over the mesh (`WanModel` decides), None for not at all.

    Returns (out [batch, seq, dim], sparsity float32 [batch, heads]: fraction of blocks skipped), and
    with `probe` also `probe(q, k, v)` of this layer's q, k, v [batch, seq, heads, head_dim] (without
    the padding of `sequence`).
    """
    source = x if context is None else context
    # Only self-attention's names are saveable: cross-attention's k/v are text-length and cheap.
    name = (lambda a, _: a) if context is not None else checkpoint_name
    q = self._split_heads(self.query_norm(name(self.query(x), "qkv")))
    k = self._split_heads(self.key_norm(name(self.key(source), "qkv")))
    v = self._split_heads(name(self.value(source), "qkv"))
    if rope is not None:
      q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
    if sequence is not None and context is not None:
      out, skipped = attend_lib.cross_attend_sharded(q, k, v, batch_axes, sequence)
    else:
      out, skipped = attend_lib.attend(q, k, v, attention or AttentionConfig(), batch_axes, sparsity, sequence)
    out = self.out(out.reshape(*out.shape[:-2], -1))
    if probe is None:
      return out, skipped
    if sequence is not None:
      q, k, v = (a[:, : sequence.tokens] for a in (q, k, v))
    return out, skipped, probe(q, k, v)


class WanBlock(nnx.Module):
  """Self-attention, cross-attention to text and FFN, each on a modulated residual (Wan's block)."""

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    self.eps = config.eps
    self.self_attn = Attention(config, rngs=rngs)
    self.cross_attn = Attention(config, rngs=rngs)
    self.cross_norm = (
      nnx.LayerNorm(
        config.dim,
        epsilon=config.eps,
        use_fast_variance=False,
        dtype=jnp.float32,
        param_dtype=config.param_dtype,
        scale_init=_partitioned(nnx.initializers.ones_init(), ("embed",)),
        bias_init=_partitioned(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs,
      )
      if config.cross_attn_norm
      else None
    )
    self.ffn_in = _linear(config.dim, config.ffn_dim, ("embed", "mlp"), config, rngs)
    self.ffn_out = _linear(config.ffn_dim, config.dim, ("mlp", "embed"), config, rngs)
    # Rows: shift, scale, gate for self-attention, then the same for the FFN; added to the time signal.
    self.modulation = nnx.Param(
      _partitioned(nnx.initializers.normal(config.dim**-0.5), (None, "embed"))(
        rngs.params(), (6, config.dim), config.param_dtype
      )
    )

  def __call__(
    self,
    x,
    context,
    time_mod,
    rope,
    attention: AttentionConfig,
    probe=None,
    batch_axes: tuple[str, ...] = (),
    sparsity: LayerSparsity | None = None,
    sequence: SequenceSharding | None = None,
  ):
    """x: [batch, seq, dim]; context: [batch, text_len, dim]; time_mod: float32 [batch, 6, dim];
    batch_axes, sparsity, sequence: see `Attention`.

    Returns (x, self-attention sparsity float32 [batch, heads], probe results or None).
    """
    dtype = x.dtype
    mod = self.modulation[...].astype(jnp.float32)[None] + time_mod
    shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = (mod[:, i, None, :] for i in range(6))

    h = (_layer_norm(x, self.eps) * (1 + scale) + shift).astype(dtype)
    attn_out, skipped, *probed = self.self_attn(
      h, rope=rope, attention=attention, probe=probe, batch_axes=batch_axes, sparsity=sparsity, sequence=sequence
    )
    x = (x.astype(jnp.float32) + attn_out * gate).astype(dtype)

    h = x if self.cross_norm is None else self.cross_norm(x.astype(jnp.float32)).astype(dtype)
    x = x + self.cross_attn(h, context, batch_axes=batch_axes, sequence=sequence)[0]

    h = (_layer_norm(x, self.eps) * (1 + ffn_scale) + ffn_shift).astype(dtype)
    ffn_out = self.ffn_out(jax.nn.gelu(checkpoint_name(self.ffn_in(h), "ffn_hidden"), approximate=True))
    x = (x.astype(jnp.float32) + ffn_out.astype(jnp.float32) * ffn_gate).astype(dtype)
    return x, (skipped, probed[0] if probed else None)


class WanModel(nnx.Module):
  """The Wan2.1 DiT. See the module docstring for attention switching and sharding names."""

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    self.config = config
    dim, patch_volume = config.dim, math.prod(config.patch_size)
    self.patch_embed = nnx.Param(
      _partitioned(nnx.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4), (None, None, None, None, "embed"))(
        rngs.params(), (*config.patch_size, config.in_channels, dim), config.param_dtype
      )
    )
    self.patch_embed_bias = nnx.Param(
      _partitioned(nnx.initializers.zeros_init(), ("embed",))(rngs.params(), (dim,), config.param_dtype)
    )
    # The time path runs in float32 whatever the compute dtype (diffusers keeps it in fp32 too).
    self.time_in = _linear(config.freq_dim, dim, (None, "embed"), config, rngs, jnp.float32)
    self.time_out = _linear(dim, dim, ("embed", None), config, rngs, jnp.float32)
    self.time_modulation = _linear(dim, 6 * dim, (None, "embed"), config, rngs, jnp.float32)
    self.text_in = _linear(config.text_dim, dim, ("text_embed", "embed"), config, rngs)
    self.text_out = _linear(dim, dim, ("embed", None), config, rngs)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return WanBlock(config, rngs=rngs)

    self.blocks = make_blocks(rngs)
    # Rows: shift, scale of the output norm, added to the time embedding.
    self.head_modulation = nnx.Param(
      _partitioned(nnx.initializers.normal(dim**-0.5), (None, "embed"))(rngs.params(), (2, dim), config.param_dtype)
    )
    self.head = _linear(dim, patch_volume * config.out_channels, ("embed", None), config, rngs)

  def set_attention(self, attention: AttentionConfig) -> None:
    """Switch self-attention between dense and sparse in place; parameters are untouched."""
    if not isinstance(attention, AttentionConfig):
      raise ValueError(f"attention must be an AttentionConfig, got {type(attention).__name__}")
    self.config = dataclasses.replace(self.config, attention=attention)

  def _check_inputs(self, x, t, context):
    c = self.config
    if x.ndim != 5:
      raise ValueError(f"x must be [batch, frames, height, width, channels], got shape {x.shape}")
    if x.shape[-1] != c.in_channels:
      raise ValueError(f"x has {x.shape[-1]} channels, the model takes in_channels={c.in_channels}")
    if any(size % p for size, p in zip(x.shape[1:4], c.patch_size)):
      raise ValueError(f"x frames/height/width {x.shape[1:4]} are not multiples of patch_size {c.patch_size}")
    grid = [size // p for size, p in zip(x.shape[1:4], c.patch_size)]
    if max(grid) > c.rope_max_seq_len:
      raise ValueError(f"x patch grid {grid} exceeds rope_max_seq_len={c.rope_max_seq_len}")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
      raise ValueError(f"t must be [batch] = [{x.shape[0]}], got shape {t.shape}")
    if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != c.text_dim:
      raise ValueError(f"context must be [batch={x.shape[0]}, text_len, text_dim={c.text_dim}], got {context.shape}")

  def _split_batch_axes(self, batch: int) -> tuple[str, ...]:
    """`config.batch_axes` if they split the batch over more than one device of the context mesh, else ()."""
    axes = self.config.batch_axes
    if not axes:
      return ()
    mesh = jax.sharding.get_abstract_mesh()
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
      raise ValueError(
        f"batch_axes {axes}: the context mesh {mesh.axis_names} has no axes {missing}; "
        "trace the model under `with jax.set_mesh(mesh):`"
      )
    devices = math.prod(mesh.shape[a] for a in axes)
    if batch % devices:
      raise ValueError(f"x batch {batch} must be a multiple of the {devices} devices of batch_axes {axes}")
    return axes if devices > 1 else ()

  def _sequence_sharding(self, batch: int, tokens: int, batch_axes: tuple[str, ...]) -> SequenceSharding | None:
    """How `config.sequence_axes` split `tokens` tokens on the context mesh; None without them or on one device."""
    c = self.config
    if not c.sequence_axes:
      return None
    mesh = jax.sharding.get_abstract_mesh()
    missing = [a for a in c.sequence_axes if a not in mesh.axis_names]
    if missing:
      raise ValueError(
        f"sequence_axes {c.sequence_axes}: the context mesh {mesh.axis_names} has no axes {missing}; "
        "trace the model under `with jax.set_mesh(mesh):`"
      )
    devices = math.prod(mesh.shape[a] for a in c.sequence_axes)
    if devices == 1:
      return None
    # Ring shards of whole blocks keep the unsharded mask; Ulysses only needs even shards.
    blocks = 1 if c.sequence_parallel == "ulysses" else math.lcm(c.attention.block_q, c.attention.block_kv)
    padded = -(-tokens // (devices * blocks)) * devices * blocks
    lengths = None if padded == tokens else jnp.full((batch,), tokens, jnp.int32)
    return SequenceSharding(c.sequence_axes, c.sequence_parallel, devices, tokens, padded, lengths)

  def __call__(
    self, x, t, context, *, return_sparsity: bool = False, probe=None, layer_sparsity: LayerSparsity | None = None
  ):
    """x: [batch, frames, height, width, in_channels]; t: [batch] in [0, 1000];
    context: [batch, text_len, text_dim]; layer_sparsity: per-layer topk/topp [num_layers, heads] (see the
    module docstring), None for `config.attention` in every layer.

    Returns the velocity [batch, frames, height, width, out_channels] in the compute dtype, and with
    `return_sparsity` also float32 [num_layers, batch, heads]: the fraction of self-attention blocks
    skipped per layer (zeros when dense). `probe(q, k, v)`, a function of every layer's self-attention
    inputs (after qk-norm and RoPE, [batch, seq, heads, head_dim]) returning a pytree of arrays, is for
    analysis (attention maps, mask quality); its results, stacked over layers on a leading axis, come
    last in the returned tuple.
    """
    x, t, context = jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)
    self._check_inputs(x, t, context)
    c = self.config
    if layer_sparsity is not None:
      layer_sparsity = LayerSparsity(*(jnp.asarray(a, jnp.float32) for a in layer_sparsity))
      expected = (c.num_layers, c.num_attention_heads)
      for name, a in zip(LayerSparsity._fields, layer_sparsity):
        if a.shape != expected:
          raise ValueError(f"layer_sparsity.{name} must be [num_layers, heads] = {list(expected)}, got {a.shape}")
    dtype = c.compute_dtype
    batch, (pt, ph, pw) = x.shape[0], c.patch_size
    batch_axes = self._split_batch_axes(batch)
    frames, height, width = x.shape[1] // pt, x.shape[2] // ph, x.shape[3] // pw

    patches = x.astype(dtype).reshape(batch, frames, pt, height, ph, width, pw, -1)
    patches = patches.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # [b, f, h, w, pt, ph, pw, c]
    tokens = jnp.einsum("bfhwtyxc,tyxcd->bfhwd", patches, self.patch_embed[...].astype(dtype))
    tokens = (tokens + self.patch_embed_bias[...].astype(dtype)).reshape(batch, frames * height * width, -1)
    rope = rope_tables(c, frames, height, width)
    sequence = self._sequence_sharding(batch, tokens.shape[1], batch_axes)
    if sequence is not None and sequence.padded > sequence.tokens:  # per-token work on the padding is cut off below
      pad = sequence.padded - sequence.tokens
      tokens = jnp.pad(tokens, ((0, 0), (0, pad), (0, 0)))
      rope = tuple(jnp.pad(a, ((0, pad), (0, 0))) for a in rope)
    token_spec = P(batch_axes) if sequence is None else sequence.specs(batch_axes)[0]

    time_emb = self.time_out(jax.nn.silu(self.time_in(timestep_sinusoid(t, c.freq_dim))))
    time_mod = self.time_modulation(jax.nn.silu(time_emb)).reshape(batch, 6, -1)
    text = self.text_out(jax.nn.gelu(self.text_in(context.astype(dtype)), approximate=True))
    if batch_axes:  # the blocks' per-example inputs stay batch-sharded (FSDP), see the module docstring
      text, time_mod = (jax.lax.with_sharding_constraint(a, P(batch_axes)) for a in (text, time_mod))

    def run_block(block, tokens, *layer):
      if batch_axes or sequence is not None:
        tokens = jax.lax.with_sharding_constraint(tokens, token_spec)
      return block(tokens, text, time_mod, rope, c.attention, probe, batch_axes, *layer, sequence=sequence)

    if c.remat:
      run_block = nnx.remat(run_block, policy=jax.checkpoint_policies.save_only_these_names(*c.remat_saves))
    per_layer = () if layer_sparsity is None else (layer_sparsity,)
    tokens, (sparsity, probed) = nnx.scan(
      run_block, in_axes=(0, nnx.Carry, *(0,) * len(per_layer)), out_axes=(nnx.Carry, 0)
    )(self.blocks, tokens, *per_layer)
    if sequence is not None:
      tokens = tokens[:, : sequence.tokens]

    head_mod = self.head_modulation[...].astype(jnp.float32)[None] + time_emb[:, None, :]  # [b, 2, dim]
    shift, scale = head_mod[:, 0, None, :], head_mod[:, 1, None, :]
    h = (_layer_norm(tokens, c.eps) * (1 + scale) + shift).astype(dtype)
    out = self.head(h).reshape(batch, frames, height, width, pt, ph, pw, -1)
    out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, frames * pt, height * ph, width * pw, -1)
    extras = (sparsity,) * return_sparsity + (probed,) * (probe is not None)
    return (out, *extras) if extras else out
