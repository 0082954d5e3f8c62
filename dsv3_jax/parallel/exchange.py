"""The building blocks of the expert-parallel schedules in `dsv3_jax.parallel.dispatch`.

Row movement with an explicit VJP (`take_rows`), first-come slot assignment into fixed-capacity
buffers (`assign_slots`, `Slots`), one padded all_to_all hop and its inverse (`exchange`,
`exchange_dispatch`, `exchange_combine`), and the dispatch statistics (`DispatchStats`). Shapes
and the capacity rule are in dispatch.py's docstring; everything runs per device inside
`jax.shard_map`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.parallel.topology import pmax, psum  # noqa: F401

def _all_to_all(x: jax.Array, axes, size: int) -> jax.Array:
  """all_to_all splitting and concatenating leading axis 0; identity when the group is 1."""
  if size == 1:
    return x
  return jax.lax.all_to_all(x, axes, 0, 0, tiled=True)


def _send(codec, rows: jax.Array, comm):
  """comm(rows), through `codec` (FP8 / LogFMT / BF16 wire format) when one is set."""
  if codec is None:
    return comm(rows)
  return codec.transport(rows, comm, dtype=rows.dtype)


# ------------------------------------------------------------------------ row movement


@jax.custom_vjp
def take_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """out[i] = x[index[i]] (zero where index[i] < 0), with a gather-only backward pass.

  XLA:CPU scatters are slow, so instead of the default scatter-add transpose the caller
  passes the inverse map: row r of x was copied to out positions inverse[r, :] (-1 = none),
  and the gradient is dx[r] = sum_j g[inverse[r, j]].

  Args:
    x: [R, ...] rows.
    index: [N] int32 in [-1, R).
    inverse: [R, m] int32 in [-1, N), consistent with `index`.

  Returns:
    [N, ...] in x.dtype.
  """
  return _gather(x, index)


def _gather(x, index):
  valid = (index >= 0).reshape(index.shape + (1,) * (x.ndim - 1))
  return jnp.where(valid, x[jnp.maximum(index, 0)], jnp.zeros((), x.dtype))


def _take_rows_fwd(x, index, inverse):
  return _gather(x, index), (index, inverse)


def _take_rows_bwd(res, g):
  index, inverse = res
  r, m = inverse.shape
  dx = _gather(g, inverse.reshape(-1)).reshape((r, m) + g.shape[1:]).sum(axis=1)
  return dx, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


class Slots(NamedTuple):
  """Placement of N items into n_dest buffers of `capacity` rows.

  slot: [N] int32, position item -> d * capacity + c, or -1 (no destination or dropped).
  src: [n_dest * capacity] int32, the item in each buffer row, or -1 (empty row).
  counts: [n_dest] int32, items that asked for each destination (kept or not).
  """

  slot: jax.Array
  src: jax.Array
  counts: jax.Array


def assign_slots(dest: jax.Array, n_dest: int, capacity: int) -> Slots:
  """Packs items into per-destination buffers in item order (first come, first kept).

  Args:
    dest: [N] int32 destination of each item in [0, n_dest), or -1 for none.
    n_dest: number of destinations.
    capacity: rows per destination buffer.

  Returns:
    `Slots`; an item is dropped when `capacity` earlier items chose its destination.
  """
  n = dest.shape[0]
  key = jnp.where(dest >= 0, dest, n_dest).astype(jnp.int32)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  sorted_key = key[order]
  bounds = jnp.searchsorted(sorted_key, jnp.arange(n_dest + 1, dtype=jnp.int32), side="left")
  starts, counts = bounds[:-1], bounds[1:] - bounds[:-1]
  rank_sorted = jnp.arange(n, dtype=jnp.int32) - bounds[sorted_key]
  rank = jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted, unique_indices=True)
  slot = jnp.where((dest >= 0) & (rank < capacity), key * capacity + rank, -1)
  c = jnp.arange(capacity, dtype=jnp.int32)
  src = jnp.where(c[None, :] < counts[:, None],
                  order[jnp.minimum(starts[:, None] + c[None, :], n - 1)], -1)
  return Slots(slot.astype(jnp.int32), src.reshape(-1).astype(jnp.int32),
               counts.astype(jnp.int32))


# ------------------------------------------------------------------------ one hop


def _take_items(a: jax.Array, src: jax.Array, slot: jax.Array) -> jax.Array:
  """Buffer rows of a per-item array: a[src] (floats differentiably, ints with -1 for empty)."""
  if jnp.issubdtype(a.dtype, jnp.floating):
    return take_rows(a, src, slot[:, None])
  valid = (src >= 0).reshape(src.shape + (1,) * (a.ndim - 1))
  return jnp.where(valid, a[jnp.maximum(src, 0)], -1)


def exchange(rows: jax.Array, dest: jax.Array, capacity: int, axes, n_dest: int,
             compute: Callable, *, items: tuple = (), dispatch_codec=None, combine_codec=None):
  """One expert-parallel hop: dispatch rows to destinations, compute there, combine back.

  Items are (row, j) pairs: row r goes to destination dest[r, j] for every j with
  dest[r, j] >= 0 (one copy per item). The hop (1) packs the items into `n_dest` buffers of
  `capacity` rows in item order (first come, first kept; the rest are dropped), (2) fills the
  buffers from `rows` and the per-item arrays `items`, (3) all_to_alls the buffers over `axes`
  (buffer d goes to destination d, which receives one buffer from every source), (4) runs
  `compute` on what arrived, (5) all_to_alls the results back and (6) hands each item its
  result. `rows` travel through `dispatch_codec` and the results through `combine_codec` (None:
  as they are); `items` travel as they are. Differentiable in `rows`, in floating `items` and
  through `compute`, with gather-only backward passes (`take_rows`).

  Args:
    rows: [R, D] (compute dtype).
    dest: [R, k] int32 destination in [0, n_dest) of each item, or -1 for none.
    capacity: rows per destination buffer (static).
    axes: mesh axis name(s) of the all_to_all, whose group has `n_dest` members (1: no
      collective).
    n_dest: number of destinations.
    compute: (rows [n_dest * capacity, D], items) -> (out [n_dest * capacity, D'], aux): runs
      on the receiver; buffer rows that hold no item have all-zero rows and -1 in integer items.
    items: per-item arrays, each [R * k, ...] (item r * k + j).
    dispatch_codec, combine_codec: wire formats (`dsv3_jax.quant.codec`), or None.

  Returns:
    (out [R, k, D'] each item's result, zero where dropped or without destination;
     slots `Slots` of the packing; aux from `compute`).
  """
  received, received_items, s = exchange_dispatch(rows, dest, capacity, axes, n_dest,
                                                  items=items, dispatch_codec=dispatch_codec)
  out, aux = compute(received, received_items)
  return exchange_combine(out, s, dest.shape[1], axes, n_dest, combine_codec=combine_codec), s, aux


def _hop_comm(axes, n_dest: int, capacity: int):
  """The hop's all_to_all on [n_dest * capacity, ...] buffers (buffer d -> destination d)."""
  return lambda v: _all_to_all(v.reshape((n_dest, capacity) + v.shape[1:]), axes,
                               n_dest).reshape(v.shape)


def exchange_dispatch(rows: jax.Array, dest: jax.Array, capacity: int, axes, n_dest: int, *,
                      items: tuple = (), dispatch_codec=None):
  """Steps (1)-(3) of `exchange`: pack, fill and all_to_all the buffers (the dispatch half).

  Splitting a hop lets a caller put other work between its dispatch and its combine (two
  micro-batch overlap, `dsv3_jax.infer.overlap`); `exchange` is exactly
  `exchange_dispatch`, `compute`, `exchange_combine`.

  Args: as `exchange`.

  Returns:
    (received [n_dest * capacity, D] rows at this device, received_items (each
     [n_dest * capacity, ...]), slots `Slots` of the packing, for `exchange_combine`).
  """
  r, k = dest.shape
  s = assign_slots(dest.reshape(-1), n_dest, capacity)
  comm = _hop_comm(axes, n_dest, capacity)
  send = take_rows(rows, jnp.where(s.src >= 0, s.src // k, -1), s.slot.reshape(r, k))
  received = _send(dispatch_codec, send, comm)
  received_items = tuple(comm(_take_items(a, s.src, s.slot)) for a in items)
  return received, received_items, s


def exchange_combine(out: jax.Array, slots: Slots, k: int, axes, n_dest: int, *,
                     combine_codec=None) -> jax.Array:
  """Steps (5)-(6) of `exchange`: all_to_all the results back, hand each item its result.

  Args:
    out: [n_dest * capacity, D'] results of the rows `exchange_dispatch` delivered here.
    slots: the `Slots` `exchange_dispatch` returned; k: items per row (dest.shape[1]).
    axes, n_dest, combine_codec: as `exchange`.

  Returns:
    [R, k, D'] each item's result, zero where dropped or without destination.
  """
  comm = _hop_comm(axes, n_dest, out.shape[0] // n_dest)
  back = _send(combine_codec, out, comm)
  per_item = take_rows(back, slots.slot, slots.src[:, None])
  return per_item.reshape((slots.slot.shape[0] // k, k) + per_item.shape[1:])


# ------------------------------------------------------------------------ statistics


class DispatchStats(NamedTuple):
  """What one MoE layer's dispatch did, summed over the expert-parallel group (one step).

  expert_counts: [E] float32, routed (token, expert) assignments per expert, padding excluded
    (the load used by the auxiliary-loss-free bias update).
  dropped: [] float32, assignments not computed because a buffer was full.
  needed_capacity: [hops] int32, the largest buffer fill any device asked for, per hop.
  rows_inter_node, rows_intra_node: [] float32, token rows crossing the inter-node (IB) and
    intra-node (NVLink) fabric in dispatch (combine moves the same rows back).
  buffer_rows_inter_node, buffer_rows_intra_node: [] float32, rows of the padded buffers sent
    over each link class (what a padded all_to_all actually moves).
  """

  expert_counts: jax.Array
  dropped: jax.Array
  needed_capacity: jax.Array
  rows_inter_node: jax.Array
  rows_intra_node: jax.Array
  buffer_rows_inter_node: jax.Array
  buffer_rows_intra_node: jax.Array


def _round_capacity(x: float, worst: int) -> int:
  return int(min(worst, max(8, 8 * math.ceil(x / 8))))


def _bincount(ids: jax.Array, n: int) -> jax.Array:
  """[n] float32 counts of ids in [0, n); negative ids are ignored."""
  return jnp.bincount(jnp.where(ids >= 0, ids, n), length=n + 1)[:n].astype(jnp.float32)


def _count(mask: jax.Array) -> jax.Array:
  return jnp.sum(mask).astype(jnp.float32)
