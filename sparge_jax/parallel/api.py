"""`ulysses_attention`, `ring_attention`, `usp_attention` and `ring_block_mask`: arguments, checks, results."""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
from jax import lax

from sparge_jax import attention as sparge_attention
from sparge_jax import attention_core as core
from sparge_jax import backends, config
from sparge_jax.parallel import ring, ulysses


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static arguments of one call, checked (scale resolved)."""

  mode: str
  block_q: int
  block_kv: int
  scale: float
  is_causal: bool
  implementation: str | None
  interpret: bool


def _axis_size(name, argument: str) -> int:
  try:
    return lax.axis_size(name)
  except NameError:
    raise ValueError(
      f"{argument}={name!r} is not a mesh axis of the enclosing jax.shard_map (call this inside shard_map over it)"
    ) from None


# The keyword arguments of `sparge_jax.attention.dot_product_attention` (and `return_stats`), with its defaults.
DEFAULTS = {
  name: parameter.default
  for name, parameter in inspect.signature(sparge_attention.dot_product_attention).parameters.items()
  if parameter.default is not inspect.Parameter.empty
} | {"return_stats": False}


@dataclasses.dataclass(frozen=True)
class Request:
  """One call's checked arguments: q, k, v batched, the static settings and the array arguments."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  unbatched: bool
  settings: Settings
  topk: object
  topp: object
  q_lengths: jax.Array | None
  kv_lengths: jax.Array | None
  return_residual: bool
  return_stats: bool


def _prepare(function: str, query, key, value, attention_kwargs: dict) -> Request:
  """The checked arguments of a call, or the error `dot_product_attention` would raise for them."""
  unknown = sorted(set(attention_kwargs) - set(DEFAULTS))
  if unknown:
    raise TypeError(f"{function}() got unexpected keyword arguments {unknown}")
  kw = {**DEFAULTS, **attention_kwargs}
  for name in ("bias", "mask", "local_window_size"):
    if kw[name] is not None:
      raise NotImplementedError(
        f"{name}: block-sparse attention takes no {name}; causal masking (is_causal) and padding "
        "(query_seq_lengths, key_value_seq_lengths) are supported"
      )
  arrays = {"query": query, "key": key, "value": value}
  for name, x in arrays.items():
    if not hasattr(x, "ndim") or x.ndim not in (3, 4):
      raise ValueError(
        f"{name} must be [batch, seq, heads, head_dim] or [seq, heads, head_dim], got {getattr(x, 'shape', type(x))}"
      )
  if len({x.ndim for x in arrays.values()}) != 1:
    raise ValueError(
      f"query, key and value must all be batched or all unbatched, got shapes {[x.shape for x in arrays.values()]}"
    )
  unbatched = query.ndim == 3
  q, k, v = (x[None] for x in (query, key, value)) if unbatched else (query, key, value)
  config.check_qkv(q, k, v, names=("query", "key", "value"))
  config.check_block("block_q", kw["block_q"])
  config.check_block("block_kv", kw["block_kv"])
  config.check_scale(kw["scale"])
  config.check_choice("mode", kw["mode"], config.MODES)
  config.check_choice("implementation", kw["implementation"], config.IMPLEMENTATIONS)
  lengths = [None if kw[n] is None else jnp.asarray(kw[n]) for n in ("query_seq_lengths", "key_value_seq_lengths")]
  config.check_seq_lengths("query_seq_lengths", lengths[0], q.shape[0])
  config.check_seq_lengths("key_value_seq_lengths", lengths[1], q.shape[0])
  config.check_fraction_argument("topk", kw["topk"], q.shape[2])
  config.check_fraction_argument("topp", kw["topp"], q.shape[2])
  settings = Settings(
    mode=kw["mode"],
    block_q=kw["block_q"],
    block_kv=kw["block_kv"],
    scale=float(q.shape[-1]) ** -0.5 if kw["scale"] is None else float(kw["scale"]),
    is_causal=bool(kw["is_causal"]),
    implementation=kw["implementation"],
    interpret=bool(kw["interpret"]),
  )
  topk, topp = (jnp.asarray(p, jnp.float32) if isinstance(p, (list, tuple)) else p for p in (kw["topk"], kw["topp"]))
  return Request(
    q, k, v, unbatched, settings, topk, topp, *lengths, bool(kw["return_residual"]), bool(kw["return_stats"])
  )


def _clipped(lengths, size):
  return None if lengths is None else jnp.clip(lengths, 0, size).astype(jnp.int32)


def _results(request: Request, out, lse, kept, *, ulysses_size: int, ring_size: int):
  """The call's results (out, then lse, then stats), as `sparse_attention` orders them."""
  s, q_len, kv_len = request.settings, request.q.shape[1], request.k.shape[1]
  # Blocks are cut from the ring shards (of Ulysses size · local length): the global blocks where they align.
  n_blocks = ring_size * -(-ulysses_size * q_len // s.block_q) * ring_size * -(-ulysses_size * kv_len // s.block_kv)
  if request.unbatched:
    out, lse, kept = out[0], lse[0], kept[0]
  results = (out,) + ((lse,) if request.return_residual else ())
  if request.return_stats:
    results += ({"sparsity": 1.0 - kept.astype(jnp.float32) / n_blocks, "kept_blocks": kept},)
  return results[0] if len(results) == 1 else results


# ------------------------------------------------------------------------------------------------ ring


def _ring_layouts(q, k, settings: Settings, *, axis, argument, chunks=1):
  size = _axis_size(axis, argument)
  chunks = 1 if size == 1 else chunks  # one ring device: its runs are the whole sequence, in order
  q_len, kv_len = q.shape[1], k.shape[1]
  if chunks > 1:
    for name, length, block in (("block_q", q_len, settings.block_q), ("block_kv", kv_len, settings.block_kv)):
      if (length // chunks) % block:
        raise ValueError(
          f"{name}={block}: each device's shard ({length // chunks} tokens) must be a multiple of it when both "
          "the Ulysses and the ring axis have more than one device"
        )
  if settings.is_causal and q_len != kv_len:
    raise ValueError(f"is_causal=True needs query and key shards of one length, got {q_len} and {kv_len}")
  return ring.Layout(size, chunks, q_len // chunks), ring.Layout(size, chunks, kv_len // chunks)


def _ring_rows(q, k, topk, topp, q_lengths, kv_lengths, settings, *, axis, layouts, backend):
  return ring.global_rows(
    q,
    k,
    topk,
    topp,
    q_lengths,
    kv_lengths,
    axis=axis,
    q_layout=layouts[0],
    kv_layout=layouts[1],
    settings=settings,
    implementation=backends.mask_implementation(backend, q.dtype, interpret=settings.interpret),
  )


def _ring_local(q, k, v, topk, topp, q_lengths, kv_lengths, settings: Settings, *, axis, argument, chunks=1):
  """Ring attention on local arrays: (out, lse [B, T, N] in q's dtype, kept [B, N] over every shard)."""
  q_layout, kv_layout = layouts = _ring_layouts(q, k, settings, axis=axis, argument=argument, chunks=chunks)
  q_lengths, kv_lengths = _clipped(q_lengths, q_layout.total), _clipped(kv_lengths, kv_layout.total)
  call = backends.call_of(
    q,
    k,
    block_q=settings.block_q,
    block_kv=settings.block_kv,
    is_causal=settings.is_causal,
    kv_lengths=kv_lengths is not None,
    return_residual=True,
    interpret=settings.interpret,
  )
  backend = backends.choose(settings.implementation, call).name
  rows = _ring_rows(q, k, topk, topp, q_lengths, kv_lengths, settings, axis=axis, layouts=layouts, backend=backend)
  mask = ring.local_columns(rows, kv_layout, settings.block_kv)
  kernel = core.Kernel(
    backend, settings.block_q, settings.block_kv, settings.scale, settings.is_causal, settings.interpret, k.shape[2]
  )
  out, lse = ring.ring_vjp(ring.Ring(kernel, axis, kv_layout))(q, k, v, kv_lengths, mask)
  attended = ~jnp.isneginf(lse)
  if q_lengths is not None:  # as the unsharded API: rows past the length output zeros
    shard = lax.axis_index(axis) if q_layout.ring > 1 else 0
    valid_q = jnp.arange(q.shape[1]) < q_layout.local_length(q_lengths, shard)[:, None]
    out = jnp.where(valid_q[:, :, None, None], out, jnp.zeros((), out.dtype))
    attended = attended & valid_q[:, None, :]
  lse = jnp.where(attended, lse, core.PADDED_ROW_LSE).swapaxes(1, 2).astype(q.dtype)
  kept = jnp.sum(mask, axis=(-2, -1), dtype=jnp.int32)
  return out, lse, lax.psum(kept, axis)  # the same on every device (also, by type, over one device)


def ring_attention(query, key, value, *, axis_name, **attention_kwargs):
  """Ring attention inside `jax.shard_map` over `axis_name`: `dot_product_attention` of the whole sequence.

  query: [B, T/R, N, H], key, value: [B, S/R, K, H] (or unbatched): the local shards of arrays sharded along
  the sequence over `axis_name` (R devices, device r holding the r-th slice). attention_kwargs: those of
  `sparge_jax.attention.dot_product_attention` (topk, topp, mode, block_q, block_kv, scale, is_causal,
  query_seq_lengths, key_value_seq_lengths, implementation, return_residual, interpret), and
  return_stats. Lengths are global, int32 [B], the same on every device; is_causal needs T == S.
  Returns the local output [B, T/R, N, H]; with return_residual also lse [B, T/R, N]; with return_stats
  also {"sparsity": float32 [B, N], "kept_blocks": int32 [B, N]} of the whole sequence (on every device).

  Where T/R and S/R are multiples of block_q and block_kv, the mask, the output and the gradients are
  those of the unsharded call up to float rounding. Otherwise blocks are cut per shard (each shard's last
  block partial): the mask applies the same rule to that blocking, and the attention is exact on it.
  """
  r = _prepare("ring_attention", query, key, value, attention_kwargs)
  out, lse, kept = _ring_local(
    r.q, r.k, r.v, r.topk, r.topp, r.q_lengths, r.kv_lengths, r.settings, axis=axis_name, argument="axis_name"
  )
  return _results(r, out, lse, kept, ulysses_size=1, ring_size=_axis_size(axis_name, "axis_name"))


def ring_block_mask(query, key, *, axis_name, **mask_kwargs):
  """The block mask `ring_attention` uses on this device: its rows over every kv block, in global order.

  query: [B, T/R, N, H], key: [B, S/R, K, H], local shards as for `ring_attention`; mask_kwargs: those of
  `sparge_jax.attention.block_mask` (topk, topp, mode, block_q, block_kv, scale, is_causal, the lengths,
  implementation, interpret). Returns bool [B, N, ceil(T/R / block_q), R · ceil(S/R / block_kv)]: where the
  shards are block multiples, this device's rows of `block_mask` of the unsharded arrays.
  """
  r = _prepare("ring_block_mask", query, key, key, mask_kwargs)
  layouts = _ring_layouts(r.q, r.k, r.settings, axis=axis_name, argument="axis_name")
  q_lengths, kv_lengths = _clipped(r.q_lengths, layouts[0].total), _clipped(r.kv_lengths, layouts[1].total)
  backend = r.settings.implementation
  return _ring_rows(
    r.q, r.k, r.topk, r.topp, q_lengths, kv_lengths, r.settings, axis=axis_name, layouts=layouts, backend=backend
  )


# --------------------------------------------------------------------------------------------- ulysses


def _ulysses_local(request: Request):
  """The per-device attention of Ulysses: `sparse_attention` on the full sequence of some heads."""
  s = request.settings

  def local(q, k, v, topk, topp):
    out, lse, stats = sparge_attention.sparse_attention(
      q,
      k,
      v,
      topk=topk,
      topp=topp,
      mode=s.mode,
      block_q=s.block_q,
      block_kv=s.block_kv,
      scale=s.scale,
      is_causal=s.is_causal,
      query_seq_lengths=request.q_lengths,
      key_value_seq_lengths=request.kv_lengths,
      implementation=s.implementation,
      interpret=s.interpret,
      return_residual=True,
      return_stats=True,
    )
    return out, lse, stats["kept_blocks"]

  return local


def _run_ulysses(request: Request, local, *, axis, argument, head_order):
  devices = _axis_size(axis, argument)
  q, k = request.q, request.k
  if devices == 1:
    out, lse, kept = local(q, k, request.v, request.topk, request.topp)
    return (out, lse, lax.psum(kept, axis)), devices
  order = ulysses.check_head_order(head_order, q.shape[2], k.shape[2])
  heads = ulysses.plan(q.shape[2], k.shape[2], devices, order)
  return ulysses.ulysses(q, k, request.v, request.topk, request.topp, axis=axis, heads=heads, local=local), devices


def ulysses_attention(query, key, value, *, axis_name, head_order=None, **attention_kwargs):
  """Ulysses attention inside `jax.shard_map` over `axis_name`: `dot_product_attention` of the whole sequence.

  query: [B, T/U, N, H], key, value: [B, S/U, K, H] (or unbatched): local shards of arrays sharded along
  the sequence over `axis_name` (U devices). Each device attends over the whole sequence with N/U heads.
  Heads that do not divide by U are padded with zero heads (wasted work: pick U dividing N); kv heads
  are split with their query heads without GQA or where K is a multiple of U, otherwise gathered whole.
  head_order: a permutation of the heads that moves whole GQA groups; device d takes the heads at
  positions [d · N/U, (d + 1) · N/U) (`balanced_head_order` evens out their kept blocks); None: in order.
  attention_kwargs and the results: as `ring_attention`'s.

  For any lengths, the mask, the output and the gradients are those of the unsharded call up to float
  rounding.
  """
  r = _prepare("ulysses_attention", query, key, value, attention_kwargs)
  (out, lse, kept), devices = _run_ulysses(
    r, _ulysses_local(r), axis=axis_name, argument="axis_name", head_order=head_order
  )
  return _results(r, out, lse, kept, ulysses_size=devices, ring_size=1)


def usp_attention(query, key, value, *, ulysses_axis, ring_axis, head_order=None, **attention_kwargs):
  """USP inside `jax.shard_map`: Ulysses over `ulysses_axis` (U devices) around ring attention over
  `ring_axis` (R devices).

  query: [B, T/(U·R), N, H], key, value: [B, S/(U·R), K, H]: local shards of arrays sharded along the
  sequence over both axes, Ulysses major: `P(None, (ulysses_axis, ring_axis))`. Heads and head_order as
  in `ulysses_attention`, the rest as in `ring_attention`. With U > 1 and R > 1 each shard must be a
  multiple of block_q and block_kv (ValueError otherwise); the mask, the output and the gradients are then
  those of the unsharded call up to float rounding (with R = 1 for any lengths, as Ulysses).
  """
  if ulysses_axis == ring_axis:
    raise ValueError(f"ulysses_axis and ring_axis must differ, both are {ulysses_axis!r}")
  r = _prepare("usp_attention", query, key, value, attention_kwargs)
  ring_size = _axis_size(ring_axis, "ring_axis")
  devices = _axis_size(ulysses_axis, "ulysses_axis")

  def local(q, k, v, topk, topp):
    return _ring_local(
      q, k, v, topk, topp, r.q_lengths, r.kv_lengths, r.settings, axis=ring_axis, argument="ring_axis", chunks=devices
    )

  (out, lse, kept), devices = _run_ulysses(r, local, axis=ulysses_axis, argument="ulysses_axis", head_order=head_order)
  return _results(r, out, lse, kept, ulysses_size=devices, ring_size=ring_size)


__all__ = ["ring_attention", "ring_block_mask", "ulysses_attention", "usp_attention"]
