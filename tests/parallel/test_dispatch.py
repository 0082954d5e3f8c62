"""Expert parallelism on emulated meshes: both schedules equal the single-device dense
reference (values and gradients), drops and link byte counts equal hand-computed values, and
parameters / activations carry the intended shardings."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.analysis.routing import link_copies
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.experts import bind_experts
from dsv3_jax.model.moe import DeepSeekMoE
from dsv3_jax.parallel import dispatch
from dsv3_jax.parallel.mesh import make_mesh, shard_model
from moe_reference import moe_dense_reference

AXES = ("node", "gpu")


def _setup(nodes, gpus, t_local, e_per_dev, k, d=16, f=8, seed=0):
  n_dev = nodes * gpus
  e = n_dev * e_per_dev
  rng = np.random.default_rng(seed)
  t = n_dev * t_local
  x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
  w = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  wg = jax.random.normal(ks[0], (e, d, f)) * 0.3
  wu = jax.random.normal(ks[1], (e, d, f)) * 0.3
  wd = jax.random.normal(ks[2], (e, f, d)) * 0.3
  return x, idx, w, wg, wu, wd


def _ep_fn(mesh, sched, topo, capacity, e):
  tok = P(AXES)

  def run(x, idx, w, valid, wg, wu, wd):
    return sched(x, idx, w, valid, bind_experts(wg, wu, wd), capacity=capacity, topo=topo,
                 n_experts=e)

  stats_spec = dispatch.DispatchStats(*([P()] * len(dispatch.DispatchStats._fields)))
  return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(tok,) * 7, out_specs=(tok, stats_spec)))


# (1, N) is one node of N GPUs, (N, 1) N nodes of one GPU: a size-1 axis must still be reduced
# over, or shard_map's output check rejects the statistics.
@pytest.mark.parametrize("nodes,gpus", [(2, 4), (4, 8), (1, 2), (1, 8), (2, 1), (4, 1)])
@pytest.mark.parametrize("schedule", ["flat", "two_hop"])
def test_expert_parallel_equals_dense_reference(nodes, gpus, schedule):
  t_local, e_per_dev, k = 6, 2, 3
  x, idx, w, wg, wu, wd = _setup(nodes, gpus, t_local, e_per_dev, k)
  mesh = make_mesh(nodes, gpus)
  topo = dispatch.EPTopology(nodes, gpus)
  sched = dispatch.get_schedule(schedule)
  e = wg.shape[0]
  cap = sched.worst_case_capacity(t_local, e, k, topo, nodes)
  fn = _ep_fn(mesh, sched, topo, cap, e)
  valid = jnp.ones(x.shape[0], bool)

  # Values, statistics and gradients from one compiled program each (EP and reference).
  def loss_ep(x, w, wg, wu, wd):
    y, st = fn(x, idx, w, valid, wg, wu, wd)
    return jnp.sum(jnp.sin(y)), (y, st)

  def loss_ref(x, w, wg, wu, wd):
    y = moe_dense_reference(x, idx, w, wg, wu, wd)
    return jnp.sum(jnp.sin(y)), y

  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))
  g_ep, (y, st) = grad(loss_ep)(x, w, wg, wu, wd)
  g_ref, ref = grad(loss_ref)(x, w, wg, wu, wd)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert float(st.dropped) == 0.0
  np.testing.assert_array_equal(np.asarray(st.expert_counts),
                                np.bincount(np.asarray(idx).ravel(), minlength=e))
  for a, b in zip(g_ep, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_flat_drops_count_matches_hand_computation():
  nodes, gpus, t_local, k = 2, 4, 8, 2
  x, idx, w, wg, wu, wd = _setup(nodes, gpus, t_local, 1, k, seed=3)
  n_dev = nodes * gpus
  idx = jnp.asarray(np.asarray(idx) % 3, jnp.int32)  # everything on devices 0..2: overload
  idx = jnp.where(idx[:, :1] == idx[:, 1:], jnp.stack([idx[:, 0], (idx[:, 0] + 1) % 3], 1), idx)
  cap = (3,)
  topo = dispatch.EPTopology(nodes, gpus)
  fn = _ep_fn(make_mesh(nodes, gpus), dispatch.FlatSchedule(), topo, cap, n_dev)
  y, st = fn(x, idx, w, jnp.ones(x.shape[0], bool), wg, wu, wd)
  per_src_dest = np.zeros((n_dev, n_dev), int)
  for tok, row in enumerate(np.asarray(idx)):
    for ex in row:
      per_src_dest[tok // t_local, ex] += 1
  assert float(st.dropped) == np.maximum(per_src_dest - cap[0], 0).sum() > 0
  assert int(st.needed_capacity[0]) == per_src_dest.max()


def test_two_hop_sends_one_inter_node_copy_per_destination_node():
  # 2 nodes x 4 GPUs, 1 expert per GPU. Token 0 (on device 0, node 0) picks experts 4, 5, 6,
  # all on node 1; every other token picks experts on its own GPU's node only.
  nodes, gpus, t_local, k = 2, 4, 2, 3
  n_dev = nodes * gpus
  x, _, w, wg, wu, wd = _setup(nodes, gpus, t_local, 1, k, seed=1)
  rows = []
  for tok in range(n_dev * t_local):
    dev = tok // t_local
    base = (dev // gpus) * gpus
    rows.append([4, 5, 6] if tok == 0 else [base, base + 1, base + 2])
  idx = jnp.asarray(rows, jnp.int32)
  topo = dispatch.EPTopology(nodes, gpus)
  valid = jnp.ones(x.shape[0], bool)
  ref = moe_dense_reference(x, idx, w, wg, wu, wd)
  copies = {}
  for name in ("flat", "two_hop"):
    sched = dispatch.get_schedule(name)
    cap = sched.worst_case_capacity(t_local, n_dev, k, topo, nodes)
    y, st = _ep_fn(make_mesh(nodes, gpus), sched, topo, cap, n_dev)(x, idx, w, valid, wg, wu,
                                                                    wd)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    copies[name] = (float(st.rows_inter_node), float(st.rows_intra_node))
  assert copies["flat"][0] == 3  # one copy per (token, expert) across the node boundary
  assert copies["two_hop"][0] == 1  # one copy per (token, destination node)
  # Intra-node copies: flat sends every same-node pair to another GPU except the local one;
  # two-hop also fans token 0 out from GPU 4 (its hop-1 landing GPU) to GPUs 5 and 6.
  same_node_pairs_off_gpu = sum(
      sum(1 for ex in r if ex // gpus == (i // t_local) // gpus and ex != i // t_local)
      for i, r in enumerate(rows) if i != 0)
  assert copies["flat"][1] == same_node_pairs_off_gpu
  assert copies["two_hop"][1] == same_node_pairs_off_gpu + 2


SMALL = ModelConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=16, n_group=2,
                    topk_group=1, num_experts_per_tok=3, num_attention_heads=2,
                    qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, kv_lora_rank=8,
                    q_lora_rank=8, intermediate_size=16)


@pytest.mark.parametrize("schedule", ["flat", "two_hop"])
def test_moe_layer_on_mesh_equals_unsharded_layer_and_is_sharded(schedule):
  cfg = SMALL.replace(dispatch=schedule)
  mesh = make_mesh(2, 4)
  ep = DeepSeekMoE(cfg, mesh=mesh, rngs=nnx.Rngs(0))
  local = DeepSeekMoE(cfg, rngs=nnx.Rngs(0))
  nnx.update(local, nnx.state(ep))
  shard_model(ep, mesh)
  want = NamedSharding(mesh, P(AXES, None, None))
  for p in (ep.experts.gate_proj, ep.experts.up_proj, ep.experts.down_proj):
    assert p[...].sharding.is_equivalent_to(want, 3)
    chex.assert_shape(p[...].addressable_shards[0].data, (2,) + p[...].shape[1:])
  assert ep.gate.kernel[...].sharding.is_fully_replicated

  x = jax.random.normal(jax.random.PRNGKey(7), (8, 4, 16))
  xs = jax.device_put(x, NamedSharding(mesh, P(AXES)))
  y_ep, st = nnx.jit(lambda m, x: m(x, None, m.worst_case_capacity(32)))(ep, xs)
  y_local, _ = local(x)
  np.testing.assert_allclose(y_ep, y_local, rtol=1e-5, atol=1e-5)
  assert y_ep.sharding.is_equivalent_to(NamedSharding(mesh, P(AXES)), 3)
  chex.assert_shape(y_ep.addressable_shards[0].data, (1, 4, 16))
  assert float(st.dispatch.dropped) == 0


# Both schedules on each of these meshes are checked (values and gradients) at the dispatch
# level above; here the layer's own shard_map (where the size-1 axis bug showed): each axis of
# size one once, with each schedule once.
@pytest.mark.parametrize("nodes,gpus,schedule", [(1, 8, "two_hop"), (4, 1, "flat")])
def test_moe_layer_on_a_mesh_with_a_size_one_axis_equals_unsharded_layer(nodes, gpus, schedule):
  cfg = SMALL.replace(dispatch=schedule, n_group=max(nodes, 2), topk_group=1)
  mesh = make_mesh(nodes, gpus)
  ep = DeepSeekMoE(cfg, mesh=mesh, rngs=nnx.Rngs(0))
  local = DeepSeekMoE(cfg, rngs=nnx.Rngs(0))
  nnx.update(local, nnx.state(ep))
  shard_model(ep, mesh)
  x = jax.random.normal(jax.random.PRNGKey(7), (8, 4, 16))
  xs = jax.device_put(x, NamedSharding(mesh, P(AXES)))
  def loss(m, x):  # outputs, statistics and gradients from one compiled program per layer
    y, st = m(x, None, m.worst_case_capacity(32))
    return jnp.sum(jnp.sin(y)), (y, st)

  grad = nnx.jit(nnx.grad(loss, has_aux=True))
  g_ep, (y_ep, st) = grad(ep, xs)
  g_local, (y_local, st_local) = grad(local, x)
  np.testing.assert_allclose(y_ep, y_local, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(st.dispatch.expert_counts),
                                np.asarray(st_local.dispatch.expert_counts))
  assert float(st.dispatch.dropped) == 0
  for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_local)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_node_limited_rule_is_checked_when_the_layer_is_built_on_a_mesh():
  with pytest.raises(ValueError, match="model.n_group=2 must equal the 4 nodes"):
    DeepSeekMoE(SMALL.replace(n_group=2), mesh=make_mesh(4, 1), rngs=nnx.Rngs(0))


def test_bad_expert_parallel_size_is_refused():
  with pytest.raises(ValueError, match="n_routed_experts=12 is not divisible"):
    DeepSeekMoE(SMALL.replace(n_routed_experts=12, n_group=2), mesh=make_mesh(2, 4),
                rngs=nnx.Rngs(0))


def test_link_copies_counting_rule_matches_the_running_schedules():
  nodes, gpus, t_local, k = 2, 4, 6, 3
  x, idx, w, wg, wu, wd = _setup(nodes, gpus, t_local, 2, k, seed=5)
  n_dev, e = nodes * gpus, wg.shape[0]
  topo = dispatch.EPTopology(nodes, gpus)
  src_node = np.repeat(np.arange(n_dev) // gpus, t_local)
  c = link_copies(np.asarray(idx), src_node, e // nodes)
  valid = jnp.ones(x.shape[0], bool)
  for name, key in (("flat", "flat_inter"), ("two_hop", "two_hop_inter")):
    sched = dispatch.get_schedule(name)
    cap = sched.worst_case_capacity(t_local, e, k, topo, nodes)
    _, st = _ep_fn(make_mesh(nodes, gpus), sched, topo, cap, e)(x, idx, w, valid, wg, wu, wd)
    assert float(st.rows_inter_node) == c[key].sum()
  assert np.all(c["two_hop_inter"] <= c["flat_inter"])
  assert np.all(c["nodes_reached"] <= nodes)


@pytest.mark.parametrize("payload", ["fp8", "bf16"])
def test_dispatch_payload_codec_runs_and_reports_wire_bytes(payload):
  from dsv3_jax.quant.codec import codec_from_name
  codec = codec_from_name(payload)
  assert dispatch.payload_bytes_per_row(codec, 256, jnp.float32) == codec.bytes_per_row(256)
  assert dispatch.payload_bytes_per_row(None, 256, jnp.float32) == 1024
  nodes, gpus, t_local, k = 2, 4, 4, 2
  x, idx, w, wg, wu, wd = _setup(nodes, gpus, t_local, 1, k, d=128, seed=2)
  topo = dispatch.EPTopology(nodes, gpus)
  sched = dispatch.get_schedule("two_hop", dispatch_codec=codec)
  cap = sched.worst_case_capacity(t_local, wg.shape[0], k, topo, nodes)
  y, _ = _ep_fn(make_mesh(nodes, gpus), sched, topo, cap, wg.shape[0])(
      x, idx, w, jnp.ones(x.shape[0], bool), wg, wu, wd)
  ref = moe_dense_reference(codec.qdq(x), idx, w, wg, wu, wd)  # payload quantized once
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", ["flat", "two_hop"])
def test_expert_parallel_groups_over_a_subset_of_nodes(schedule):
  # 4 nodes x 2 GPUs, EP groups of 2 nodes (EP4), data parallel over the 2 groups.
  cfg = SMALL.replace(dispatch=schedule, n_routed_experts=8, n_group=2, topk_group=1,
                      num_experts_per_tok=2)
  mesh = make_mesh(4, 2, ep_nodes=2)
  assert dict(mesh.shape) == {"replica": 2, "node": 2, "gpu": 2}
  ep = DeepSeekMoE(cfg, mesh=mesh, rngs=nnx.Rngs(1))
  local = DeepSeekMoE(cfg, rngs=nnx.Rngs(1))
  nnx.update(local, nnx.state(ep))
  shard_model(ep, mesh)
  # Experts: sharded over (node, gpu) inside a group, replicated across groups.
  assert ep.experts.gate_proj[...].sharding.spec == P(AXES, None, None)
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 4, 16))
  xs = jax.device_put(x, NamedSharding(mesh, P(("replica",) + AXES)))
  y, st = nnx.jit(lambda m, x: m(x, None, m.worst_case_capacity(32)))(ep, xs)
  y_local, st_local = local(x)
  np.testing.assert_allclose(y, y_local, rtol=1e-5, atol=1e-5)
  # Loads are summed over both groups (what the bias update needs).
  np.testing.assert_array_equal(np.asarray(st.dispatch.expert_counts),
                                np.asarray(st_local.dispatch.expert_counts))


def test_ep_nodes_must_divide_the_nodes():
  with pytest.raises(ValueError, match="mesh.ep_nodes=3 must be a positive divisor of "
                                       "mesh.nodes=4"):
    make_mesh(4, 2, ep_nodes=3)
