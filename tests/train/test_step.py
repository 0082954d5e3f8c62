"""The training step's gradient sums: per_axis equals mesh on an 8-device mesh (values, grads,
optimizer state, bias update), its compiled program has no collective wider than one mesh axis,
and the mesh-aware global norm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from dsv3_jax.cluster import hlo
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel.mesh import make_mesh, shard_model
from dsv3_jax.train import step as step_lib

SEQ = 16


def _setup(nodes, gpus, ep_nodes=None):
  c = tiny.get_config()
  c.model.update(dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      n_routed_experts=8, num_hidden_layers=2, max_position_embeddings=32,
                      n_group=ep_nodes or nodes, topk_group=1, dispatch="two_hop",
                      num_nextn_predict_layers=0))  # a dense and a MoE layer, no MTP module
  c.train.update(dict(batch_size=8, steps=10, warmup_steps=0, learning_rate=1e-2,
                      bias_update_speed=0.01))
  mc = ModelConfig.from_dict(c.model.to_dict())
  mesh = make_mesh(nodes, gpus, ep_nodes)
  model = Transformer(mc, mesh=mesh, rngs=nnx.Rngs(0))
  shard_model(model, mesh)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  opt = step_lib.make_optimizer(c.train)
  opt_state = opt.init(params)
  replicated = NamedSharding(mesh, P())
  opt_state = jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
      opt_state)
  sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  window = jax.device_put(
      jax.random.randint(jax.random.PRNGKey(1), (8, SEQ + 1 + mc.mtp_depth), 0, 256),
      NamedSharding(mesh, P(tuple(mesh.axis_names))))
  make = lambda grad_sum, opt_sh=None: step_lib.make_step_fns(
      graphdef, opt, mc, c.train, SEQ, mesh, sh(params), sh(other),
      sh(opt_state) if opt_sh is None else opt_sh, grad_sum=grad_sum)
  return make, (params, other, opt_state), window


CAP = (16, 16)


@functools.lru_cache(maxsize=None)
def _compiled(shape):
  """_setup(*shape) and, per grad_sum mode, its step functions and the train step compiled for
  capacity CAP (one compilation serves the equality test and the collective check)."""
  make, state, window = _setup(*shape)
  fns = {mode: make(mode) for mode in ("mesh", "per_axis")}
  compiled = {mode: f.train_step.lower(*state, window, CAP).compile() for mode, f in fns.items()}
  return fns, compiled, state, window


@pytest.mark.parametrize("shape", [(2, 4, None), (4, 2, 2)], ids=["node2_gpu4", "replica2"])
def test_per_axis_step_equals_the_mesh_step(shape):
  all_fns, compiled, (params, other, opt_state), window = _compiled(shape)
  cap = CAP
  outs = {}
  for mode in ("mesh", "per_axis"):
    fns, train_step = all_fns[mode], compiled[mode]  # (capacity CAP is compiled in)
    p, o, s, m = train_step(params, other, opt_state, window)
    p, o, s, m = train_step(p, o, s, window)  # twice: Adam moments, the bias update
    nats, count, _ = fns.eval_step(p, o, window, cap)
    outs[mode] = jax.device_get((p, o, s, m, nats, count))
  (p0, o0, s0, m0, n0, c0), (p1, o1, s1, m1, n1, c1) = outs["mesh"], outs["per_axis"]
  # Equal up to float summation order; Adam's m / sqrt(v) magnifies that order on elements
  # whose gradient is ~0, so parameters are compared at 1e-3 of one step's size (lr = 1e-2).
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)
  jax.tree.map(close, p0, p1)
  jax.tree.map(close, s0, s1)
  jax.tree.map(np.testing.assert_array_equal, o0, o1)  # same loads -> same bias steps
  assert set(m0) == set(m1)
  for k in m0:
    close(m0[k], m1[k])
  close(n0, n1)
  assert c0 == c1 == 8 * SEQ
  assert m1["grad_norm"] > 0 and not np.allclose(jax.tree.leaves(p0)[0],
                                                 jax.tree.leaves(params)[0])


def test_per_axis_program_has_no_collective_wider_than_one_axis():
  _, compiled, _, _ = _compiled((2, 4, None))  # the programs the equality test ran
  sizes = {}
  for mode in ("mesh", "per_axis"):
    colls = hlo.parse_hlo(compiled[mode].as_text(), n_devices=8)
    sizes[mode] = {c.group_size for c in colls if c.kind == "all-reduce"}
  assert 8 in sizes["mesh"]  # shard_map's transpose: one all-reduce over every device
  assert sizes["per_axis"] and max(sizes["per_axis"]) <= 4  # 'gpu' (4) and 'node' (2) groups


def test_global_norm_inside_shard_map_is_the_whole_mesh_norm():
  mesh = make_mesh(2, 4)
  rng = np.random.default_rng(0)
  tree = {"experts": rng.normal(size=(8, 3)).astype(np.float32),
          "replicated": rng.normal(size=(5,)).astype(np.float32)}
  specs = {"experts": P(("node", "gpu")), "replicated": P()}
  placed = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)
  got = jax.jit(jax.shard_map(step_lib.global_norm, mesh=mesh, in_specs=(specs,),
                              out_specs=P()))(placed)
  np.testing.assert_allclose(got, optax.tree.norm(tree), rtol=1e-6)
  assert float(step_lib.global_norm(tree)) == float(optax.tree.norm(tree))  # outside: optax's


def test_grad_sum_resolution():
  class _Mesh:
    size = 512
  assert step_lib.resolve_grad_sum("auto", None) == "mesh"
  assert step_lib.resolve_grad_sum("auto", _Mesh()) == "per_axis"
  assert step_lib.resolve_grad_sum("mesh", _Mesh()) == "mesh"
  with pytest.raises(ValueError, match="allowed: \\('auto', 'mesh', 'per_axis'\\)"):
    step_lib.resolve_grad_sum("ring", None)
