"""The backend table: what each block-sparse attention backend supports, and the one place that picks one.

    backends.explain(q, k)                      # which backend this call gets, and why not the others
    backends.choose(None, backends.Call(...))   # the Backend the API runs (implementation=None: auto)

Backends ("mosaic", "triton", "xla") share the forward/backward contract of
`pallas_kernels.block_sparse_attention`; each `Backend` entry states its limits (dtypes, head dims, block
sizes, sequence multiples, grouped heads, causal masking, kv lengths, the lse cotangent, the device) and
provides its forward, its backward and its index-table builder. Auto (`implementation=None`) takes, in
order, Mosaic on compute capability 9.x where it applies, Triton on a GPU of compute capability ≥ 8.0,
and XLA otherwise. With `interpret=True` the Pallas kernels run on CPU: auto then takes Triton, and an
explicit "mosaic" runs the Mosaic GPU interpreter. An explicit implementation that cannot apply raises a
ValueError that lists each unmet condition.

The block mask has its own choice (`mask_implementation`): the Pallas Triton mask kernels on any GPU of
compute capability ≥ 8.0 (or in interpret mode), XLA elsewhere and for `implementation="xla"`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from types import ModuleType, SimpleNamespace

import jax
import jax.numpy as jnp

from pallas_kernels.block_mask import index_table as xla_index_table
from pallas_kernels.block_mask import triton_index_table
from pallas_kernels.block_sparse_attention import mosaic, triton, xla
from sparge_jax import config

NAMES = config.IMPLEMENTATIONS[1:]  # ("mosaic", "triton", "xla"); None is auto


def compute_capability() -> str | None:
  """The default device's CUDA compute capability ("9.0"), or None off CUDA GPUs."""
  if jax.default_backend() != "gpu":
    return None
  return getattr(jax.devices()[0], "compute_capability", None)


def _capability_at_least(capability: str | None, minimum: float) -> bool:
  try:
    return capability is not None and float(capability) >= minimum
  except ValueError:  # not an NVIDIA "major.minor" (e.g. a ROCm gfx name)
    return False


def _dtype_names(dtypes) -> str:
  short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
  return "/".join(short.get(d, d) for d in dtypes)


def on_hopper() -> bool:
  """Whether the default device is a CUDA GPU of compute capability 9.x (Hopper)."""
  return (compute_capability() or "").startswith("9.")


def on_ampere_or_newer() -> bool:
  """Whether the default device is a CUDA GPU of compute capability ≥ 8.0."""
  return _capability_at_least(compute_capability(), 8.0)


@dataclasses.dataclass(frozen=True)
class Call:
  """What a backend must handle in one attention call (static facts only).

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
  return_residual: the caller takes lse, so its cotangent may be non-zero.
  """

  dtype: str
  head_dim: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  block_q: int
  block_kv: int
  is_causal: bool = False
  kv_lengths: bool = False
  return_residual: bool = False
  interpret: bool = False


@dataclasses.dataclass(frozen=True)
class Backend:
  """One backend's limits and entry points. None in a limit means any value.

  device: what it needs to run compiled, in words; runs_on(capability) says whether the device has it
  (capability: `compute_capability()`). Pallas backends run on CPU with interpret=True instead.
  """

  name: str
  module: ModuleType | SimpleNamespace
  pallas: bool
  device: str
  runs_on: Callable[[str | None], bool]
  dtypes: tuple[str, ...] | None = None
  head_dims: tuple[int, ...] | None = None
  block_q: tuple[int, ...] | None = None
  block_kv: tuple[int, ...] | None = None
  seq_multiple: int | None = None
  grouped_heads: bool = True
  causal: bool = True
  kv_lengths: bool = True
  lse_cotangent: bool = True

  def unmet(self, call: Call, capability: str | None) -> tuple[str, ...]:
    """Each condition of this backend that `call` on a device of `capability` does not meet."""
    unmet = []
    if self.dtypes is not None and call.dtype not in self.dtypes:
      unmet.append(f"{_dtype_names(self.dtypes)} inputs (got {call.dtype})")
    if self.head_dims is not None and call.head_dim not in self.head_dims:
      unmet.append(f"head_dim in {self.head_dims} (got {call.head_dim})")
    if self.block_q is not None and call.block_q not in self.block_q:
      unmet.append(f"block_q in {self.block_q} (got {call.block_q})")
    if self.block_kv is not None and call.block_kv not in self.block_kv:
      unmet.append(f"block_kv in {self.block_kv} (got {call.block_kv})")
    if self.seq_multiple and (call.q_len % self.seq_multiple or call.kv_len % self.seq_multiple):
      unmet.append(f"sequence lengths that are multiples of {self.seq_multiple} (got {call.q_len}, {call.kv_len})")
    if not self.grouped_heads and call.heads != call.kv_heads:
      unmet.append(f"as many kv heads as query heads (got {call.heads} over {call.kv_heads})")
    if not self.causal and call.is_causal:
      unmet.append("is_causal=False (it has no causal masking)")
    if not self.kv_lengths and call.kv_lengths:
      unmet.append("key_value_seq_lengths=None (it has no kv lengths)")
    if not self.lse_cotangent and call.return_residual:
      unmet.append("return_residual=False (its backward takes no lse cotangent)")
    if not (self.pallas and call.interpret) and not self.runs_on(capability):
      where = f"compute capability {capability}" if capability else f"{jax.default_backend()}, no CUDA GPU"
      hint = "; pass interpret=True to run its kernels on CPU, or use 'xla'" if self.pallas else ""
      unmet.append(f"{self.device} (this process runs on {where}{hint})")
    return tuple(unmet)

  def kernel_kwargs(self, *, block_q: int, block_kv: int, scale: float, is_causal: bool, interpret: bool) -> dict:
    """Keyword arguments of this backend's forward and backward."""
    kwargs = dict(block_q=block_q, block_kv=block_kv, scale=scale, is_causal=is_causal)
    if self.pallas:
      kwargs["interpret"] = interpret
    return kwargs

  def forward(self, q, k, v, kv_block_index, kv_block_count, **kwargs):
    """(out, lse): the contract's forward."""
    return self.module.forward(q, k, v, kv_block_index, kv_block_count, **kwargs)

  def backward(self, *args, **kwargs):
    """(dq, dk, dv): the contract's backward."""
    return self.module.backward(*args, **kwargs)

  def index_table(self, mask, *, interpret: bool):
    """(index, count) of each row of a bool mask [..., rows, cols]: the Pallas kernel for Pallas backends."""
    if self.pallas:
      return triton_index_table.index_table(mask, interpret=interpret)
    return xla_index_table.index_table(mask)


def _mosaic_entry() -> Backend:
  # The Mosaic module states its own limits as constants; the table reads them from there.
  return Backend(
    name="mosaic",
    module=mosaic,
    pallas=True,
    device="a CUDA GPU of compute capability 9.x (Hopper)",
    runs_on=lambda capability: (capability or "").startswith("9."),
    dtypes=tuple(jnp.dtype(d).name for d in mosaic.DTYPES),
    head_dims=tuple(mosaic.HEAD_DIMS),
    block_q=tuple(mosaic.BLOCK_Q),
    block_kv=tuple(mosaic.BLOCK_KV),
    seq_multiple=mosaic.SEQ_MULTIPLE,
  )


TABLE: dict[str, Backend] = {
  "mosaic": _mosaic_entry(),
  "triton": Backend(
    name="triton",
    module=triton,
    pallas=True,
    device="a CUDA GPU of compute capability 8.0 or newer",
    runs_on=lambda capability: _capability_at_least(capability, 8.0),
    dtypes=("bfloat16", "float16", "float32"),
  ),
  "xla": Backend(name="xla", module=xla, pallas=False, device="any device", runs_on=lambda capability: True),
}
assert tuple(TABLE) == NAMES


def _auto_order(interpret: bool) -> tuple[str, ...]:
  # interpret=True asks for the Pallas kernels on CPU: the Triton ones (the Mosaic interpreter is slow).
  return ("triton", "xla") if interpret else ("mosaic", "triton", "xla")


@dataclasses.dataclass(frozen=True)
class Selection:
  """The backend a call gets (`chosen`, None if an explicit one cannot apply) and each backend's unmet
  conditions (empty where it applies)."""

  implementation: str | None
  chosen: str | None
  unmet: dict[str, tuple[str, ...]]

  def __str__(self):
    asked = "auto" if self.implementation is None else repr(self.implementation)
    lines = [f"implementation={asked} -> {self.chosen or 'none'}"]
    for name, reasons in self.unmet.items():
      lines.append(f"  {name}: " + ("applies" if not reasons else "needs " + "; ".join(reasons)))
    return "\n".join(lines)


def select(implementation: str | None, call: Call) -> Selection:
  """Which backend `call` gets for `implementation` (None: auto), with every backend's unmet conditions."""
  config.check_choice("implementation", implementation, config.IMPLEMENTATIONS)
  capability = compute_capability()
  unmet = {name: backend.unmet(call, capability) for name, backend in TABLE.items()}
  if implementation is None:
    chosen = next(name for name in _auto_order(call.interpret) if not unmet[name])  # xla always applies
  else:
    chosen = implementation if not unmet[implementation] else None
  return Selection(implementation, chosen, unmet)


def choose(implementation: str | None, call: Call, *, argument: str = "implementation") -> Backend:
  """The Backend for `call`; ValueError listing each unmet condition if an explicit one cannot apply.

  argument: the name the caller gave the choice (for the message).
  """
  selection = select(implementation, call)
  if selection.chosen is None:
    reasons = "; and ".join(selection.unmet[implementation])
    raise ValueError(f"{argument}={implementation!r} needs {reasons}")
  return TABLE[selection.chosen]


def call_of(
  q, k, *, block_q=128, block_kv=64, is_causal=False, kv_lengths=False, return_residual=False, interpret=False
):
  """The `Call` of q [batch, q_len, heads, head_dim] and k [batch, kv_len, kv_heads, head_dim]."""
  return Call(
    dtype=jnp.dtype(q.dtype).name,
    head_dim=q.shape[-1],
    q_len=q.shape[-3],
    kv_len=k.shape[-3],
    heads=q.shape[-2],
    kv_heads=k.shape[-2],
    block_q=block_q,
    block_kv=block_kv,
    is_causal=bool(is_causal),
    kv_lengths=bool(kv_lengths),
    return_residual=bool(return_residual),
    interpret=bool(interpret),
  )


def explain(
  query,
  key,
  *,
  implementation=None,
  block_q=128,
  block_kv=64,
  is_causal=False,
  key_value_seq_lengths=None,
  return_residual=False,
  interpret=False,
) -> Selection:
  """Which backend `sparge_jax.attention.dot_product_attention` gives these arguments, and why not the others.

  query: [batch, q_len, heads, head_dim] (or unbatched); key: [batch, kv_len, kv_heads, head_dim]. `print` the
  result for a readable account.
  """
  call = call_of(
    query,
    key,
    block_q=block_q,
    block_kv=block_kv,
    is_causal=is_causal,
    kv_lengths=key_value_seq_lengths is not None,
    return_residual=return_residual,
    interpret=interpret,
  )
  return select(implementation, call)


# ------------------------------------------------------------------------------------ the block mask

MASK_IMPLEMENTATIONS = ("triton", "xla")
_MASK_DTYPES = ("bfloat16", "float16", "float32")


@functools.cache
def _mask_unmet(dtype: str, interpret: bool, capability: str | None) -> tuple[str, ...]:
  unmet = []
  if dtype not in _MASK_DTYPES:
    unmet.append(f"{_dtype_names(_MASK_DTYPES)} inputs (got {dtype})")
  if not interpret and not _capability_at_least(capability, 8.0):
    unmet.append("a CUDA GPU of compute capability 8.0 or newer, or interpret=True")
  return tuple(unmet)


def mask_implementation(implementation: str | None, dtype, *, interpret: bool, argument="implementation") -> str:
  """Where the block mask runs: "triton" (the Pallas mask kernels) or "xla".

  implementation: the attention's choice. "xla" keeps the mask in XLA; "mosaic" and "triton" take the
  Triton mask kernels (the mask kernels have no Mosaic limits), which need a GPU of compute capability
  ≥ 8.0 or interpret=True (ValueError otherwise); None takes them where they run, else XLA.
  """
  config.check_choice(argument, implementation, config.IMPLEMENTATIONS)
  if implementation == "xla":
    return "xla"
  unmet = _mask_unmet(jnp.dtype(dtype).name, bool(interpret), compute_capability())
  if not unmet:
    return "triton"
  if implementation is None:
    return "xla"
  raise ValueError(f"{argument}={implementation!r}: the Triton mask kernels need " + "; and ".join(unmet))
