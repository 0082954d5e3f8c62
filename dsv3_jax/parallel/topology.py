"""The expert-parallel group on a (`node`, `gpu`) mesh, and cluster-wide reductions over it.

Sources: DeepSeek-V3 technical report §3.2.2 (experts laid out over nodes and GPUs) and §2.1.2
(node-limited routing: the router's expert groups are the nodes).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from dsv3_jax.parallel.mesh import GPU_AXIS, NODE_AXIS, REPLICA_AXIS

@dataclasses.dataclass(frozen=True)
class EPTopology:
  """The expert-parallel group: `n_nodes` x `gpus_per_node` devices on mesh axes of those names.

  Experts are laid out device-major over (node, gpu): expert e is on node
  e // (E_l * gpus_per_node), GPU (e // E_l) % gpus_per_node. With `replica_axis` set, the
  cluster holds several such groups (data parallelism across them, e.g. EP64 = 8 nodes inside
  256 nodes); statistics are then summed over the replicas too. Build it from a mesh with
  `EPTopology.from_mesh`.
  """

  n_nodes: int = 1
  gpus_per_node: int = 1
  node_axis: str = NODE_AXIS
  gpu_axis: str = GPU_AXIS
  replica_axis: Optional[str] = None
  n_replicas: int = 1

  @classmethod
  def from_mesh(cls, mesh) -> "EPTopology":
    """The topology of a `parallel.mesh.make_mesh` mesh: axes (`node`, `gpu`), optionally with
    a leading `replica` axis (EP groups over a subset of nodes).

    Raises:
      ValueError: the mesh lacks a `node` or `gpu` axis, or has other axes.
    """
    shape = dict(mesh.shape)
    allowed = {NODE_AXIS, GPU_AXIS, REPLICA_AXIS}
    if NODE_AXIS not in shape or GPU_AXIS not in shape or set(shape) - allowed:
      raise ValueError(f"an expert-parallel mesh needs axes ({NODE_AXIS!r}, {GPU_AXIS!r}) and "
                       f"optionally {REPLICA_AXIS!r}; got {tuple(shape)} (build it with "
                       "dsv3_jax.parallel.mesh.make_mesh)")
    replica = REPLICA_AXIS if REPLICA_AXIS in shape else None
    return cls(n_nodes=shape[NODE_AXIS], gpus_per_node=shape[GPU_AXIS], replica_axis=replica,
               n_replicas=shape.get(REPLICA_AXIS, 1))

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
    """E_l = E / (nodes x GPUs).

    Raises:
      ValueError: E not divisible by the expert-parallel size.
    """
    if n_experts % self.n_devices:
      raise ValueError(
          f"model.n_routed_experts={n_experts} is not divisible by the expert-parallel size "
          f"{self.n_devices} (mesh.ep_nodes x mesh.gpus_per_node = {self.n_nodes} x "
          f"{self.gpus_per_node}); allowed: a multiple of {self.n_devices}")
    return n_experts // self.n_devices

  def validate(self, n_experts: int, n_group: int) -> None:
    """Checks a model's expert layout against this group (before any work is done).

    Experts must divide over the devices, and with more than one node the router's expert
    groups must be the nodes (`n_group` = nodes), so that `topk_group` bounds the nodes a
    token reaches (node-limited routing, report §2.1.2).

    Raises:
      ValueError: naming the setting and the allowed values.
    """
    self.experts_per_device(n_experts)
    if self.n_nodes > 1 and n_group != self.n_nodes:
      raise ValueError(
          f"model.n_group={n_group} must equal the {self.n_nodes} nodes of the "
          "expert-parallel group (mesh.ep_nodes, default mesh.nodes): expert groups are nodes, "
          "so that model.topk_group bounds the nodes a token reaches (node-limited routing, "
          "report §2.1.2)")

  def my_node(self) -> jax.Array:
    return jax.lax.axis_index(self.node_axis) if self.n_nodes > 1 else jnp.int32(0)

  def my_gpu(self) -> jax.Array:
    return jax.lax.axis_index(self.gpu_axis) if self.gpus_per_node > 1 else jnp.int32(0)

  def manual_axes(self) -> tuple[str, ...]:
    """The token axes that the current trace is per-device over (inside shard_map: all of
    them, whatever their size; outside: none)."""
    manual = jax.sharding.get_abstract_mesh().manual_axes
    return tuple(a for a in self.all_axes if a in manual)


def psum(x, topo: EPTopology):
  """Sum over the whole cluster, one mesh axis at a time (minor axis first).

  Every token axis is reduced, size-1 axes included: inside shard_map a per-device value
  varies over every axis its inputs are sharded over, and only a reduction over each of them
  makes it invariant (replicated), whatever the axis size. Per-axis groups (of 8 and 256 at
  2048 devices) rather than one 2048-member group, as real clusters reduce hierarchically (and
  multi-process emulation needs, see results/scale_2048.md).
  """
  for axis in reversed(topo.manual_axes()):
    x = jax.lax.psum(x, axis)
  return x


def pmax(x, topo: EPTopology):
  """Max over the whole cluster, one mesh axis at a time (see `psum`)."""
  for axis in reversed(topo.manual_axes()):
    x = jax.lax.pmax(x, axis)
  return x
