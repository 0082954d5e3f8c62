"""Activation recomputation (train.remat, model.transformer.recomputed): the same training
steps as without it, on one device (with the MTP module) and on a 2 x 4 expert-parallel mesh
(capacity dispatch; the compiled step holds the rerun forward's all_to_alls), and the
setting's config contract (bad value, resuming a run saved before the setting existed)."""

import functools
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tiny_run import tiny_cfg

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel.mesh import make_mesh, shard_model
from dsv3_jax.train import resume, trainer
from dsv3_jax.train import step as step_lib

SEQ, BATCH, STEPS = 32, 8, 3
CAP = (24,)


def _config(mesh_shape):
  c = tiny_cfg(pathlib.Path("unused"))
  c.model.update(dict(max_position_embeddings=SEQ, dispatch="flat"))
  if mesh_shape:  # no MTP module on the mesh (the one-device case covers it): a shorter compile
    c.model.update(dict(n_group=mesh_shape[0], topk_group=1, num_nextn_predict_layers=0))
  c.data.seq_len = SEQ
  c.train.update(dict(steps=10, warmup_steps=1, learning_rate=1e-2))
  return c


@functools.lru_cache(maxsize=None)
def _setup(mesh_shape):
  c = _config(mesh_shape)
  mc = ModelConfig.from_dict(c.model.to_dict())
  mesh = make_mesh(*mesh_shape) if mesh_shape else None
  model = Transformer(mc, mesh=mesh, rngs=nnx.Rngs(0))
  if mesh is not None:
    shard_model(model, mesh)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  opt = step_lib.make_optimizer(c.train)
  opt_state = opt.init(params)
  if mesh is not None:
    rep = NamedSharding(mesh, P())
    opt_state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, rep),
        opt_state)
  w = jax.random.randint(jax.random.PRNGKey(1), (STEPS, BATCH, SEQ + 1 + mc.mtp_depth), 0, 256)
  if mesh is not None:
    w = jax.device_put(w, NamedSharding(mesh, P(None, tuple(mesh.axis_names))))
  return c, mc, graphdef, opt, (params, other, opt_state), mesh, w


def _compiled(mesh_shape, remat):
  c, mc, graphdef, opt, state, mesh, w = _setup(mesh_shape)
  t = c.train.copy_and_resolve_references()
  t.remat = remat
  sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  shard = (sh(state[0]), sh(state[1]), sh(state[2])) if mesh is not None else (None,) * 3
  fns = step_lib.make_step_fns(graphdef, opt, mc, t, SEQ, mesh, *shard)
  cap = CAP if mesh is not None else None
  return fns.train_step.lower(*state, w[0], cap).compile()


def _train(mesh_shape, remat):
  *_, state, mesh, w = _setup(mesh_shape)
  step = _compiled(mesh_shape, remat)
  p, o, s = state
  out = []
  for i in range(STEPS):
    p, o, s, m = step(p, o, s, w[i])
    out.append([float(m.get(k, 0.0)) for k in ("loss", "mtp_loss", "grad_norm")])
  return np.array(out), jax.device_get(p), step


@pytest.mark.parametrize("mesh_shape", [(), (2, 4)], ids=["one_device_mtp", "node2_gpu4"])
def test_recomputed_blocks_train_the_same(mesh_shape):
  ref, p_ref, ref_step = _train(mesh_shape, False)
  got, p_got, step = _train(mesh_shape, True)
  print(f"max |diff| loss/mtp/grad norm {np.max(np.abs(got - ref), axis=0)}")
  assert np.all(np.isfinite(ref)) and ref[-1, 0] < ref[0, 0]  # it trains
  if not mesh_shape:
    assert (ref[:, 1] > 0).all()  # the MTP module ran (and was recomputed)
  # The recomputed forward is the same arithmetic on the same inputs: the same numbers up to
  # XLA fusing the rerun differently (a few ulps).
  np.testing.assert_allclose(got, ref, rtol=2e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_ref, p_got)
  temps = lambda c: c.memory_analysis().temp_size_in_bytes
  print(f"temporaries per device: {temps(ref_step)} -> {temps(step)} bytes")
  if mesh_shape:
    # The backward pass reruns the forward of each MoE block, its all_to_alls included: the
    # step gains exactly the forward pass's all_to_alls (those of the eval step's program).
    # What that buys shows at the main job's size, where the dispatch buffers
    # dominate (80.9 -> 58.3 MiB of temporaries per device, results/train_memory.md); at this
    # test's size the saved activations weigh about as much as the rerun's own buffers.
    count = lambda text: text.count(" all-to-all(")
    c, mc, graphdef, opt, state, mesh, w = _setup(mesh_shape)
    model = nnx.merge(graphdef, state[0], state[1])
    n_main = sum(layer.is_moe for layer in model.layers)
    sh = [jax.tree.map(lambda x: x.sharding, t) for t in state]
    evaluate = step_lib.make_step_fns(graphdef, opt, mc, c.train, SEQ, mesh, *sh).eval_step
    n_fwd = count(evaluate.lower(state[0], state[1], w[0], CAP).compile().as_text())
    per_block = n_fwd // n_main
    assert per_block > 0 and n_fwd == per_block * n_main
    assert count(step.as_text()) == count(ref_step.as_text()) + per_block * len(model.moe_layers)


def test_remat_setting_validation_and_resume(tmp_path):
  c = tiny_cfg(tmp_path)
  assert c.train.remat is False
  del c.train["remat"]
  c.train.remat = "yes"
  with pytest.raises(ValueError, match=r"train.remat='yes'; allowed: True .* or False"):
    trainer.validate(c)
  # A run saved before the setting existed resumes with the default; turning recomputation on
  # for it is a change like any other (the numbers move by a few ulps: test above).
  cfg = tiny_cfg(tmp_path)
  work = tmp_path / "run"
  (work / "checkpoints" / "2").mkdir(parents=True)
  stored = json.loads(cfg.to_json())
  del stored["train"]["remat"]
  (work / "config.json").write_text(json.dumps(stored))
  assert resume.check(cfg, str(work)) == {}
  cfg.train.remat = True
  with pytest.raises(ValueError, match=r"train.remat: False -> True"):
    resume.check(cfg, str(work))
