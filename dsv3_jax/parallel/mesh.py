"""The emulated cluster: a device mesh with an inter-node (`node`) and an intra-node (`gpu`) axis.

On a CPU, N devices are emulated with `XLA_FLAGS=--xla_force_host_platform_device_count=N`,
which must be set before jax is imported: entry points call `set_host_device_count` first.
The same code runs on real accelerators (and several hosts with `jax.distributed`): only the
device count changes, never the program.

Sharding notation (scaling book): x[B_{node,gpu}, S, D] is a batch sharded over node x gpu;
W[E_{node,gpu}, D, F] are routed experts sharded the same way; everything else is replicated.

Axis names (the one place they are defined): `node` (inter-node fabric, InfiniBand) and `gpu`
(intra-node, NVLink) carry expert parallelism; `replica` indexes data-parallel copies of an
expert-parallel group over a subset of nodes; `stage` indexes pipeline-parallel ranks
(`make_pipeline_mesh`, `parallel.pipeline`), each holding its own layers and its own
(`replica`,) `node` x `gpu` group.
"""

from __future__ import annotations

import os
import re
import sys

NODE_AXIS = "node"
GPU_AXIS = "gpu"
REPLICA_AXIS = "replica"
STAGE_AXIS = "stage"
MESH_AXES = (NODE_AXIS, GPU_AXIS)
_FLAG = "--xla_force_host_platform_device_count"


def mesh_device_count(mesh_cfg) -> int:
  """Devices a mesh config needs: mesh.nodes x mesh.gpus_per_node x mesh.stages (stages 1 when
  the config has none). Does not import jax: entry points call it before jax starts.

  Args:
    mesh_cfg: the config's `mesh` section (ConfigDict or dict).

  Raises:
    ValueError: a size that is not a positive integer, naming the setting.
  """
  n = 1
  for key in ("nodes", "gpus_per_node", "stages"):
    v = mesh_cfg.get(key, 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"mesh.{key} must be a positive integer, got {v!r}")
    n *= v
  return n


def set_host_device_count(n: int) -> None:
  """Makes the CPU backend expose `n` devices; must run before jax is imported.

  Raises:
    ValueError: n < 1.
    RuntimeError: jax is already imported with a different device count (the emulated mesh
      cannot change inside a running process; restart it or run in a subprocess).
  """
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"device count must be a positive integer, got {n!r}")
  flags = re.sub(rf"{_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
  os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()
  if "jax" in sys.modules:
    import jax
    have = jax.device_count()
    if have != n and jax.default_backend() == "cpu":
      raise RuntimeError(
          f"jax was imported before the device count was set: it has {have} device(s), the "
          f"mesh needs {n}. Set XLA_FLAGS={_FLAG}={n} before importing jax (restart the "
          "runtime) or run in a fresh process.")


def make_mesh(nodes: int, gpus_per_node: int, ep_nodes=None, devices=None):
  """A `jax.sharding.Mesh` of the emulated cluster.

  With the expert-parallel group spanning every node (`ep_nodes` None or = nodes): shape
  (nodes, gpus_per_node), axes ('node', 'gpu'). With EP groups of `ep_nodes` nodes (e.g. EP64 =
  8 nodes of 8 GPUs inside 256 nodes, report §3.1): shape (nodes / ep_nodes, ep_nodes,
  gpus_per_node), axes ('replica', 'node', 'gpu'), 'node' indexing a node inside its group and
  data parallelism across groups. Device d = node * gpus_per_node + gpu (consecutive devices
  share a node) in both layouts.

  Args:
    nodes: number of nodes (mesh.nodes), >= 1.
    gpus_per_node: devices per node (mesh.gpus_per_node), >= 1.
    ep_nodes: nodes per expert-parallel group (mesh.ep_nodes); must divide `nodes`.
    devices: optional explicit device list (default: the first nodes * gpus_per_node devices).

  Raises:
    ValueError: a non-positive size, `ep_nodes` not dividing `nodes`, or fewer devices than the
      mesh needs (the message says how to set the emulated device count).
  """
  import jax
  import numpy as np

  for name, v in (("mesh.nodes", nodes), ("mesh.gpus_per_node", gpus_per_node)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  ep_nodes = nodes if ep_nodes is None else ep_nodes
  if not isinstance(ep_nodes, int) or ep_nodes < 1 or nodes % ep_nodes:
    raise ValueError(f"mesh.ep_nodes={ep_nodes!r} must be a positive divisor of "
                     f"mesh.nodes={nodes}")
  n = nodes * gpus_per_node
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < n:
    raise ValueError(
        f"mesh.nodes x mesh.gpus_per_node = {nodes} x {gpus_per_node} = {n} devices, but jax "
        f"has {len(devices)}; set XLA_FLAGS={_FLAG}={n} before importing jax")
  if ep_nodes == nodes:
    grid = np.array(devices[:n], dtype=object).reshape(nodes, gpus_per_node)
    return jax.sharding.Mesh(grid, MESH_AXES)
  grid = np.array(devices[:n], dtype=object).reshape(nodes // ep_nodes, ep_nodes, gpus_per_node)
  return jax.sharding.Mesh(grid, (REPLICA_AXIS,) + MESH_AXES)


def shard_model(model, mesh) -> None:
  """Places every variable of an nnx model on `mesh` per its `sharding_names` metadata
  (routed experts over ('node', 'gpu'), everything else replicated), in place."""
  import jax
  from flax import nnx

  state = nnx.state(model)
  specs = nnx.get_partition_spec(state)
  shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
  nnx.update(model, jax.device_put(state, shardings))


def state_shardings(state, mesh):
  """NamedShardings for an nnx State (or any pytree with partition metadata) on `mesh`."""
  import jax
  from flax import nnx

  return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s),
                      nnx.get_partition_spec(state))


def make_pipeline_mesh(stages: int, nodes: int, gpus_per_node: int, ep_nodes=None, devices=None):
  """A mesh with a leading pipeline-stage axis: (`stage`, [`replica`,] `node`, `gpu`).

  Every stage holds `nodes` x `gpus_per_node` devices laid out as `make_mesh` lays out the
  whole cluster (expert parallelism over (`node`, `gpu`) inside a stage, and over `ep_nodes`
  nodes with a `replica` axis when `ep_nodes` < `nodes`). Stages are consecutive blocks of
  devices: device d = stage * nodes * gpus_per_node + node * gpus_per_node + gpu.

  Args:
    stages: pipeline stages (mesh.stages), >= 1.
    nodes, gpus_per_node, ep_nodes: per stage, as `make_mesh`.
    devices: optional explicit device list (default: the first stages * nodes * gpus_per_node).

  Raises:
    ValueError: a non-positive size, `ep_nodes` not dividing `nodes`, or axes that do not
      multiply to the available device count (naming mesh.stages, mesh.nodes,
      mesh.gpus_per_node).
  """
  import jax
  import numpy as np

  if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
    raise ValueError(f"mesh.stages must be a positive integer, got {stages!r}")
  devices = list(jax.devices() if devices is None else devices)
  for name, v in (("mesh.nodes", nodes), ("mesh.gpus_per_node", gpus_per_node)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  per_stage = nodes * gpus_per_node
  if stages * per_stage > len(devices):
    raise ValueError(
        f"mesh.stages x mesh.nodes x mesh.gpus_per_node = {stages} x {nodes} x {gpus_per_node} "
        f"= {stages * per_stage} devices, but jax has {len(devices)}; set "
        f"XLA_FLAGS={_FLAG}={stages * per_stage} before importing jax")
  inner = [make_mesh(nodes, gpus_per_node, ep_nodes, devices[s * per_stage:(s + 1) * per_stage])
           for s in range(stages)]
  grid = np.stack([m.devices for m in inner])
  return jax.sharding.Mesh(grid, (STAGE_AXIS,) + tuple(inner[0].axis_names))
