"""Helpers for shard_map's varying-manual-axes (vma) types.

Inside `jax.shard_map` every array carries the set of manual mesh axes along which its value
may differ between devices. Built-in primitives keep these types consistent (a replicated
weight times per-device activations is implicitly cast to "varying", and the cast's transpose
sums the weight gradient over devices); hand-written pieces — `jax.custom_vjp` rules and
`fori_loop` carries — must do it themselves. Outside shard_map every helper is the identity.

This module imports only jax, so every layer of the package (quant, parallel, model) can use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def varying_axes(a) -> frozenset:
  """The manual mesh axes along which `a` may vary (empty outside shard_map)."""
  mat = getattr(jax.typeof(a), "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", ()) or ())


def zeros_varying_like(shape, dtype, *like) -> jax.Array:
  """Zeros of `shape` / `dtype` varying over the union of the axes `like` vary over (a
  `fori_loop` carry inside shard_map must have the type of the body's output)."""
  z = jnp.zeros(shape, dtype)
  axes = frozenset().union(*(varying_axes(a) for a in like))
  return jax.lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def sum_to_type_of(g: jax.Array, primal: jax.Array) -> jax.Array:
  """Sums a cotangent over the manual axes it varies along but its primal does not.

  A weight replicated over data-parallel devices gets the sum of every device's gradient (what
  autodiff does for an invariant input; a custom VJP must do it itself).
  """
  extra = tuple(sorted(varying_axes(g) - varying_axes(primal)))
  return jax.lax.psum(g, extra) if extra else g


def match_varying_axes(*arrays):
  """Casts every array to vary over the union of their manual mesh axes.

  A custom_vjp op whose operands differ in how they vary (a replicated weight times per-device
  activations) would return a per-device weight gradient for an invariant weight, which
  shard_map rejects. Casting before the op makes the operands agree; the cast's transpose then
  sums the weight gradient over the devices, as the built-in dot's implicit cast does.

  Returns:
    a tuple of the arrays, each cast where needed.
  """
  axes = frozenset().union(*(varying_axes(a) for a in arrays))
  if not axes:
    return arrays
  return tuple(a if varying_axes(a) == axes else
               jax.lax.pcast(a, tuple(sorted(axes - varying_axes(a))), to="varying")
               for a in arrays)
