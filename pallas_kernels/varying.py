"""Varying manual axes for kernels run inside `jax.shard_map` with its default `check_vma=True`.

Under `check_vma`, each value carries the mesh axes it varies over. A `pallas_call` must declare them on
its outputs, and a loop's initial carry must vary over the same axes as the values its body adds. The
kernels' outputs vary over every axis their inputs vary over; outside `shard_map` these are no-ops.
"""

from __future__ import annotations

import jax


def varying_axes(*xs) -> frozenset:
  """The manual mesh axes any array among `xs` (pytrees; None is skipped) varies over."""
  axes = frozenset()
  for x in jax.tree.leaves(xs):
    axes |= jax.typeof(x).mat.varying
  return axes


def vary(x, axes: frozenset):
  """`x` made to vary over `axes` as well (a loop's initial carry; the outputs of `plgpu.kernel`, which drops
  the axes declared on its out_type)."""
  missing = axes - jax.typeof(x).mat.varying
  return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def shape_dtype(shape, dtype, axes: frozenset) -> jax.ShapeDtypeStruct:
  """A `pallas_call` out_shape that varies over `axes`."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
