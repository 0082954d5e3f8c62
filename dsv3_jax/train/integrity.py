"""Integrity of the train state: finiteness, content checksums, and replica agreement (SDC).

* `nonfinite_leaves`: the leaves holding a NaN / inf (a checkpoint is never written with one).
* `leaf_checksums`: per leaf, shape, dtype and a BLAKE2b digest of its bytes (C order), written
  with every checkpoint (`checkpoint.Checkpointer`) and compared on restore, so that a flipped
  byte in a checkpoint file is found instead of trained on.
* `replica_checksums` / `check_replicas`: silent data corruption detection (Insights into
  DeepSeek-V3, arXiv 2505.09343, §6 "SDC detection"): a replicated array must be bit-identical
  on every device that holds a copy. Each device reduces its own copy of every leaf to a 32-bit
  checksum (the wrapping uint32 sum of the leaf's 32-bit words, plus a position-weighted sum; any
  single flipped bit changes the first); devices that hold the same index of a leaf are compared
  on the host and a disagreement names the leaf and the device(s) that differ from the majority.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def leaf_name(path) -> str:
  """'params/layers/0/mlp/down_proj/kernel' for a jax key path (nnx's `.value` dropped)."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        v = getattr(k, attr)
        break
    else:
      v = str(k)
    if v != "value":
      parts.append(str(v))
  return "/".join(parts)


def named_leaves(tree) -> list[tuple[str, Any]]:
  """[(leaf_name, leaf)] in flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(leaf_name(p), x) for p, x in flat]


@jax.jit
def _finite_flags(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                    else jnp.bool_(True) for x in leaves]) if leaves else jnp.ones((0,), bool)


def nonfinite_leaves(tree) -> list[str]:
  """Names of the leaves of `tree` (arrays) that hold a NaN or an infinity."""
  named = named_leaves(tree)
  flags = _host(_finite_flags([x for _, x in named]))
  return [n for (n, _), ok in zip(named, flags) if not ok]


def _host(x) -> np.ndarray:
  """The whole value of `x` on this host, C-contiguous.

  A jax.Array that spans other processes' devices (a multi-process run's expert weights) is
  gathered first (`multihost_utils.process_allgather`, tiled: a collective over the array's
  own devices, so every process calls this for the same leaves in the same order); a
  replicated or process-local one is read as it is. Every process therefore sees the same
  bytes, and a digest of them equals the single-process one."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils

    a = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  else:
    a = np.asarray(jax.device_get(x))
  return a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def digest(a: np.ndarray) -> str:
  """Hex BLAKE2b-128 of an array's bytes (C order)."""
  a = np.asarray(a)
  return hashlib.blake2b((a if a.flags.c_contiguous else a.copy(order="C")).tobytes(),
                         digest_size=16).hexdigest()


def leaf_checksums(tree) -> dict[str, dict]:
  """{leaf name: {"shape": [...], "dtype": str, "blake2b": hex}} for every leaf of `tree`.

  Copies every leaf to the host (`_host`: in a multi-process run a leaf sharded over several
  processes is gathered, so every process computes the same digests, equal to those of a
  single-process run of the same state; the cost is one all-gather of the sharded leaves)."""
  out = {}
  for name, x in named_leaves(tree):
    a = _host(x)
    out[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "blake2b": digest(a)}
  return out


def compare_checksums(stored: dict, tree) -> tuple[list[str], list[str]]:
  """(structure mismatches, content mismatches) between stored `leaf_checksums` and `tree`.

  A structure mismatch (a leaf missing on either side, another shape or dtype) means the
  checkpoint belongs to another model; a content mismatch means its bytes changed after they
  were written.
  """
  named = dict(named_leaves(tree))
  structure = sorted(set(stored) ^ set(named))
  content = []
  for name, want in stored.items():
    if name not in named:
      continue
    a = _host(named[name])
    if list(a.shape) != list(want["shape"]) or str(a.dtype) != want["dtype"]:
      structure.append(f"{name}: stored {want['dtype']}{want['shape']}, "
                       f"restored {a.dtype}{list(a.shape)}")
    elif digest(a) != want["blake2b"]:
      content.append(name)
  return structure, content


# ----------------------------------------------------------------------------- SDC


def _words(x: jax.Array) -> jax.Array:
  """The leaf's bits as a flat uint32 vector (16-bit and 8-bit types widened, 64-bit split)."""
  x = x.reshape(-1)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if size == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # 8 bytes -> [n, 2]


def _checksum(x: jax.Array) -> jax.Array:
  """[2] uint32: wrapping sum of the words and the sum of word * (index + 1)."""
  w = _words(x)
  i = jnp.arange(1, w.shape[0] + 1, dtype=jnp.uint32)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * i, dtype=jnp.uint32)])


class ReplicaChecker:
  """Per-device checksums of every leaf of a state pytree on a mesh, compared across replicas.

  Built once per state structure (one jitted `shard_map` program: each device reduces its own
  shard of every leaf, no communication); `check(tree)` runs it and compares on the host.
  """

  def __init__(self, tree, mesh):
    from jax.sharding import NamedSharding, PartitionSpec as P

    self.mesh = mesh
    named = named_leaves(tree)
    self.names = [n for n, _ in named]
    axes = tuple(mesh.axis_names)
    self.devices = list(mesh.devices.reshape(-1))
    specs = [x.sharding.spec if isinstance(x.sharding, NamedSharding) else P()
             for _, x in named]

    def per_device(*leaves):
      sums = jnp.stack([_checksum(x) for x in leaves])  # [n_leaves, 2]
      return sums[None]  # [1 (this device), n_leaves, 2]

    fn = jax.shard_map(per_device, mesh=mesh, in_specs=tuple(specs),
                       out_specs=P(axes), check_vma=False)
    self._fn = jax.jit(fn)
    # For each leaf, the groups of mesh positions (flat device order) holding the same shard.
    self.groups = []
    for _, x in named:
      idx = x.sharding.devices_indices_map(x.shape)
      by_index: dict = {}
      for pos, d in enumerate(self.devices):
        key = tuple((s.start, s.stop) for s in idx[d]) if d in idx else ()
        by_index.setdefault(key, []).append(pos)
      self.groups.append([g for g in by_index.values() if len(g) > 1])

  def sums(self, tree) -> np.ndarray:
    """[devices, leaves, 2] uint32 checksums, devices in mesh order (mesh.devices flattened).

    In a multi-process run the per-device rows are gathered onto every process (a [devices,
    leaves, 2] all-gather), so every process compares all of them and stops alike."""
    leaves = [x for _, x in named_leaves(tree)]
    return _host(self._fn(*leaves))

  def check(self, tree) -> list[tuple[str, list]]:
    """[(leaf name, [devices whose copy differs from the majority of its replicas, or every
    replica of the group when there is no majority])]; empty when every replica agrees."""
    sums = self.sums(tree)
    bad = []
    for li, groups in enumerate(self.groups):
      for g in groups:
        rows = [tuple(sums[pos, li]) for pos in g]
        values, counts = np.unique(np.array(rows), axis=0, return_counts=True)
        if len(values) == 1:
          continue
        if 2 * counts.max() <= len(g):  # no majority (e.g. two replicas): name them all
          odd = [self.devices[pos] for pos in g]
        else:
          majority = tuple(values[np.argmax(counts)])
          odd = [self.devices[pos] for pos, r in zip(g, rows) if r != majority]
        bad.append((self.names[li], odd))
    return bad


def describe_mismatch(bad: list[tuple[str, list]], limit: int = 5) -> str:
  """One line per mismatching leaf: '<leaf> on device <id> (process p)'."""
  lines = []
  for name, devices in bad[:limit]:
    ds = ", ".join(f"device {d.id}" + (f" (process {d.process_index})"
                                        if jax.process_count() > 1 else "") for d in devices)
    lines.append(f"{name} differs on {ds}")
  if len(bad) > limit:
    lines.append(f"... and {len(bad) - limit} more leaves")
  return "; ".join(lines)


def flip_bit(x: jax.Array, device_pos: int, flat_index: int = 0, bit: int = 0,
             devices: Optional[list] = None) -> jax.Array:
  """`x` with one bit flipped in the copy held by one device (for testing SDC detection).

  Args:
    x: a jax.Array (any sharding, 4-byte dtype).
    device_pos: which of `devices` (default `x.sharding`'s device order) gets the flip.
    flat_index, bit: the element of that device's shard (C order) and the bit to flip.
  """
  shards = list(x.addressable_shards)
  devices = devices or [s.device for s in shards]
  target = devices[device_pos]
  bufs = []
  for s in shards:
    if s.device == target:
      a = np.array(s.data).copy()
      w = a.reshape(-1).view(np.uint32)
      w[flat_index] ^= np.uint32(1 << bit)
      bufs.append(jax.device_put(a, s.device))
    else:
      bufs.append(s.data)
  return jax.make_array_from_single_device_arrays(x.shape, x.sharding, bufs)
