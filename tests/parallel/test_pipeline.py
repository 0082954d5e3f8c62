"""Executed pipeline parallelism (1F1B, DualPipe) against the unpipelined training step.

DualPipe PP2 and 1F1B PP4 with expert parallelism inside each stage (stage x node x gpu =
2x2x2 and 4x2x2); the unpipelined reference is `make_step_fns` on one 2x2 (node x gpu) group.
A plain SGD step with learning rate 1 makes params - new params the gradient of each step."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel import pipeline_schedule as ps
from dsv3_jax.parallel.mesh import make_mesh, make_pipeline_mesh, shard_model, state_shardings
from dsv3_jax.train import pipeline_stacked, pipeline_step, step as step_lib

SEQ, BATCH = 8, 32


def _cfg(layers=5):
  c = tiny.get_config()
  c.model.update(dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      n_routed_experts=8, num_hidden_layers=layers, first_k_dense_replace=1,
                      max_position_embeddings=32, n_group=2, topk_group=1, dispatch="two_hop"))
  c.train.update(dict(batch_size=BATCH, warmup_steps=0, bias_update_speed=0.01))
  return c


@functools.lru_cache(maxsize=None)
def _reference():
  """Model on a 2x2 mesh, one unpipelined SGD step: (cfg, model cfg, state, window, outputs)."""
  c = _cfg()
  mc = ModelConfig.from_dict(c.model.to_dict())
  mesh = make_mesh(2, 2)
  model = Transformer(mc, mesh=mesh, rngs=nnx.Rngs(0))
  shard_model(model, mesh)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  window = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (BATCH, SEQ + 1 + mc.mtp_depth),
                                         0, 256))
  opt = optax.sgd(1.0)
  opt_state = opt.init(params)
  sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  rep = NamedSharding(mesh, P())
  opt_state = jax.tree.map(lambda x: jax.device_put(x, rep), opt_state)
  fns = step_lib.make_step_fns(graphdef, opt, mc, c.train, SEQ, mesh, sh(params), sh(other),
                               sh(opt_state))
  cap = model.layers[1].mlp.worst_case_capacity(BATCH * SEQ)
  host = jax.device_get((params, other))
  p, o, _, m = fns.train_step(params, other, opt_state,
                              jax.device_put(window, NamedSharding(mesh, P(mesh.axis_names))), cap)
  return c, mc, graphdef, host, window, jax.device_get((p, o, m)), model


def _pipelined(schedule, stages, micro_batches, transfer="ppermute"):
  c, mc, graphdef, (params, other), window, _, model = _reference()
  mesh = make_pipeline_mesh(stages, 2, 2)
  psh, osh = state_shardings(params, mesh), state_shardings(other, mesh)
  params, other = jax.device_put(params, psh), jax.device_put(other, osh)
  opt = optax.sgd(1.0)
  opt_state = jax.device_put(opt.init(params), NamedSharding(mesh, P()))
  fns = pipeline_step.make_pipeline_step_fns(
      graphdef, opt, mc, c.train, SEQ, mesh, psh, osh,
      jax.tree.map(lambda x: x.sharding, opt_state), schedule=schedule,
      micro_batches=micro_batches, transfer=transfer)
  cap = model.layers[1].mlp.worst_case_capacity(BATCH * SEQ // micro_batches)
  w = jax.device_put(window, NamedSharding(mesh, P(mesh.axis_names[1:])))
  p, o, _, m = fns.train_step(params, other, opt_state, w, cap)
  return jax.device_get((p, o, m))


def _stacked(schedule, stages, micro_batches, transfer="all_gather"):
  """The same step with the state in the pipeline layout (`make_stacked_pipeline_step`):
  (params, other, metrics) back in the model layout, and the compiled program's
  collectives by mesh axis."""
  from dsv3_jax.cluster import hlo
  from experiments._scale_layout import collectives_by_axis

  c, mc, graphdef, (params, other), window, _, model = _reference()
  mesh = make_pipeline_mesh(stages, 2, 2)
  psh, osh = state_shardings(params, mesh), state_shardings(other, mesh)
  opt = optax.sgd(1.0)
  step = pipeline_stacked.make_stacked_pipeline_step(
      graphdef, opt, mc, c.train, SEQ, mesh, psh, osh, schedule=schedule,
      micro_batches=micro_batches, transfer=transfer)
  state = jax.device_put(step.to_pipeline(*jax.device_get((params, other))), step.shardings)
  opt_state = opt.init((state.stage_params, state.shared_params))
  opt_state = jax.device_put(opt_state, step.opt_shardings(opt_state))
  cap = model.layers[1].mlp.worst_case_capacity(BATCH * SEQ // micro_batches)
  w = jax.device_put(window, NamedSharding(mesh, P(mesh.axis_names[1:])))
  compiled = step.train_step.lower(state, opt_state, w, cap).compile()
  state, _, m = compiled(state, opt_state, w)
  axes = collectives_by_axis(hlo.parse_hlo(compiled.as_text(), n_devices=mesh.size), mesh)
  p, o = step.to_model(jax.device_get(state))
  return (p, o, jax.device_get(m)), axes


@pytest.mark.parametrize("schedule,stages,micro_batches,transfer", [
    # DualPipe PP2 with the stage-axis-only transfer (its primitives equal ppermute's bit for
    # bit: test_pipeline_transfer.py; run with the state in the pipeline layout), 1F1B PP4 with
    # ppermute in the model layout. DualPipe at PP4 x 8 micro-batches runs in
    # test_pipeline_train.py (dsv3-train on configs/orion_pp.py, its executed schedule checked
    # against the simulator's); each case here took 58-118 s of a make test worker.
    ("DualPipe", 2, 4, "all_gather"), ("1F1B", 4, 4, "ppermute")])
def test_pipelined_step_equals_unpipelined(schedule, stages, micro_batches, transfer):
  _, _, _, (p0, _), _, (p_ref, o_ref, m_ref), _ = _reference()
  if transfer == "all_gather":
    (p, o, m), axes = _stacked(schedule, stages, micro_batches, transfer)
    # Only the layout's groups: one mesh axis each (or node+gpu, one node group), no
    # collective-permute (the GSPMD moves of the model-layout step).
    assert axes and all(r["kind"] != "collective-permute" for r in axes), axes
    assert {r["axes"] for r in axes} <= {"stage", "node", "gpu", "node+gpu"}, axes
  else:
    p, o, m = _pipelined(schedule, stages, micro_batches, transfer)
  grad = lambda new: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p0, new)
  g_ref, g = grad(p_ref), grad(p)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), g_ref, g))
  assert max(diffs) < 1e-5, max(diffs)
  assert min(float(np.max(np.abs(x))) for x in jax.tree.leaves(g)) > 0  # every leaf trained
  for k in ("loss", "mtp_loss", "balance_loss", "total_loss", "grad_norm"):
    np.testing.assert_allclose(m[k], m_ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for k in ("expert_counts", "dropped_tokens", "rows_inter_node", "rows_intra_node"):
    np.testing.assert_array_equal(m[k], m_ref[k], err_msg=k)
  jax.tree.map(np.testing.assert_array_equal, o, o_ref)  # same loads -> same bias update
  # What the executor measured equals the simulator's schedule and Table 2.
  table = ps.build_slot_table(schedule, stages, micro_batches)
  np.testing.assert_array_equal(m["idle_slots"], table.idle_slots())
  np.testing.assert_array_equal(m["idle_slots"], table.simulated.bubble_per_rank)
  assert max(m["idle_slots"]) == table.formula_bubble()
  np.testing.assert_array_equal(m["peak_activations"], table.peak_per_rank["x"])
  assert max(m["peak_activations"]) == table.formula_memory()[1]
  np.testing.assert_array_equal(m["schedule_mismatches"], 0)


def test_bad_pipeline_settings():
  c, mc, graphdef, (params, other), _, _, _ = _reference()
  mesh = make_pipeline_mesh(2, 2, 2)
  psh, osh = state_shardings(params, mesh), state_shardings(other, mesh)
  make = lambda mc, **kw: pipeline_step.make_pipeline_step_fns(
      graphdef, optax.sgd(1.0), mc, c.train, SEQ, mesh, psh, osh, None, **kw)
  with pytest.raises(ValueError, match="pipeline.micro_batches=1"):
    make(mc, schedule="1F1B", micro_batches=1)
  with pytest.raises(ValueError, match="pipeline.schedule='GPipe'"):
    make(mc, schedule="GPipe", micro_batches=4)
  with pytest.raises(ValueError, match="pipeline.transfer='psum'; allowed: ppermute, all_gather"):
    make(mc, schedule="1F1B", micro_batches=4, transfer="psum")
  odd = ModelConfig.from_dict(_cfg(layers=4).model.to_dict())  # 3 MoE layers on 2 stages
  with pytest.raises(ValueError, match="mesh.stages=2 must divide the model's MoE layers"):
    make(odd, schedule="1F1B", micro_batches=4)
  with pytest.raises(ValueError, match="mesh.stages x mesh.nodes x mesh.gpus_per_node"):
    make_pipeline_mesh(4, 4, 4)  # 64 devices, the session has 32
