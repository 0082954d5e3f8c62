"""Expert-parallel dispatch / combine schedules for DeepSeekMoE.

Sources: DeepSeek-V3 technical report §3.2.2 (cross-node all-to-all: a token crosses
InfiniBand at most once per destination node, to the GPU with the same in-node index, and is
forwarded to its experts over NVLink; combine reduces within the node first); "Insights into
DeepSeek-V3" (arXiv 2505.09343) §4.3 (node-limited routing).

Everything here runs per device, inside `jax.shard_map` over a mesh with a `node` axis
(inter-node fabric) and a `gpu` axis (intra-node fabric); with `EPTopology()` (1 x 1) it runs
as plain local code and every collective is skipped, which is the single-device path. This
module only places rows into buffers and moves them: the expert computation is a callable
passed in by the caller (`dsv3_jax.model.experts.expert_compute`).

Both schedules are built from one primitive, `exchange` (one hop: slot assignment, take rows,
all_to_all, compute, all_to_all back, take rows back). `flat` is one exchange over
(node, gpu); `two_hop` is an exchange over `node` whose compute is an exchange over `gpu`.
A hop splits into `exchange_dispatch` / `exchange_combine`, and each schedule into `dispatch` /
`combine` (`__call__` is dispatch, experts, combine), so a caller can put other work between a
micro-batch's dispatch and its combine (two micro-batch overlap, V3 report §3.4).

Capacity contract. Shapes are static, so each hop packs rows into per-destination buffers of
a fixed `capacity` (rows per source device and destination: a device for `flat` and for the
second hop of `two_hop`, a node for the first hop). Items are kept first come, first kept;
rows beyond the capacity are dropped and counted (`DispatchStats.dropped`), never silently
lost. A capacity equal to `worst_case_capacity` can never drop. Every hop reports the fill it
would have needed (`DispatchStats.needed_capacity`), so a caller can grow the capacity and
re-run (the trainer's dropless mode). Buffers cost memory traffic, not expert FLOPs: the
receiving device runs only the valid rows. `jax.lax.ragged_all_to_all` does not compile on
XLA:CPU, so the padded all_to_all is the CPU path.

Notation (scaling-book style): x[T, D] are a device's local tokens; E experts, E_l = E / n_dev
per device; expert e lives on device e // E_l = node * gpus_per_node + gpu.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.parallel.topology import EPTopology, pmax, psum  # noqa: F401  (EPTopology re-exported)

# The one-hop exchange, row movement and statistics live in exchange.py (re-exported).
from dsv3_jax.parallel.exchange import (  # noqa: F401
    DispatchStats, Slots, _all_to_all, _bincount, _count, _gather, _hop_comm, _round_capacity,
    _send, _take_items, _take_rows_bwd, _take_rows_fwd, assign_slots, exchange,
    exchange_combine, exchange_dispatch, take_rows)

SCHEDULE_NAMES = ("flat", "two_hop")

# An expert-compute callable: (rows [N, D], local expert id [N] int32, -1 = empty row) ->
# [N, D], zero for empty rows (e.g. `model.experts.expert_compute` with bound weights).
ExpertsFn = Callable[[jax.Array, jax.Array], jax.Array]

# ------------------------------------------------------------------------ schedules


class Dispatched(NamedTuple):
  """A schedule's tokens in flight, between its `dispatch` and its `combine`.

  rows: [N, D] the rows that arrived at this device's experts (N = buffer rows; all-zero
    rows hold no token).
  expert_ids: [N] int32 local expert id of each row, -1 for an empty row.
  state: the schedule's own arrays that `combine` needs (slots of each hop, gate values...).
  """

  rows: jax.Array
  expert_ids: jax.Array
  state: Any


def _local_dispatch(x, idx, weight):
  """All experts on this device: one row per (token, expert) pair (dropless)."""
  k = idx.shape[1]
  flat = idx.reshape(-1)
  return Dispatched(jnp.repeat(x, k, axis=0), flat, (idx, weight))


def _local_combine(out, state, n_experts, hops, topo):
  idx, weight = state
  t, k = idx.shape
  d = out.shape[-1]
  flat = idx.reshape(-1)
  y = jnp.einsum("tkd,tk->td", out.reshape(t, k, d), weight.astype(out.dtype))
  zero = jnp.float32(0.0)
  stats = DispatchStats(
      expert_counts=psum(_bincount(flat, n_experts), topo), dropped=zero,
      needed_capacity=jnp.zeros((hops,), jnp.int32), rows_inter_node=zero, rows_intra_node=zero,
      buffer_rows_inter_node=zero, buffer_rows_intra_node=zero)
  return y, stats


def _local_moe(x, idx, weight, experts: ExpertsFn, n_experts, hops, topo):
  """All experts on this device: every (token, expert) pair is computed (dropless)."""
  d = _local_dispatch(x, idx, weight)
  return _local_combine(experts(d.rows, d.expert_ids), d.state, n_experts, hops, topo)


@dataclasses.dataclass(frozen=True)
class FlatSchedule:
  """One all_to_all over (node, gpu); a (token, expert) pair is one copy (GShard-style).

  A token whose k experts sit on one remote node crosses the inter-node fabric k times.
  Capacity: (C,), rows per (source device, destination device).
  `dispatch_codec` / `combine_codec` (from `dsv3_jax.quant.codec`, None = the compute dtype)
  set the wire format of the token payloads going out and coming back.
  """

  dispatch_codec: Any = None
  combine_codec: Any = None
  name = "flat"
  hops = 1

  def worst_case_capacity(self, tokens: int, n_experts: int, top_k: int,
                          topo: EPTopology, max_nodes: int) -> tuple[int, ...]:
    del max_nodes
    return (tokens * min(top_k, topo.experts_per_device(n_experts)),)

  def initial_capacity(self, tokens: int, n_experts: int, top_k: int, topo: EPTopology,
                       max_nodes: int, factor: float) -> tuple[int, ...]:
    worst = self.worst_case_capacity(tokens, n_experts, top_k, topo, max_nodes)[0]
    return (_round_capacity(factor * tokens * top_k / topo.n_devices, worst),)

  def __call__(self, x, topk_idx, topk_weight, valid, experts: ExpertsFn, *,
               capacity: tuple[int, ...], topo: EPTopology, n_experts: int):
    """Dispatch, expert FFN and combine for one device's tokens.

    Args:
      x: [T, D] local tokens (compute dtype).
      topk_idx: [T, k] int32 global expert ids; topk_weight: [T, k] float32 gate values.
      valid: [T] bool, False for padding (not dispatched, not counted).
      experts: this device's experts, (rows [N, D], local expert id [N]) -> [N, D] (see
        `ExpertsFn`).
      capacity: (C,) rows per (source device, destination device); unused on one device.
      topo: the expert-parallel group; n_experts: E.

    Returns:
      y: [T, D] routed-expert output (zero for padding); stats: `DispatchStats`.
    """
    return _staged(self, x, topk_idx, topk_weight, valid, experts, capacity=capacity,
                   topo=topo, n_experts=n_experts)

  def dispatch(self, x, topk_idx, topk_weight, valid, *, capacity: tuple[int, ...],
               topo: EPTopology, n_experts: int) -> Dispatched:
    """The dispatch half of `__call__` (same arguments, without `experts`): `Dispatched`."""
    idx = jnp.where(valid[:, None], topk_idx, -1)
    if topo.n_devices == 1:
      return _local_dispatch(x, idx, topk_weight)
    (cap,) = capacity
    e_local = topo.experts_per_device(n_experts)
    dest = jnp.where(idx >= 0, idx // e_local, -1)
    rows, (ids,), s = exchange_dispatch(
        x, dest, cap, topo.axes, topo.n_devices,
        items=(jnp.where(idx >= 0, idx % e_local, -1).reshape(-1),),
        dispatch_codec=self.dispatch_codec)
    return Dispatched(rows, ids, (idx, topk_weight, dest, s))

  def combine(self, out, state, *, capacity: tuple[int, ...], topo: EPTopology,
              n_experts: int):
    """The combine half: expert outputs out [N, D] (rows of `dispatch`'s `Dispatched`) and its
    `state` -> (y [T, D], `DispatchStats`), as `__call__` returns."""
    if topo.n_devices == 1:
      return _local_combine(out, state, n_experts, self.hops, topo)
    idx, topk_weight, dest, s = state
    (cap,) = capacity
    n_dev = topo.n_devices
    per_pair = exchange_combine(out, s, idx.shape[1], topo.axes, n_dev,
                                combine_codec=self.combine_codec)
    y = jnp.einsum("tkd,tk->td", per_pair, topk_weight.astype(per_pair.dtype))

    flat = idx.reshape(-1)
    kept = s.slot >= 0
    me = topo.my_node() * topo.gpus_per_node + topo.my_gpu()
    dest_dev = jnp.maximum(dest.reshape(-1), 0)
    same_node = dest_dev // topo.gpus_per_node == topo.my_node()
    stats = DispatchStats(
        expert_counts=psum(_bincount(flat, n_experts), topo),
        dropped=psum(_count((flat >= 0) & ~kept), topo),
        needed_capacity=pmax(jnp.max(s.counts), topo)[None],
        rows_inter_node=psum(_count(kept & ~same_node), topo),
        rows_intra_node=psum(_count(kept & same_node & (dest_dev != me)), topo),
        buffer_rows_inter_node=jnp.float32(
            topo.n_replicas * n_dev * (n_dev - topo.gpus_per_node) * cap),
        buffer_rows_intra_node=jnp.float32(
            topo.n_replicas * n_dev * (topo.gpus_per_node - 1) * cap),
    )
    return y, stats


def _staged(schedule, x, topk_idx, topk_weight, valid, experts: ExpertsFn, **kw):
  """schedule.combine(experts(*schedule.dispatch(...)), ...): a schedule's `__call__`."""
  d = schedule.dispatch(x, topk_idx, topk_weight, valid, **kw)
  return schedule.combine(experts(d.rows, d.expert_ids), d.state, **kw)


@dataclasses.dataclass(frozen=True)
class TwoHopSchedule:
  """Node-aware two-hop dispatch (report §3.2.2).

  Hop 1: an exchange over `node`, one copy per (token, destination node), landing on the GPU
  with the sender's in-node index; the copy carries the token's expert ids and gate values.
  Hop 2 (hop 1's compute): an exchange over `gpu`, one copy per (row, expert on this node).
  Combine reverses it: the gate-weighted sum of a token's experts on one node is formed on that
  node, so each token crosses the inter-node fabric once per destination node each way.
  Capacity: (C1 rows per (source device, node), C2 rows per (hop-1 receiver, GPU)).
  Codecs as for `FlatSchedule` (the dispatch payload is re-encoded for hop 2, which for FP8 with
  unchanged tile scales reproduces the hop-1 values exactly, as forwarding FP8 would).
  """

  dispatch_codec: Any = None
  combine_codec: Any = None
  name = "two_hop"
  hops = 2

  def worst_case_capacity(self, tokens: int, n_experts: int, top_k: int,
                          topo: EPTopology, max_nodes: int) -> tuple[int, ...]:
    del max_nodes
    per_gpu = min(top_k, topo.experts_per_device(n_experts))
    return (tokens, topo.n_nodes * tokens * per_gpu)

  def initial_capacity(self, tokens: int, n_experts: int, top_k: int, topo: EPTopology,
                       max_nodes: int, factor: float) -> tuple[int, ...]:
    w1, w2 = self.worst_case_capacity(tokens, n_experts, top_k, topo, max_nodes)
    nodes_per_token = min(top_k, max_nodes, topo.n_nodes)
    c1 = _round_capacity(factor * tokens * nodes_per_token / topo.n_nodes, w1)
    c2 = _round_capacity(factor * tokens * top_k / topo.gpus_per_node, w2)
    return (c1, c2)

  def __call__(self, x, topk_idx, topk_weight, valid, experts: ExpertsFn, *,
               capacity: tuple[int, ...], topo: EPTopology, n_experts: int):
    """Same contract as `FlatSchedule.__call__`; capacity is (C1, C2)."""
    return _staged(self, x, topk_idx, topk_weight, valid, experts, capacity=capacity,
                   topo=topo, n_experts=n_experts)

  def dispatch(self, x, topk_idx, topk_weight, valid, *, capacity: tuple[int, ...],
               topo: EPTopology, n_experts: int) -> Dispatched:
    """Both hops' dispatch (over `node`, then over `gpu` on the hop-1 receiver):
    `Dispatched` rows at this device's experts (see `FlatSchedule.dispatch`)."""
    idx = jnp.where(valid[:, None], topk_idx, -1)
    if topo.n_devices == 1:
      return _local_dispatch(x, idx, topk_weight)
    c1, c2 = capacity
    k = idx.shape[1]
    g = topo.gpus_per_node
    e_local = topo.experts_per_device(n_experts)
    e_node = e_local * g  # experts per node
    my_node = topo.my_node()

    # Hop 1: one copy per (token, destination node), to the same in-node GPU index.
    node = jnp.where(idx >= 0, idx // e_node, -1)
    earlier = jnp.tril(jnp.ones((k, k), jnp.bool_), -1)  # earlier[j, i]: i < j
    repeated = jnp.any((node[:, :, None] == node[:, None, :]) & earlier[None], axis=-1)
    dest1 = jnp.where(repeated, -1, node)
    rx, (ri, rw), s1 = exchange_dispatch(
        x, dest1, c1, topo.node_axis, topo.n_nodes,
        items=(jnp.repeat(idx, k, axis=0), jnp.repeat(topk_weight, k, axis=0)),
        dispatch_codec=self.dispatch_codec)
    # Hop 2, on the hop-1 receiver: fan out to this node's experts. ri, rw: [R2, k] the rows'
    # expert ids (all k of them) and gate values.
    in_node = jnp.where((ri >= 0) & (ri // e_node == my_node), ri % e_node, -1)
    dest2 = jnp.where(in_node >= 0, in_node // e_local, -1)
    rows, (ids,), s2 = exchange_dispatch(
        rx, dest2, c2, topo.gpu_axis, g,
        items=(jnp.where(in_node >= 0, in_node % e_local, -1).reshape(-1),),
        dispatch_codec=self.dispatch_codec)
    return Dispatched(rows, ids, (idx, dest1, s1, rw, dest2.reshape(-1), s2))

  def combine(self, out, state, *, capacity: tuple[int, ...], topo: EPTopology,
              n_experts: int):
    """Both hops' combine (reduce in-node over `gpu`, then back over `node`): (y [T, D],
    `DispatchStats`), as `__call__` returns."""
    if topo.n_devices == 1:
      return _local_combine(out, state, n_experts, self.hops, topo)
    idx, dest1, s1, rw, dest2, s2 = state
    c1, c2 = capacity
    k = idx.shape[1]
    g = topo.gpus_per_node
    my_node, my_gpu = topo.my_node(), topo.my_gpu()
    per_pair = exchange_combine(out, s2, k, topo.gpu_axis, g, combine_codec=self.combine_codec)
    node_sum = jnp.einsum("rkd,rk->rd", per_pair, rw.astype(per_pair.dtype))  # in-node reduce
    per_node = exchange_combine(node_sum, s1, k, topo.node_axis, topo.n_nodes,
                                combine_codec=self.combine_codec)
    y = per_node.sum(axis=1)  # one row per (token, node), zero for repeats

    kept1 = s1.slot >= 0
    kept2 = s2.slot >= 0
    stats = DispatchStats(
        expert_counts=psum(_bincount(idx.reshape(-1), n_experts), topo),
        dropped=psum(_count(idx >= 0) - _count(kept2), topo),
        needed_capacity=jnp.stack([pmax(jnp.max(s1.counts), topo),
                                   pmax(jnp.max(s2.counts), topo)]),
        rows_inter_node=psum(_count(kept1 & (dest1.reshape(-1) != my_node)), topo),
        rows_intra_node=psum(_count(kept2 & (dest2 != my_gpu)), topo),
        buffer_rows_inter_node=jnp.float32(
            topo.n_replicas * topo.n_devices * (topo.n_nodes - 1) * c1),
        buffer_rows_intra_node=jnp.float32(topo.n_replicas * topo.n_devices * (g - 1) * c2),
    )
    return y, stats


SCHEDULES = {cls.name: cls for cls in (FlatSchedule, TwoHopSchedule)}
assert tuple(SCHEDULES) == SCHEDULE_NAMES


def get_schedule(name: str, dispatch_codec=None, combine_codec=None):
  """The schedule `name` (one of SCHEDULE_NAMES) with the given payload codecs (None: the
  compute dtype).

  Raises:
    ValueError: unknown name (lists the allowed ones).
  """
  try:
    cls = SCHEDULES[name]
  except KeyError:
    raise ValueError(f"model.dispatch={name!r}; allowed: {SCHEDULE_NAMES}") from None
  return cls(dispatch_codec=dispatch_codec, combine_codec=combine_codec)


def payload_bytes_per_row(codec, d: int, dtype) -> int:
  """Bytes one token row of width d occupies on the wire under `codec` (None: `dtype`)."""
  return codec.bytes_per_row(d) if codec is not None else d * jnp.dtype(dtype).itemsize
