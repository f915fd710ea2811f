"""Inputs shared by the benchmarks: the attention suite's shapes, random q/k/v, and block masks that keep a
given number of kv blocks in every row.

The kept-count law: a row with n allowed kv blocks keeps `kept_count(sparsity, n)` of them, chosen uniformly
at random. Every row of a non-causal mask has the same count; a causal row is allowed only the blocks that
reach its diagonal and always keeps the block holding its first query's own position.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
  """One shape of the attention suite: q [batch, seq_len, heads, head_dim]; k, v with kv_heads heads
  (None: as many as q), at each of `sparsities` (for causal cases, of the blocks the diagonal allows)."""

  seq_len: int
  heads: int
  head_dim: int
  sparsities: tuple[float, ...]
  kv_heads: int | None = None
  is_causal: bool = False

  def __post_init__(self):
    if self.kv_heads is None:
      object.__setattr__(self, "kv_heads", self.heads)
    if min(self.seq_len, self.heads, self.head_dim, self.kv_heads) < 1 or self.heads % self.kv_heads:
      raise ValueError(f"a case needs positive sizes and heads a multiple of kv_heads, got {self}")
    if not all(0 <= s < 1 for s in self.sparsities):
      raise ValueError(f"sparsities must lie in [0, 1), got {self.sparsities}")

  @property
  def is_gqa(self) -> bool:
    return self.kv_heads != self.heads

  @property
  def label(self) -> str:
    """E.g. "32760x32x128 GQA 32/8 causal"."""
    extras = ([f"GQA {self.heads}/{self.kv_heads}"] if self.is_gqa else []) + (["causal"] if self.is_causal else [])
    return " ".join([f"{self.seq_len}x{self.heads}x{self.head_dim}", *extras])


# Wan2.1-1.3B at 480p, its head_dim-64 variant, Wan2.1-14B at 720p; then grouped-query attention (32 query
# heads over 8 kv heads) and causal masking at the 1.3B shape.
SUITE = (
  Case(32760, 12, 128, (0.95, 0.9, 0.8, 0.0)),
  Case(32760, 12, 64, (0.95,)),
  Case(75600, 40, 128, (0.95,)),
  Case(32760, 32, 128, (0.95,), kv_heads=8),
  Case(32760, 12, 128, (0.95, 0.0), is_causal=True),
)


def kept_count(sparsity: float, n_blocks):
  """How many of a row's `n_blocks` allowed kv blocks the random masks keep (at least one); n_blocks may be
  an int or an integer array."""
  kept = np.maximum(1, np.round((1.0 - sparsity) * np.asarray(n_blocks)).astype(np.int64))
  return int(kept) if kept.ndim == 0 else kept


def random_qkv(key, *, batch: int, seq_len: int, heads: int, head_dim: int, kv_heads: int | None = None, dtype):
  """(q, k, v, d_out), standard normal: q and d_out [batch, seq_len, heads, head_dim], k and v
  [batch, seq_len, kv_heads, head_dim] (kv_heads defaults to heads). They use the first four keys of
  `split(key, 5)` and `mask_key(key)` the fifth, as the suite has always drawn them."""
  kv_heads = heads if kv_heads is None else kv_heads
  keys = jax.random.split(key, 5)[:4]
  q_shape, kv_shape = (batch, seq_len, heads, head_dim), (batch, seq_len, kv_heads, head_dim)
  return tuple(jax.random.normal(k, s, dtype) for k, s in zip(keys, (q_shape, kv_shape, kv_shape, q_shape)))


def mask_key(key):
  """The key of the mask that goes with `random_qkv(key, ...)`."""
  return jax.random.split(key, 5)[4]


def random_block_mask(key, batch: int, heads: int, n_q_blocks: int, n_kv_blocks: int, kept: int):
  """bool [batch, heads, n_q_blocks, n_kv_blocks] keeping exactly `kept` random kv blocks per row."""
  noise = jax.random.uniform(key, (batch, heads, n_q_blocks, n_kv_blocks))
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return ranks < kept


def causal_blocks(q_len: int, kv_len: int, *, block_q: int, block_kv: int):
  """(allowed, own), numpy bool [n_q_blocks, n_kv_blocks]: the kv blocks that hold a key some query of the q
  block may see under causal masking (query i sees keys j <= i), and the block holding each q block's first
  query position."""
  n_q, n_kv = -(-q_len // block_q), -(-kv_len // block_kv)
  last_query = np.minimum((np.arange(n_q) + 1) * block_q, q_len) - 1
  first_key = np.arange(n_kv) * block_kv
  allowed = first_key[None, :] <= last_query[:, None]
  own = np.arange(n_kv)[None, :] == (np.arange(n_q) * block_q // block_kv)[:, None]
  return allowed, own & allowed


def causal_block_mask(key, batch: int, heads: int, q_len: int, kv_len: int, *, block_q: int, block_kv: int, sparsity):
  """bool [batch, heads, n_q_blocks, n_kv_blocks] for causal attention: each row keeps
  `kept_count(sparsity, allowed)` of its allowed blocks (`causal_blocks`), its own block first, the rest at
  random; no block above the diagonal."""
  allowed, own = causal_blocks(q_len, kv_len, block_q=block_q, block_kv=block_kv)
  kept = kept_count(sparsity, allowed.sum(-1))
  noise = jax.random.uniform(key, (batch, heads, *allowed.shape))
  noise = jnp.where(own, -1.0, jnp.where(allowed, noise, 2.0))  # own block ranks first, forbidden ones last
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return ranks < jnp.asarray(kept)[:, None]


def suite_mask(key, case: Case, sparsity: float, *, batch: int, block_q: int, block_kv: int):
  """The mask the suite times for `case` at `sparsity` (`random_block_mask` or `causal_block_mask`)."""
  if case.is_causal:
    return causal_block_mask(
      key, batch, case.heads, case.seq_len, case.seq_len, block_q=block_q, block_kv=block_kv, sparsity=sparsity
    )
  n_q, n_kv = -(-case.seq_len // block_q), -(-case.seq_len // block_kv)
  return random_block_mask(key, batch, case.heads, n_q, n_kv, kept_count(sparsity, n_kv))


def qk_inputs(kind: str, shape, seed: int = 0):
  """(q, k) bf16 of `shape` [batch, seq, heads, head_dim].

  kind "random": standard normal; pooled block scores are nearly uniform, so Top-p keeps many blocks.
  kind "structured": the same plus a slowly varying component of position shared by neighbouring tokens,
  as in video; pooled rows are skewed and Top-k decides, as in trained models.
  """
  kq, kk, kb = jax.random.split(jax.random.PRNGKey(seed), 3)
  q, k = jax.random.normal(kq, shape), jax.random.normal(kk, shape)
  if kind == "structured":
    position = jnp.arange(shape[1])[None, :, None, None] / shape[1]
    phase = jax.random.normal(kb, (1, 1) + tuple(shape[2:]))
    q = q + 2.0 * jnp.sin(6.0 * position + phase)
    k = k + 2.0 * jnp.cos(5.0 * position + phase)
  elif kind != "random":
    raise ValueError(f"kind must be 'random' or 'structured', got {kind!r}")
  return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)


def add_shape_arguments(parser: argparse.ArgumentParser, *, seq_len: int | None = 32760) -> None:
  """--seq-len, --heads and --head-dim: one attention shape (the 1.3B model's by default)."""
  parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens of q and of k/v")
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--head-dim", type=int, default=128)


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
  """parser.error unless each named argument is None or >= 1."""
  for name in names:
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
