"""The all_gather stage transfer (groups of the stage axis only) against ppermute, on the
primitives the executor moves every message with: the neighbour exchange of each slot and the
shift of DualPipe's mirrored parameters and gradients. Equal bit for bit (the same values are
selected), on a (stage, node, gpu) = (4, 2, 2) mesh; a whole DualPipe step with the all_gather
transfer is checked against the unpipelined step in test_pipeline.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax.parallel import pipeline
from dsv3_jax.parallel.mesh import STAGE_AXIS, make_pipeline_mesh

PP = 4


def _per_device_tree(mesh):
  """A float [2, 3] and an int32 [] leaf per device, distinct on every device."""
  rng = np.random.default_rng(0)
  n = mesh.size
  return (jnp.asarray(rng.normal(size=(n, 2, 3)), jnp.float32),
          jnp.asarray(rng.integers(1, 1000, size=(n,)), jnp.int32))


def _run(fn, mesh, tree):
  """fn on every device's own slice of `tree` (leading axis = device), under shard_map."""
  spec = P(tuple(mesh.axis_names))
  per_device = lambda t: jax.tree.map(lambda x: x[None], fn(jax.tree.map(lambda x: x[0], t)))
  return jax.device_get(jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec,),
                                              out_specs=spec))(tree))


def _by_rank(x, mesh):
  """[devices, ...] -> [stage, node * gpu, ...] (devices are stage-major)."""
  return x.reshape(mesh.shape[STAGE_AXIS], -1, *x.shape[1:])


@pytest.fixture(scope="module")
def mesh():
  return make_pipeline_mesh(PP, 2, 2)


def test_neighbour_exchange_all_gather_equals_ppermute(mesh):
  tree = _per_device_tree(mesh)
  got = {t: _run(lambda x, t=t: pipeline.exchange_neighbours(x, STAGE_AXIS, t), mesh, tree)
         for t in pipeline.TRANSFERS}
  for a, b in zip(jax.tree.leaves(got["ppermute"]), jax.tree.leaves(got["all_gather"])):
    np.testing.assert_array_equal(a, b)
  # and the values are the neighbours' (zeros past either end), checked by hand
  (below, above) = got["all_gather"]
  src = _by_rank(np.asarray(tree[0]), mesh)
  b, a = _by_rank(below[0], mesh), _by_rank(above[0], mesh)
  np.testing.assert_array_equal(b[1:], src[:-1])
  np.testing.assert_array_equal(a[:-1], src[1:])
  assert not b[0].any() and not a[-1].any()


@pytest.mark.parametrize("perm", [
    [(s, PP - 1 - s) for s in range(PP)],  # DualPipe's mirror (parameters, gradients back)
    [(0, 2), (1, 3)],  # a partial permutation: ranks 0 and 1 receive zeros
])
def test_shift_all_gather_equals_ppermute(mesh, perm):
  tree = _per_device_tree(mesh)
  got = {t: _run(lambda x, t=t: pipeline._shift(x, perm, STAGE_AXIS, t), mesh, tree)
         for t in pipeline.TRANSFERS}
  for a, b in zip(jax.tree.leaves(got["ppermute"]), jax.tree.leaves(got["all_gather"])):
    np.testing.assert_array_equal(a, b)
  src, out = _by_rank(np.asarray(tree[0]), mesh), _by_rank(got["all_gather"][0], mesh)
  receivers = {d: s for s, d in perm}
  for r in range(PP):
    np.testing.assert_array_equal(out[r], src[receivers[r]] if r in receivers else 0 * src[r])
