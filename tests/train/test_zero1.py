"""ZeRO-1 (dsv3_jax/train/zero1.py): the partitioned optimizer gives the replicated optimizer's
losses over 20 steps ("mesh" and "per_axis" gradient sums, with and without a replica axis),
its state bytes per device equal the formula of analysis/memory.py, its per_axis program
reduce-scatters and all-gathers one mesh axis at a time, and the setting's config contract
(bad value, resuming a run saved before the setting existed)."""

import functools
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tiny_run import tiny_cfg

from configs import tiny
from dsv3_jax.analysis import memory
from dsv3_jax.cluster import hlo
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel.mesh import make_mesh, shard_model
from dsv3_jax.train import resume, trainer, zero1
from dsv3_jax.train import step as step_lib

SEQ, STEPS, BATCH = 16, 20, 8
CAP = (24, 24)


def _config(nodes, ep_nodes):
  """tests/train/tiny_run.py's model (2 layers: one dense, one MoE; hidden 64, 8 experts; no MTP
  module, whose leaves are of the same kinds and would only lengthen the compile) with
  node-limited two_hop dispatch; 20 steps of AdamW with clipping at 1.0 (nothing is written)."""
  c = tiny_cfg(pathlib.Path("unused"))
  c.model.update(dict(n_group=ep_nodes or nodes, topk_group=1, dispatch="two_hop",
                      max_position_embeddings=32, num_nextn_predict_layers=0))
  c.data.seq_len = SEQ
  c.train.update(dict(steps=STEPS, warmup_steps=2, learning_rate=1e-2))
  return c


@functools.lru_cache(maxsize=None)
def _state(shape):
  """(config, model config, graphdef, optimizer, replicated state, mesh) on a mesh `shape` =
  (nodes, gpus, ep_nodes)."""
  nodes, gpus, ep_nodes = shape
  c = _config(nodes, ep_nodes)
  mc = ModelConfig.from_dict(c.model.to_dict())
  mesh = make_mesh(nodes, gpus, ep_nodes)
  model = Transformer(mc, mesh=mesh, rngs=nnx.Rngs(0))
  shard_model(model, mesh)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  opt = step_lib.make_optimizer(c.train)
  replicated = NamedSharding(mesh, P())
  opt_state = jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
      opt.init(params))
  return c, mc, graphdef, opt, (params, other, opt_state), mesh


def _placed(shape, on: bool):
  """The state with the optimizer state on its ZeRO-1 (`on`) or replicated shardings, and
  those shardings."""
  *_, (params, other, opt_state), mesh = _state(shape)
  opt_sh = zero1.optimizer_state_shardings(opt_state, mesh, shard_replicated=on)
  return (params, other, jax.jit(lambda s: s, out_shardings=opt_sh)(opt_state)), opt_sh


@functools.lru_cache(maxsize=None)
def _compiled(shape, grad_sum, on):
  c, mc, graphdef, opt, _, mesh = _state(shape)
  (params, other, opt_state), opt_sh = _placed(shape, on)
  sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  fns = step_lib.make_step_fns(graphdef, opt, mc, c.train, SEQ, mesh, sh(params), sh(other),
                               opt_sh, grad_sum=grad_sum, zero1=on)
  return fns.train_step.lower(params, other, opt_state, _windows(mesh)[0], CAP).compile()


@functools.lru_cache(maxsize=None)
def _windows(mesh):
  """[STEPS, B, SEQ + 2] int32: one fixed random batch every step (the model learns it, so
  the loss falls and the updates are not noise)."""
  w = jax.random.randint(jax.random.PRNGKey(1), (BATCH, SEQ + 2), 0, 256)
  sharding = NamedSharding(mesh, P(None, tuple(mesh.axis_names)))
  return jax.device_put(jax.numpy.broadcast_to(w, (STEPS,) + w.shape), sharding)


def _train(shape, grad_sum, on):
  """20 steps: per-step losses and gradient norms, the final parameters and optimizer state."""
  *_, mesh = _state(shape)
  step = _compiled(shape, grad_sum, on)
  state, _ = _placed(shape, on)
  p, o, s = state
  losses, norms = [], []
  windows = _windows(mesh)
  for i in range(STEPS):
    p, o, s, m = step(p, o, s, windows[i])
    losses.append(float(m["loss"]))
    norms.append(float(m["grad_norm"]))
  return np.array(losses), np.array(norms), jax.device_get((p, o, s))


CASES = [((2, 4, None), "mesh"), ((2, 4, None), "per_axis"), ((4, 2, 2), "per_axis")]


@pytest.mark.parametrize("shape,grad_sum", CASES,
                         ids=["node2_gpu4-mesh", "node2_gpu4-per_axis", "replica2-per_axis"])
def test_zero1_losses_over_20_steps_equal_the_replicated_optimizer(shape, grad_sum):
  ref_loss, ref_norm, (p0, o0, s0) = _train(shape, grad_sum, False)
  loss, norm, (p1, o1, s1) = _train(shape, grad_sum, True)
  print(f"max |loss diff| {np.max(np.abs(loss - ref_loss)):.3e}, bit-equal steps "
        f"{int(np.sum(loss == ref_loss))} of {STEPS}, max |grad norm diff| "
        f"{np.max(np.abs(norm - ref_norm)):.3e}")
  assert np.all(np.isfinite(loss)) and ref_loss[-1] < ref_loss[0] - 0.5  # it trains
  # Every element's Adam update is the same arithmetic; the gradient sums and the clipping
  # norm are summed in another order (slices, then over devices), a few ulps per step.
  np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-6)
  if grad_sum == "per_axis":
    # Measured bit-equal: each element's gradient is summed in the same order (gpu, then node,
    # then replica) by psum_scatter as by psum; only the clipping norm's order differs (its
    # last bit), and the clipped updates still round to the same losses.
    np.testing.assert_array_equal(loss, ref_loss)
  np.testing.assert_allclose(norm, ref_norm, rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, p0, p1)
  jax.tree.map(close, s0, s1)


def test_zero1_state_bytes_per_device_equal_the_formula():
  """Measured from the arrays on both meshes: the formula of analysis/memory.py, for the
  parameter split counted from the model (which equals `trained_parameter_split`)."""
  for shape in ((2, 4, None), (4, 2, 2)):
    c, mc, _, _, (params, _, _), mesh = _state(shape)
    # Routed experts are the parameters sharded over the EP axes (`shard_model`).
    routed = sum(x.size for x in jax.tree.leaves(params) if x.sharding.spec != P())
    total = sum(x.size for x in jax.tree.leaves(params))
    assert memory.trained_parameter_split(c.model.to_dict()) == (total - routed, routed)
    ep = (shape[2] or shape[0]) * shape[1]
    for on in (False, True):
      (_, _, opt_state), _ = _placed(shape, on)
      measured = set(zero1.bytes_per_device(opt_state).values())
      want = memory.optimizer_state_bytes_per_device(total - routed, routed, devices=mesh.size,
                                                     ep_size=ep, zero1=on)
      assert measured == {want}, (shape, on)
  off = memory.optimizer_state_bytes_per_device(1000, 800, devices=8, ep_size=4, zero1=False)
  on = memory.optimizer_state_bytes_per_device(1000, 800, devices=8, ep_size=4, zero1=True)
  assert (off, on) == (8 * (1000 + 200) + 8, 8 * 1800 // 8 + 8)  # by hand
  with pytest.raises(ValueError, match="ep_size=3 must divide devices=8"):
    memory.optimizer_state_bytes_per_device(1000, 800, devices=8, ep_size=3, zero1=True)


def test_leaf_plans_follow_the_replicated_axes():
  mesh = jax.sharding.AbstractMesh((2, 2, 4), ("replica", "node", "gpu"))
  dense = zero1.leaf_plan((64, 32), P(), mesh)
  assert (dense.dim, dense.axes, dense.rest) == (0, ("gpu", "node", "replica"), ())
  assert dense.state_spec == P(("gpu", "node", "replica"))
  expert = zero1.leaf_plan((8, 32, 16), P(("node", "gpu")), mesh)  # 1 expert per device
  assert (expert.dim, expert.axes, expert.state_spec) == (1, ("replica",),
                                                          P(("node", "gpu"), "replica"))
  odd = zero1.leaf_plan((12,), P(), mesh)  # 16 and 8 do not divide 12, 4 does
  assert (odd.dim, odd.axes, odd.rest, odd.ways) == (0, ("gpu",), ("node", "replica"), 4)
  assert zero1.leaf_plan((3,), P(), mesh).dim is None


def test_per_axis_zero1_program_scatters_and_gathers_one_axis_at_a_time():
  """The per_axis ZeRO-1 program on (node 2, gpu 4): reduce-scatters and all-gathers over
  `gpu` (4) and `node` (2), no collective wider than one axis, and the all-reduces left carry
  only the metrics and statistics (less than 1 % of the replicated program's all-reduce bytes);
  the mesh ZeRO-1 program scatters over all 8 devices at once."""
  by_kind = {}
  for grad_sum, on in (("per_axis", True), ("per_axis", False), ("mesh", True)):
    colls = hlo.parse_hlo(_compiled((2, 4, None), grad_sum, on).as_text(), n_devices=8)
    by_kind[grad_sum, on] = kinds = {}
    for c in colls:
      kinds.setdefault(c.kind, []).append(c)
  zero, rep, mesh_zero = by_kind["per_axis", True], by_kind["per_axis", False], by_kind["mesh",
                                                                                        True]
  for kind in ("reduce-scatter", "all-gather"):
    assert {c.group_size for c in zero[kind]} == {4, 2}, kind
  assert max(c.group_size for cs in zero.values() for c in cs) <= 4
  ar = lambda kinds: sum(c.operand_bytes for c in kinds.get("all-reduce", []))
  assert ar(zero) < 0.01 * ar(rep)
  assert 8 in {c.group_size for c in mesh_zero["reduce-scatter"]}


def test_shard_optimizer_state_setting_validation_and_resume(tmp_path):
  cfg = tiny.get_config()
  assert cfg.train.shard_optimizer_state is False
  bad = cfg.copy_and_resolve_references()
  del bad.train["shard_optimizer_state"]
  bad.train.shard_optimizer_state = "yes"
  with pytest.raises(ValueError, match=r"train.shard_optimizer_state='yes'; allowed: True"):
    trainer.validate(bad)
  # A run saved before the setting existed (config.json without it) resumes with the default;
  # turning ZeRO-1 on for it is a change of the training math like any other.
  work = tmp_path / "run"
  (work / "checkpoints" / "2").mkdir(parents=True)
  stored = json.loads(cfg.to_json())
  del stored["train"]["shard_optimizer_state"]
  (work / "config.json").write_text(json.dumps(stored))
  assert resume.check(cfg, str(work)) == {}
  cfg.train.shard_optimizer_state = True
  with pytest.raises(ValueError, match=r"train.shard_optimizer_state: False -> True"):
    resume.check(cfg, str(work))
