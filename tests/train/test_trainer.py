"""Losses, MTP masking, the bias update, capacity growth, and short real training runs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_run import ONE_MOE_LAYER, tiny_cfg

from dsv3_jax.train import trainer


def test_cross_entropy_hand_value_and_mask():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  targets = jnp.array([[0, 1]])
  ce = trainer.cross_entropy(logits, targets, jnp.array([[True, True]]))
  assert float(ce) == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2, rel=1e-6)
  ce = trainer.cross_entropy(logits, targets, jnp.array([[False, True]]))
  assert float(ce) == pytest.approx(-np.log(0.8), rel=1e-6)


def test_make_batch_mtp_targets_and_masks():
  w = jnp.arange(2 * 8).reshape(2, 8)  # windows of S + 1 + D = 5 + 1 + 2
  b = trainer.make_batch(w, 5, 2)
  np.testing.assert_array_equal(b.inputs[0], [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(b.targets[0], [1, 2, 3, 4, 5])
  np.testing.assert_array_equal(b.mtp_tokens[0], [0, 1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(b.mtp_targets[0][0], [2, 3, 4, 5, 6])  # depth 1: t[i+2]
  np.testing.assert_array_equal(b.mtp_targets[1][0], [3, 4, 5, 6, 7])  # depth 2: t[i+3]
  assert bool(jnp.all(b.mask)) and all(bool(jnp.all(m)) for m in b.mtp_masks)


def test_targets_falling_off_the_end_are_never_supervised():
  w = jnp.arange(6)[None]  # only S + 1 tokens: no extra tokens for MTP
  b = trainer.make_batch(w, 5, 2)
  assert b.mask.tolist() == [[True] * 5]
  assert b.mtp_masks[0].tolist() == [[True, True, True, True, False]]  # t[6] is missing
  assert b.mtp_masks[1].tolist() == [[True, True, True, False, False]]
  pad = jnp.array([[True] * 4 + [False] * 4])  # padding after t_3
  b = trainer.make_batch(jnp.arange(8)[None], 5, 2, token_mask=pad)
  assert b.mask.tolist() == [[True, True, True, False, False]]
  assert b.mtp_masks[0].tolist() == [[True, True, False, False, False]]


def test_bias_update_direction():
  b = trainer.bias_update(jnp.zeros(4), jnp.array([10.0, 2.0, 4.0, 4.0]), 0.1)
  np.testing.assert_allclose(b, [-0.1, 0.1, 0.1, 0.1])  # mean 5: over, under, under, under
  b = trainer.bias_update(jnp.zeros(3), jnp.array([1.0, 2.0, 3.0]), 0.5)
  np.testing.assert_allclose(b, [0.5, 0.0, -0.5])


def test_grow_capacity():
  assert trainer.grow_capacity((32, 64), np.array([40, 10]), (256, 512)) == (56, 64)
  assert trainer.grow_capacity((32,), np.array([250]), (256,)) == (256,)  # capped


_tiny_cfg = tiny_cfg  # tests/train/tiny_run.py: 2 layers, hidden 64, 8 experts, 30 steps


def test_short_run_learns_resumes_and_writes_metrics(tmp_path):
  cfg = _tiny_cfg(tmp_path)
  s1 = trainer.train(cfg, progress=False, log=lambda *_: None)
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  losses = [l["loss"] for l in lines if "loss" in l]
  assert losses[-1] < losses[0] - 0.5  # it learns
  # Untrained, the model predicts ~uniform bytes: ln 256 = 5.55 nats.
  assert np.isfinite(s1["heldout_loss"]) and s1["heldout_loss"] < 4.0
  for key in ("mtp_loss", "balance_loss", "expert_load_max_over_mean", "dropped_tokens",
              "tokens_per_s", "step_time_s"):
    assert key in lines[0]
  assert all(l["dropped_tokens"] == 0 for l in lines if "dropped_tokens" in l)  # dropless
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["15", "30"]
  # Rerunning with more steps (a change to the learning-rate schedule, so it needs the opt-in)
  # resumes at step 30 and continues from the saved state.
  cfg.train.steps = 35
  cfg.train.allow_config_change = True
  s2 = trainer.train(cfg, progress=False, log=lambda *_: None)
  assert s2["resumed_from"] == 30
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert lines[-1]["step"] == 35
  # TensorBoard event files beside metrics.jsonl (one per run, the resumed one included) hold
  # the same losses, as float32.
  from dsv3_jax.train.metrics import read_scalars

  tb = read_scalars(str(tmp_path / "run"))
  for key in ("loss", "heldout_loss", "grad_norm"):
    want = [(l["step"], float(np.float32(l[key]))) for l in lines if key in l]
    assert tb[key] == want and len(want) >= 2
  # Rerunning a finished run trains nothing, re-evaluates the same held-out loss and keeps the
  # timings of the steps that trained it.
  said = []
  s3 = trainer.train(cfg, progress=False, log=lambda *a: said.append(" ".join(map(str, a))))
  assert any("nothing to train: the run is complete at step 35" in m for m in said), said
  assert s3["resumed_from"] == 35 and s3["heldout_loss"] == pytest.approx(s2["heldout_loss"])
  assert (s3["step_time_s"], s3["first_step_s"]) == (s2["step_time_s"], s2["first_step_s"])
  for key in ("eval_s", "checkpoint_save_s", "slowest_step_over_median", "peak_rss_bytes"):
    assert s3[key] == s2[key], key  # the finished run's diagnostics are kept, not reset
  assert np.isfinite(s3["tokens_per_s"])


@pytest.mark.parametrize("change,match", [
    (("model", "n_routed_experts", 12), "n_routed_experts=12 is not divisible by the "
     "expert-parallel size"),
    (("model", "topk_group", 5), "topk_group=5 must be <= model.n_group=4"),
    (("model", "num_experts_per_tok", 9), "num_experts_per_tok=9 exceeds"),
    (("mesh", "nodes", 64), "needs 256 devices but jax has 32"),
    (("data", "paths", ("/no/such/file.txt",)), "does not exist"),
    (("model", "dispatch", "ring"), "allowed: \\('flat', 'two_hop'\\)"),
    (("train", "batch_size", 12), "batch_size=12 must be divisible by the 8 devices"),
])
def test_bad_config_stops_before_any_file_is_written(tmp_path, change, match):
  cfg = _tiny_cfg(tmp_path)
  cfg.mesh.nodes, cfg.mesh.gpus_per_node = 2, 4
  cfg.model.n_group = 2
  section, key, value = change
  if section == "model" and key in ("topk_group", "num_experts_per_tok"):
    cfg.mesh.nodes, cfg.mesh.gpus_per_node, cfg.model.n_group = 1, 1, 4
  if section == "mesh":
    cfg.model.n_group = value
    cfg.model.n_routed_experts = 512
  cfg[section][key] = value
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    trainer.train(cfg, progress=False, log=lambda *_: None)
  assert not os.path.exists(tmp_path / "run")


def test_router_bias_is_outside_the_optimizer_and_moves_by_gamma(tmp_path):
  from flax import nnx

  from dsv3_jax.model.config import ModelConfig
  from dsv3_jax.model.moe import RouterBias
  from dsv3_jax.model.transformer import Transformer

  cfg = _tiny_cfg(tmp_path, bias_update_speed=0.01)
  mc = ModelConfig.from_dict(cfg.model.to_dict())
  model = Transformer(mc, rngs=nnx.Rngs(0))
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  flat_params = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
  assert not any("e_score_correction_bias" in p for p in flat_params)
  assert all(isinstance(v, RouterBias) for _, v in nnx.to_flat_state(other))
  opt = trainer.make_optimizer(cfg.train)
  opt_state = opt.init(params)
  fns = trainer.make_step_fns(graphdef, opt, mc, cfg.train, cfg.data.seq_len)
  window = jax.random.randint(jax.random.PRNGKey(0), (8, 66), 0, 256)
  _, other2, _, m = fns.train_step(params, other, opt_state, window, (1,))
  for (_, b0), (_, b1), counts in zip(nnx.to_flat_state(other), nnx.to_flat_state(other2),
                                      np.asarray(m["expert_counts"])):
    step = np.asarray(b1[...]) - np.asarray(b0[...])
    want = 0.01 * np.sign(counts.mean() - counts)
    np.testing.assert_allclose(step, want, atol=1e-7)
    assert counts.sum() == 8 * 64 * mc.num_experts_per_tok  # every real token, top-k


def test_resuming_with_an_incompatible_config_fails_and_keeps_the_run(tmp_path):
  cfg = _tiny_cfg(tmp_path, steps=2, checkpoint_every=2, eval_every=2, log_every=1)
  trainer.train(cfg, progress=False, log=lambda *_: None)
  saved = (tmp_path / "run" / "config.json").read_text()
  cfg.model.hidden_size = 32
  with pytest.raises(ValueError, match="change the training math: model.hidden_size: 64 -> 32"):
    trainer.train(cfg, progress=False, log=lambda *_: None)
  assert (tmp_path / "run" / "config.json").read_text() == saved
  assert os.listdir(tmp_path / "run" / "checkpoints") == ["2"]
  # With the opt-in the shapes still do not fit: refused, the run kept, no advice to delete it.
  cfg.train.allow_config_change = True
  with pytest.raises(ValueError, match="holds another model's state") as e:
    trainer.train(cfg, progress=False, log=lambda *_: None)
  assert "remove" not in str(e.value) and "delete" not in str(e.value)
  assert (tmp_path / "run" / "config.json").read_text() == saved
  assert os.listdir(tmp_path / "run" / "checkpoints") == ["2"]


def test_training_on_expert_parallel_groups_over_a_subset_of_nodes(tmp_path):
  # The subject is the job on a replica x node x gpu mesh: the one-MoE-layer model suffices.
  cfg = _tiny_cfg(tmp_path, steps=2, log_every=1, eval_every=2, checkpoint_every=2)
  cfg.model.update(ONE_MOE_LAYER)
  cfg.mesh.nodes, cfg.mesh.gpus_per_node, cfg.mesh.ep_nodes = 4, 2, 2
  cfg.model.n_group, cfg.model.topk_group = 2, 1
  cfg.model.dispatch = "two_hop"
  s = trainer.train(cfg, progress=False, log=lambda *_: None)
  assert s["devices"] == 8 and np.isfinite(s["heldout_loss"])
  cfg.mesh.ep_nodes = 3
  with pytest.raises(ValueError, match="mesh.ep_nodes=3 must be a positive divisor"):
    trainer.train(cfg, progress=False, log=lambda *_: None)


def test_evaluation_reruns_an_overflowing_batch_once_then_stays_at_the_worst_case():
  # A fake eval step: nats = batch sum, plus 1000 from a run at the training capacity 4 whose
  # loads needed 5 (an overflowed result, which must be discarded).
  from dsv3_jax.train import loop
  from dsv3_jax.train.step import StepFns

  calls = []

  def eval_step(params, other, w, capacity):
    calls.append(capacity)
    return float(w.sum()) + (1000.0 if capacity == (4,) else 0.0), float(w.size), (5,)

  windows = np.arange(4 * 2 * 3, dtype=np.float64).reshape(8, 3)  # 4 batches of 2
  fns = StepFns(train_step=None, eval_step=eval_step)
  loss = loop._eval_loss(fns, None, None, windows, 2, (4,), (9,), lambda w: w)
  assert calls == [(4,), (9,), (9,), (9,), (9,)]  # one rerun, not one per batch
  assert loss == windows.sum() / windows.size
