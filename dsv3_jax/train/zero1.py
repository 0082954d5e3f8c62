"""ZeRO-1: the optimizer state partitioned over the devices that hold the same parameters.

ZeRO stage 1 (Rajbhandari et al., arXiv 1910.02054, §5.1, "P_os") is the data parallelism
DeepSeek-V3 trains with (V3 report §3.2, "ZeRO-1 data parallelism"): every data-parallel
replica keeps the whole parameters, but each keeps only a 1 / N_d slice of the optimizer state.
One step then (i) reduce-scatters the gradients, so that each device receives the sum of its
slice only, (ii) updates its slice of the parameters with its slice of the state (Adam is
elementwise), (iii) all-gathers the updated slices back into whole parameters.

Which devices hold the same parameters depends on the leaf (`leaf_plan`): a dense parameter
(attention, dense MLP, embeddings, norms, router, shared experts) is replicated over every mesh
axis; a routed expert weight is sharded over the expert-parallel axes (`node`, `gpu`) and
replicated only over `replica` (EP groups over a subset of nodes, `parallel.mesh.make_mesh`),
so its state is partitioned over the replicas; with one EP group over the whole mesh it is not
replicated and nothing changes. The state is split on one dimension, over the longest run of the
parameter's replicated axes, minor axis first (`gpu`, then `node`, then `replica`), whose size
product divides that dimension; the remaining replicated axes keep copies of the slice (their
gradients are summed, not scattered). On configs/orion_4x8.py every dense leaf divides by 32.

The reduce-scatter / all-gather follow the step's gradient sum (`train.step.GRAD_SUMS`):
"mesh" scatters over all the leaf's axes in one collective and leaves the gather and the sliced
update to GSPMD; "per_axis" runs everything inside the step's `shard_map`, one mesh axis at a
time: reduce-scatter over `gpu` (NVLink: the inter-node hop then carries 1 / gpus of the
bytes), then over `node`, then `replica`; all-gather in the reverse order. No collective of the
ZeRO-1 step spans more than one mesh axis, as in the replicated per_axis step.

The parameters are the float32 master weights (the model computes in `model.dtype` from them;
configs/orion_4x8_fp8.py), so there is no separate master copy: the partitioned state is Adam's
first and second moments (2 x 4 bytes per parameter); the step counts stay replicated.

Silent data corruption: with ZeRO-1 every replica's parameters are overwritten each step by
the slices other devices updated, and each moment has one copy only, so the replica comparison
of `train/integrity.py` no longer sees a flipped bit in a parameter copy or a moment
(configs/tiny.py, `train.shard_optimizer_state`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def _entry_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


@dataclasses.dataclass(frozen=True)
class Zero1Leaf:
  """How ZeRO-1 places the optimizer state of one parameter (a pytree leaf: not registered).

  Attributes:
    spec: the parameter's PartitionSpec (e.g. P() for a dense weight, P(('node', 'gpu'))
      for routed experts).
    ndim: the parameter's rank.
    dim: the dimension its state is split on; None: not partitioned.
    axes: the mesh axes the state is partitioned over, minor first (the reduce-scatter order).
    sizes: the sizes of `axes`.
    rest: the axes the parameter is replicated over that do not partition it (its gradient is
      summed over them after the reduce-scatter; the state slice has a copy on each).
  """

  spec: P
  ndim: int
  dim: Optional[int]
  axes: tuple[str, ...]
  sizes: tuple[int, ...]
  rest: tuple[str, ...]

  @property
  def ways(self) -> int:
    """Into how many slices the state is partitioned (1: not partitioned)."""
    return math.prod(self.sizes)

  @property
  def replicated_over(self) -> tuple[str, ...]:
    """Every axis the parameter is replicated over, minor first."""
    return self.axes + self.rest

  @property
  def state_spec(self) -> P:
    """The PartitionSpec of the state: the parameter's, with `axes` appended (as minor
    factors) to the entry of `dim`. Under shard_map, a tiled reduce-scatter over `axes[0]`,
    then `axes[1]`, ... leaves each device exactly this block."""
    if self.dim is None:
      return self.spec
    entries = list(self.spec) + [None] * (self.ndim - len(self.spec))
    entries[self.dim] = _entry_axes(entries[self.dim]) + self.axes
    while entries and entries[-1] is None:
      entries.pop()
    return P(*entries)


def leaf_plan(shape, spec: P, mesh) -> Zero1Leaf:
  """The ZeRO-1 placement of a parameter (or of a state leaf shaped and placed like it).

  Args:
    shape: the parameter's global shape.
    spec: its PartitionSpec on `mesh` (axes it is sharded over).
    mesh: the jax Mesh (or abstract mesh).

  Returns:
    A `Zero1Leaf`: partitioned over the longest minor-first run of the replicated axes whose
    size product divides a dimension of the parameter's local block (the first such
    dimension); scalars and leaves no run divides are not partitioned.
  """
  names = tuple(mesh.axis_names)
  held = set()
  for entry in spec:
    held.update(_entry_axes(entry))
  replicated = tuple(a for a in reversed(names) if a not in held)
  ndim = len(shape)
  local = list(shape)
  for d, entry in enumerate(list(spec)[:ndim]):
    local[d] //= math.prod(mesh.shape[a] for a in _entry_axes(entry))
  for k in range(len(replicated), 0, -1):
    axes = replicated[:k]
    sizes = tuple(mesh.shape[a] for a in axes)
    ways = math.prod(sizes)
    if ways == 1:
      break
    for d, n in enumerate(local):
      if n % ways == 0:
        return Zero1Leaf(spec, ndim, d, axes, sizes, replicated[k:])
  return Zero1Leaf(spec, ndim, None, (), (), replicated)


def plans(params, param_shardings, mesh):
  """`leaf_plan` of every parameter: a pytree like `params` of `Zero1Leaf`.

  Args:
    params: pytree of arrays / ShapeDtypeStructs (global shapes).
    param_shardings: matching pytree of NamedSharding.
  """
  return jax.tree.map(lambda x, sh: leaf_plan(x.shape, sh.spec, mesh), params, param_shardings)


def optimizer_state_shardings(opt_state, mesh, *, shard_replicated: bool = True):
  """NamedShardings on `mesh` for an optimizer state whose leaves are placed like the
  parameters (`optimizer.init(params)` of a model sharded with `parallel.mesh.shard_model`:
  Adam's moments inherit each parameter's sharding).

  With `shard_replicated` (ZeRO-1), every leaf of rank >= 1 gets `leaf_plan(...).state_spec`
  of its own shape and sharding, which is its parameter's plan (a moment has its parameter's
  shape and placement): partitioned over the devices holding the same parameter. Scalars (the
  step counts) are replicated. Without, leaves keep their sharding (replicated when they are
  not on a NamedSharding of `mesh`, e.g. the count on one device).

  Every rank >= 1 leaf must be parameter-shaped (true of optax's AdamW chain: mu, nu): the
  ZeRO-1 step hands each device its slice of them.

  Args:
    opt_state: pytree of jax.Arrays.
    mesh: the jax Mesh.
    shard_replicated: ZeRO-1 on (True) or off.

  Returns:
    A pytree of NamedSharding matching `opt_state`.
  """
  replicated = NamedSharding(mesh, P())

  def leaf(x):
    sh = getattr(x, "sharding", None)
    spec = sh.spec if isinstance(sh, NamedSharding) and sh.mesh == mesh else P()
    if shard_replicated and x.ndim >= 1:
      return NamedSharding(mesh, leaf_plan(x.shape, spec, mesh).state_spec)
    return NamedSharding(mesh, spec) if spec != P() else replicated

  return jax.tree.map(leaf, opt_state)


def bytes_per_device(tree) -> dict:
  """{device: bytes of the shards of `tree`'s arrays that device holds}, measured from the
  arrays (this process's devices; `analysis.memory.optimizer_state_bytes_per_device` is the
  formula)."""
  out: dict = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


# ----------------------------------------------------------------------------- inside the step


def reduce_gradient(g: jax.Array, leaf: Zero1Leaf, per_axis: bool) -> jax.Array:
  """Inside `shard_map`: this device's gradient of a parameter (varying over the axes the
  parameter is replicated over) -> the whole-mesh sum of its state slice.

  per_axis: a tiled psum_scatter over each of `leaf.axes` in turn (minor first), then a psum
  over each of `leaf.rest`; otherwise one psum_scatter over all of `leaf.axes` and one psum
  over `leaf.rest`. The element order of the sums is that of `step._sum_axes` (minor first).

  Returns:
    [..., shape[dim] / (sharding x ways), ...] the leaf's dtype: varying over the state's
    axes, invariant over `leaf.rest`.
  """
  if leaf.dim is not None:
    if per_axis:
      for a in leaf.axes:
        g = jax.lax.psum_scatter(g, a, scatter_dimension=leaf.dim, tiled=True)
    else:
      g = jax.lax.psum_scatter(g, leaf.axes, scatter_dimension=leaf.dim, tiled=True)
  if leaf.rest:
    if per_axis:
      for a in leaf.rest:
        g = jax.lax.psum(g, a)
    else:
      g = jax.lax.psum(g, leaf.rest)
  return g


def local_slice(x: jax.Array, leaf: Zero1Leaf) -> jax.Array:
  """Inside `shard_map`: this device's state-sized slice of its block of a parameter (the
  block `reduce_gradient` leaves it; a dynamic slice, no communication)."""
  if leaf.dim is None:
    return x
  size, offset = x.shape[leaf.dim], 0
  for a, n in zip(leaf.axes, leaf.sizes):
    size //= n
    offset = offset + jax.lax.axis_index(a) * size
  return jax.lax.dynamic_slice_in_dim(x, offset, size, axis=leaf.dim)


def _all_gather_invariant():
  # Varying -> invariant all-gather (the gathered parameter is replicated, as the step's
  # out_specs say); jax.lax only exports the varying -> varying `all_gather` in this jax.
  fn = getattr(jax.lax, "all_gather_invariant", None)
  if fn is None:
    from jax._src.lax.parallel import all_gather_invariant as fn
  return fn


def gather(x: jax.Array, leaf: Zero1Leaf) -> jax.Array:
  """Inside `shard_map`: an updated slice -> the parameter's whole block, replicated over
  `leaf.axes` again (tiled all-gathers over the axes in reverse scatter order, one at a time)."""
  if leaf.dim is None:
    return x
  ag = _all_gather_invariant()
  for a in reversed(leaf.axes):
    x = ag(x, a, axis=leaf.dim, tiled=True)
  return x
