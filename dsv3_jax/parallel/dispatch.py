"""Expert-parallel dispatch / combine schedules for DeepSeekMoE.

Sources: DeepSeek-V3 technical report §3.2.2 (cross-node all-to-all: a token crosses
InfiniBand at most once per destination node, to the GPU with the same in-node index, and is
forwarded to its experts over NVLink; combine reduces within the node first); "Insights into
DeepSeek-V3" (arXiv 2505.09343) §4.3 (node-limited routing).

Everything here runs per device, inside `jax.shard_map` over a mesh with a `node` axis
(inter-node fabric) and a `gpu` axis (intra-node fabric); with `EPTopology()` (1 x 1) it runs
as plain local code and every collective is skipped, which is the single-device path.

Shapes are static. Each hop packs rows into per-destination buffers of a fixed `capacity`
(rows per source device and destination device or node); rows beyond it are dropped and
counted. With a capacity equal to `worst_case_capacity` nothing can be dropped. Schedules report
the capacity each hop would have needed, so a caller can grow it and re-run (the trainer's
dropless mode). `jax.lax.ragged_all_to_all` does not compile on XLA:CPU, so the padded
all_to_all is the CPU path. Rows travel with their local expert id; the receiving device sorts
the valid ones by expert and runs `grouped_ffn.grouped_swiglu`, so the expert computation costs
the rows actually routed there, not the padded buffer (and is dropless for any load on one
device).

Notation (scaling-book style): x[T, D] are a device's local tokens; E experts, E_l = E / n_dev
per device; expert e lives on device e // E_l = node * gpus_per_node + gpu.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from dsv3_jax.model.grouped_ffn import grouped_swiglu, grouped_swiglu_fp8

# --------------------------------------------------------------------------------- topology


@dataclasses.dataclass(frozen=True)
class EPTopology:
  """The expert-parallel group: `n_nodes` x `gpus_per_node` devices on mesh axes of those names.

  Experts are laid out device-major over (node, gpu): expert e is on node
  e // (E_l * gpus_per_node), GPU (e // E_l) % gpus_per_node. With `replica_axis` set, the
  cluster holds several such groups (data parallelism across them, e.g. EP64 = 8 nodes inside
  256 nodes); statistics are then summed over the replicas too.
  """

  n_nodes: int = 1
  gpus_per_node: int = 1
  node_axis: str = "node"
  gpu_axis: str = "gpu"
  replica_axis: Optional[str] = None
  n_replicas: int = 1

  @property
  def n_devices(self) -> int:
    return self.n_nodes * self.gpus_per_node

  @property
  def axes(self) -> tuple[str, str]:
    """The expert-parallel axes (experts are sharded over these)."""
    return (self.node_axis, self.gpu_axis)

  @property
  def all_axes(self) -> tuple[str, ...]:
    """Every mesh axis the tokens are sharded over (replicas first)."""
    return ((self.replica_axis,) if self.replica_axis else ()) + self.axes

  def experts_per_device(self, n_experts: int) -> int:
    if n_experts % self.n_devices:
      raise ValueError(
          f"model.n_routed_experts={n_experts} is not divisible by the expert-parallel size "
          f"{self.n_devices} (mesh.nodes={self.n_nodes} x mesh.gpus_per_node="
          f"{self.gpus_per_node}); use a multiple of {self.n_devices}")
    return n_experts // self.n_devices

  def my_node(self) -> jax.Array:
    return jax.lax.axis_index(self.node_axis) if self.n_nodes > 1 else jnp.int32(0)

  def my_gpu(self) -> jax.Array:
    return jax.lax.axis_index(self.gpu_axis) if self.gpus_per_node > 1 else jnp.int32(0)

  @property
  def all_axes_present(self) -> tuple[str, ...]:
    """The mesh axes of size > 1 (collectives over size-1 axes are skipped)."""
    sizes = {self.node_axis: self.n_nodes, self.gpu_axis: self.gpus_per_node}
    if self.replica_axis:
      sizes[self.replica_axis] = self.n_replicas
    return tuple(a for a in self.all_axes if sizes[a] > 1)


def _all_to_all(x: jax.Array, axes, size: int) -> jax.Array:
  """all_to_all splitting and concatenating leading axis 0; identity when the group is 1."""
  if size == 1:
    return x
  return jax.lax.all_to_all(x, axes, 0, 0, tiled=True)


def _psum(x, topo: EPTopology):
  """Sum over the whole cluster, one mesh axis at a time: a reduction over one 2048-member group
  needs a connection per peer per device in multi-process emulation (NOTES-2048), per-axis
  groups of 8 and 256 do not (and real clusters reduce hierarchically anyway)."""
  for axis in reversed(topo.all_axes_present):
    x = jax.lax.psum(x, axis)
  return x


def _pmax(x, topo: EPTopology):
  for axis in reversed(topo.all_axes_present):
    x = jax.lax.pmax(x, axis)
  return x


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


# ------------------------------------------------------------------------ experts


def expert_ffn(h: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """SwiGLU experts on their buffers: down(silu(h @ gate) * (h @ up)).

  Args:
    h: [E_l, N, D] rows per local expert.
    w_gate, w_up: [E_l, D, F]; w_down: [E_l, F, D].

  Returns:
    [E_l, N, D] in h.dtype.
  """
  dt = h.dtype
  g = jnp.einsum("end,edf->enf", h, w_gate.astype(dt))
  u = jnp.einsum("end,edf->enf", h, w_up.astype(dt))
  return jnp.einsum("enf,efd->end", jax.nn.silu(g) * u, w_down.astype(dt))


def expert_compute(rows: jax.Array, expert: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, *, window: int = 128, fp8_recipe=None) -> jax.Array:
  """Applies each row's local expert, at the cost of the valid rows only.

  Rows are stably sorted by expert (invalid rows last), run through `grouped_swiglu` (or
  `grouped_swiglu_fp8` when `fp8_recipe` is set, report §3.3), and put back in their original
  order.

  Args:
    rows: [N, D] (compute dtype).
    expert: [N] int32 local expert id in [0, E_l), or -1 for an empty buffer row.
    w_gate, w_up: [E_l, D, F]; w_down: [E_l, F, D].
    window: rows per matmul in the grouped kernel.
    fp8_recipe: a `quant.fp8.Fp8Recipe` to run the expert GEMMs in FP8, or None.

  Returns:
    [N, D]: FFN_{expert[r]}(rows[r]), zero where expert[r] < 0.
  """
  n = rows.shape[0]
  e_local = w_gate.shape[0]
  key = jnp.where(expert >= 0, expert, e_local).astype(jnp.int32)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  position = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32),
                                                       unique_indices=True)
  bounds = jnp.searchsorted(key[order], jnp.arange(e_local + 1, dtype=jnp.int32), side="left")
  seg_start, seg_len = bounds[:-1], bounds[1:] - bounds[:-1]
  sorted_rows = take_rows(rows, order, position[:, None])
  segs = (seg_start.astype(jnp.int32), seg_len.astype(jnp.int32),
          jnp.arange(e_local, dtype=jnp.int32))
  if fp8_recipe is None:
    out = grouped_swiglu(sorted_rows, *segs, w_gate, w_up, w_down, window)
  else:
    out = grouped_swiglu_fp8(sorted_rows, *segs, w_gate, w_up, w_down, window, fp8_recipe)
  out = take_rows(out, position, order[:, None])
  return jnp.where((expert >= 0)[:, None], out, jnp.zeros((), out.dtype))


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


# ------------------------------------------------------------------------ schedules


def _local_moe(x, idx, weight, w_gate, w_up, w_down, n_experts, hops, topo, fp8_recipe=None):
  """All experts on this device: every (token, expert) pair is computed (dropless)."""
  t, d = x.shape
  k = idx.shape[1]
  flat = idx.reshape(-1)
  out = expert_compute(jnp.repeat(x, k, axis=0), flat, w_gate, w_up, w_down,
                       fp8_recipe=fp8_recipe)
  y = jnp.einsum("tkd,tk->td", out.reshape(t, k, d), weight.astype(out.dtype))
  zero = jnp.float32(0.0)
  stats = DispatchStats(
      expert_counts=_psum(_bincount(flat, n_experts), topo), dropped=zero,
      needed_capacity=jnp.zeros((hops,), jnp.int32), rows_inter_node=zero, rows_intra_node=zero,
      buffer_rows_inter_node=zero, buffer_rows_intra_node=zero)
  return y, stats


def _bincount(ids: jax.Array, n: int) -> jax.Array:
  """[n] float32 counts of ids in [0, n); negative ids are ignored."""
  return jnp.bincount(jnp.where(ids >= 0, ids, n), length=n + 1)[:n].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class FlatSchedule:
  """One all_to_all over (node, gpu); a (token, expert) pair is one copy (GShard-style).

  A token whose k experts sit on one remote node crosses the inter-node fabric k times.
  Capacity: (C,), rows per (source device, destination device).
  `dispatch_codec` / `combine_codec` (from `dsv3_jax.quant.codec`, None = the compute dtype)
  set the wire format of the token payloads going out and coming back; `expert_recipe` (a
  `quant.fp8.Fp8Recipe`, None = compute dtype) runs the routed experts' GEMMs in FP8.
  """

  dispatch_codec: Any = None
  combine_codec: Any = None
  expert_recipe: Any = None
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

  def __call__(self, x, topk_idx, topk_weight, valid, w_gate, w_up, w_down, *,
               capacity: tuple[int, ...], topo: EPTopology, n_experts: int):
    """Dispatch, expert FFN and combine for one device's tokens.

    Args:
      x: [T, D] local tokens (compute dtype).
      topk_idx: [T, k] int32 global expert ids; topk_weight: [T, k] float32 gate values.
      valid: [T] bool, False for padding (not dispatched, not counted).
      w_gate, w_up: [E_l, D, F]; w_down: [E_l, F, D] this device's experts.
      capacity: (C,) rows per (source device, destination device); unused on one device.

    Returns:
      y: [T, D] routed-expert output (zero for padding); stats: `DispatchStats`.
    """
    idx = jnp.where(valid[:, None], topk_idx, -1)
    if topo.n_devices == 1:
      return _local_moe(x, idx, topk_weight, w_gate, w_up, w_down, n_experts, self.hops, topo,
                        self.expert_recipe)
    (cap,) = capacity
    t, d = x.shape
    k = idx.shape[1]
    n_dev = topo.n_devices
    e_local = w_gate.shape[0]
    flat = idx.reshape(-1)
    dest = jnp.where(flat >= 0, flat // e_local, -1)
    s = assign_slots(dest, n_dev, cap)

    send = take_rows(x, jnp.where(s.src >= 0, s.src // k, -1), s.slot.reshape(t, k))
    send_e = jnp.where(s.src >= 0, flat[jnp.maximum(s.src, 0)] % e_local, -1)
    a2a = lambda v: _all_to_all(v.reshape((n_dev, cap) + v.shape[1:]), topo.axes,
                                n_dev).reshape(v.shape)
    out = expert_compute(_send(self.dispatch_codec, send, a2a), a2a(send_e), w_gate, w_up,
                         w_down, fp8_recipe=self.expert_recipe)
    per_pair = take_rows(_send(self.combine_codec, out, a2a), s.slot,
                         s.src[:, None]).reshape(t, k, d)
    y = jnp.einsum("tkd,tk->td", per_pair, topk_weight.astype(per_pair.dtype))

    kept = s.slot >= 0
    me = topo.my_node() * topo.gpus_per_node + topo.my_gpu()
    dest_dev = jnp.maximum(dest, 0)
    same_node = dest_dev // topo.gpus_per_node == topo.my_node()
    stats = DispatchStats(
        expert_counts=_psum(_bincount(flat, n_experts), topo),
        dropped=_psum(jnp.sum((flat >= 0) & ~kept).astype(jnp.float32), topo),
        needed_capacity=_pmax(jnp.max(s.counts), topo)[None],
        rows_inter_node=_psum(jnp.sum(kept & ~same_node).astype(jnp.float32), topo),
        rows_intra_node=_psum(jnp.sum(kept & same_node & (dest_dev != me)).astype(jnp.float32),
                              topo),
        buffer_rows_inter_node=jnp.float32(
            topo.n_replicas * n_dev * (n_dev - topo.gpus_per_node) * cap),
        buffer_rows_intra_node=jnp.float32(
            topo.n_replicas * n_dev * (topo.gpus_per_node - 1) * cap),
    )
    return y, stats


@dataclasses.dataclass(frozen=True)
class TwoHopSchedule:
  """Node-aware two-hop dispatch (report §3.2.2).

  Hop 1: all_to_all over `node`, one copy per (token, destination node), landing on the GPU
  with the sender's in-node index; the copy carries the token's expert ids and gate values.
  Hop 2: all_to_all over `gpu`, one copy per (row, expert on this node). Combine reverses it:
  the gate-weighted sum of a token's experts on one node is formed on that node, so each token
  crosses the inter-node fabric once per destination node in each direction.
  Capacity: (C1 rows per (source device, node), C2 rows per (hop-1 receiver, GPU)).
  Codecs as for `FlatSchedule` (the dispatch payload is re-encoded for hop 2, which for FP8 with
  unchanged tile scales reproduces the hop-1 values exactly, as forwarding FP8 would).
  """

  dispatch_codec: Any = None
  combine_codec: Any = None
  expert_recipe: Any = None
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

  def __call__(self, x, topk_idx, topk_weight, valid, w_gate, w_up, w_down, *,
               capacity: tuple[int, ...], topo: EPTopology, n_experts: int):
    """Same contract as `FlatSchedule.__call__`; capacity is (C1, C2)."""
    idx = jnp.where(valid[:, None], topk_idx, -1)
    if topo.n_devices == 1:
      return _local_moe(x, idx, topk_weight, w_gate, w_up, w_down, n_experts, self.hops, topo,
                        self.expert_recipe)
    c1, c2 = capacity
    t, d = x.shape
    k = idx.shape[1]
    g = topo.gpus_per_node
    e_local = w_gate.shape[0]
    e_node = e_local * g  # experts per node
    my_node, my_gpu = topo.my_node(), topo.my_gpu()

    # Hop 1: one copy per (token, destination node), to the same in-node GPU index.
    node = jnp.where(idx >= 0, idx // e_node, -1)
    earlier = jnp.tril(jnp.ones((k, k), jnp.bool_), -1)  # earlier[j, i]: i < j
    repeated = jnp.any((node[:, :, None] == node[:, None, :]) & earlier[None], axis=-1)
    dest1 = jnp.where(repeated, -1, node).reshape(-1)
    s1 = assign_slots(dest1, topo.n_nodes, c1)
    row1 = jnp.where(s1.src >= 0, s1.src // k, -1)
    inv1 = s1.slot.reshape(t, k)
    send_i = jnp.where((row1 >= 0)[:, None], idx[jnp.maximum(row1, 0)], -1)
    hop1 = lambda v: _all_to_all(v.reshape((topo.n_nodes, c1) + v.shape[1:]), topo.node_axis,
                                 topo.n_nodes).reshape(v.shape)
    rx = _send(self.dispatch_codec, take_rows(x, row1, inv1), hop1)
    rw = hop1(take_rows(topk_weight, row1, inv1))
    ri = hop1(send_i)  # [R2 = n_nodes * C1, k]: the rows' expert ids (all k of them)
    r2 = rx.shape[0]

    # Hop 2: one copy per (row, expert on this node), over the intra-node fabric.
    in_node = jnp.where((ri >= 0) & (ri // e_node == my_node), ri % e_node, -1).reshape(-1)
    dest2 = jnp.where(in_node >= 0, in_node // e_local, -1)
    s2 = assign_slots(dest2, g, c2)
    send2 = take_rows(rx, jnp.where(s2.src >= 0, s2.src // k, -1), s2.slot.reshape(r2, k))
    send2_e = jnp.where(s2.src >= 0, in_node[jnp.maximum(s2.src, 0)] % e_local, -1)
    hop2 = lambda v: _all_to_all(v.reshape((g, c2) + v.shape[1:]), topo.gpu_axis,
                                 g).reshape(v.shape)
    out = expert_compute(_send(self.dispatch_codec, send2, hop2), hop2(send2_e), w_gate, w_up,
                         w_down, fp8_recipe=self.expert_recipe)
    per_pair = take_rows(_send(self.combine_codec, out, hop2), s2.slot,
                         s2.src[:, None]).reshape(r2, k, d)
    node_sum = jnp.einsum("rkd,rk->rd", per_pair, rw.astype(per_pair.dtype))  # in-node reduce

    # Reverse hop 1: one row per (token, node) back over the inter-node fabric.
    y = take_rows(_send(self.combine_codec, node_sum, hop1), s1.slot,
                  s1.src[:, None]).reshape(t, k, d).sum(axis=1)

    kept1 = s1.slot >= 0
    kept2 = s2.slot >= 0
    stats = DispatchStats(
        expert_counts=_psum(_bincount(idx.reshape(-1), n_experts), topo),
        dropped=_psum(jnp.sum(idx >= 0).astype(jnp.float32) -
                      jnp.sum(kept2).astype(jnp.float32), topo),
        needed_capacity=jnp.stack([_pmax(jnp.max(s1.counts), topo),
                                   _pmax(jnp.max(s2.counts), topo)]),
        rows_inter_node=_psum(jnp.sum(kept1 & (dest1 != my_node)).astype(jnp.float32), topo),
        rows_intra_node=_psum(jnp.sum(kept2 & (dest2 != my_gpu)).astype(jnp.float32), topo),
        buffer_rows_inter_node=jnp.float32(
            topo.n_replicas * topo.n_devices * (topo.n_nodes - 1) * c1),
        buffer_rows_intra_node=jnp.float32(topo.n_replicas * topo.n_devices * (g - 1) * c2),
    )
    return y, stats


SCHEDULES = {"flat": FlatSchedule, "two_hop": TwoHopSchedule}


def get_schedule(name: str, dispatch_codec=None, combine_codec=None, expert_recipe=None):
  """The schedule `name` (a key of SCHEDULES) with the given payload codecs and the routed
  experts' FP8 recipe (None: compute dtype).

  Raises:
    ValueError: unknown name (lists the allowed ones).
  """
  try:
    cls = SCHEDULES[name]
  except KeyError:
    raise ValueError(f"model.dispatch={name!r}; allowed: {tuple(SCHEDULES)}") from None
  return cls(dispatch_codec=dispatch_codec, combine_codec=combine_codec,
             expert_recipe=expert_recipe)


def payload_bytes_per_row(codec, d: int, dtype) -> int:
  """Bytes one token row of width d occupies on the wire under `codec` (None: `dtype`)."""
  return codec.bytes_per_row(d) if codec is not None else d * jnp.dtype(dtype).itemsize


def moe_dense_reference(x, topk_idx, topk_weight, w_gate, w_up, w_down):
  """Every expert on every token, masked by the routing: the single-device ground truth.

  Args:
    x: [T, D]; topk_idx: [T, k] int32; topk_weight: [T, k] float32;
    w_gate, w_up: [E, D, F]; w_down: [E, F, D] (all experts).

  Returns:
    [T, D] = sum_j topk_weight[t, j] * FFN_{topk_idx[t, j]}(x[t]).
  """
  n_experts = w_gate.shape[0]
  all_out = expert_ffn(jnp.broadcast_to(x[None], (n_experts,) + x.shape), w_gate, w_up, w_down)
  combine = jnp.sum(jax.nn.one_hot(topk_idx, n_experts, dtype=jnp.float32) *
                    topk_weight[..., None], axis=1)  # [T, E]
  return jnp.einsum("etd,te->td", all_out, combine.astype(all_out.dtype))


def link_copies(topk_idx, src_node, experts_per_node: int):
  """Token copies per link class implied by a routing, for both schedules (no execution).

  The counting rule of the schedules' `DispatchStats`, as plain arithmetic on the routing, so that
  routings at any scale can be costed (arXiv 2505.09343 §4.3; report §3.2.2).

  Args:
    topk_idx: [T, k] int global expert ids (-1 = none), experts laid out node-major.
    src_node: [T] int node holding each token.
    experts_per_node: E / nodes.

  Returns:
    dict of [T] int arrays: `flat_inter` (one inter-node copy per remote expert),
    `two_hop_inter` (one per distinct remote node), `nodes_reached` (distinct nodes, local
    included), `experts_per_remote_node` (remote experts / remote nodes, 0 if none).
  """
  import numpy as np

  idx = np.asarray(topk_idx)
  src = np.asarray(src_node)[:, None]
  valid = idx >= 0
  node = np.where(valid, idx // experts_per_node, -1)
  remote = valid & (node != src)
  k = idx.shape[1]
  first = np.ones_like(valid)
  for j in range(1, k):  # a node counts once per token
    first[:, j] = ~np.any(node[:, :j] == node[:, j:j + 1], axis=1)
  flat_inter = remote.sum(1)
  two_hop_inter = (remote & first).sum(1)
  nodes_reached = (valid & first).sum(1)
  per_node = np.where(two_hop_inter > 0, flat_inter / np.maximum(two_hop_inter, 1), 0.0)
  return dict(flat_inter=flat_inter, two_hop_inter=two_hop_inter, nodes_reached=nodes_reached,
              experts_per_remote_node=per_node)
