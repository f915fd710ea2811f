"""Device mesh ``(data, fsdp[, sequence[, ring]])`` and the shardings of parameters and batches.

Parameters carry logical axis names (``nnx.with_partitioning``); ``LOGICAL_RULES`` maps them to
mesh axes. FSDP shards each parameter over ``fsdp`` and the sequence axes along its first dimension
whose logical name maps to ``fsdp`` and whose size divides evenly; everything else is replicated. The batch is split
over ``data`` and ``fsdp`` (FSDP is data parallelism with sharded weights), so every group of
``sequence`` devices sees ``batch / (data * fsdp)`` examples. The ``sequence`` axis (present when it
has more than one device, or for USP) splits each example's tokens inside the model
(``WanConfig.sequence_axes``; ``sparge_jax.parallel``); with USP a ``ring`` axis beside it takes the
ring part.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis. Names not listed are replicated. The model dimension ("embed")
# appears in every large matrix, so sharding it alone shards all of them.
LOGICAL_RULES: dict[str, str | None] = {
  "embed": "fsdp",
}


SEQUENCE_AXES = ("sequence", "ring")


def make_mesh(data: int, fsdp: int, sequence: int = 1, ring: int | None = None) -> Mesh:
  """A mesh over all devices (of all processes); data or fsdp may be -1 for "the rest".

  sequence: devices that split each example's tokens (a "sequence" axis when above 1); ring: for USP,
  how many of them form the ring (a "ring" axis of that size, the "sequence" axis taking sequence / ring);
  None: no ring axis.
  """
  n = jax.device_count()
  if data == -1 and fsdp == -1:
    raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
  if sequence < 1 or n % sequence:
    raise ValueError(f"mesh.sequence ({sequence}) must be >= 1 and divide the device count ({n})")
  if ring is not None and (ring < 1 or sequence % ring):
    raise ValueError(f"mesh.ring ({ring}) must be >= 1 and divide mesh.sequence ({sequence})")
  batch_devices = n // sequence
  for name, size in (("mesh.data", data), ("mesh.fsdp", fsdp)):
    if size != -1 and (size < 1 or batch_devices % size):
      raise ValueError(f"{name} ({size}) must be >= 1 and divide the device count over mesh.sequence ({batch_devices})")
  data, fsdp = (batch_devices // fsdp if data == -1 else data), (batch_devices // data if fsdp == -1 else fsdp)
  if data * fsdp * sequence != n:
    raise ValueError(
      f"mesh.data * mesh.fsdp * mesh.sequence ({data} * {fsdp} * {sequence}) must equal the device count ({n})"
    )
  shape, names = (data, fsdp), ("data", "fsdp")
  if ring is not None:
    shape, names = (*shape, sequence // ring, ring), (*names, *SEQUENCE_AXES)
  elif sequence > 1:
    shape, names = (*shape, sequence), (*names, SEQUENCE_AXES[0])
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def sequence_axes(mesh: Mesh) -> tuple[str, ...]:
  """The axes of ``mesh`` that split the tokens (``WanConfig.sequence_axes``): ("sequence"[, "ring"]) or ()."""
  return tuple(a for a in SEQUENCE_AXES if a in mesh.axis_names)


def batch_devices(mesh: Mesh) -> int:
  """Devices the batch splits over (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _spec(shape: tuple[int, ...], names: tuple | None, mesh: Mesh, rules: dict) -> P:
  spec = [None] * len(shape)
  if names:
    for dim, (size, name) in enumerate(zip(shape, names)):
      axis = rules.get(name) if isinstance(name, str) else None
      # The devices that share an example's tokens share its weights too: FSDP spans the sequence axes.
      axes = () if axis is None else (axis, *sequence_axes(mesh)) if axis == "fsdp" else (axis,)
      if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
        spec[dim] = axes if len(axes) > 1 else axis
        break
  return P(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: dict | None = None) -> dict:
  """NamedShardings for ``abstract_state.to_pure_dict()``, from each Param's logical axis names."""
  rules = LOGICAL_RULES if rules is None else rules

  def one(variable):
    names = variable.get_metadata().get("out_sharding") if isinstance(variable, nnx.Variable) else None
    value = variable.value if isinstance(variable, nnx.Variable) else variable
    return NamedSharding(mesh, _spec(tuple(value.shape), names, mesh, rules))

  shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.State(shardings).to_pure_dict() if isinstance(shardings, nnx.State) else shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def on_mesh(fn, mesh: Mesh):
  """``fn`` (a jitted function) called, and so traced, with ``mesh`` as the context mesh, which the
  models need for ``WanConfig.batch_axes``. Only around the step: under a context mesh nnx would
  read the parameters' logical names as mesh axes when building a model."""

  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  return call


def process_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """The contiguous ``[start, stop)`` rows of a global batch that this process's devices hold."""
  index_map = sharding.addressable_devices_indices_map((batch_size,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [batch_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  start, stop = min(starts), max(stops)
  rows = np.zeros(batch_size, bool)
  for a, b in zip(starts, stops):
    rows[a:b] = True
  if rows.sum() != stop - start:
    raise ValueError(
      "this process's devices hold non-contiguous batch rows; the mesh must be "
      "ordered process by process (jax.make_mesh does this)"
    )
  return start, stop


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded by ``sharding``."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:])) for k, v in local.items()}
