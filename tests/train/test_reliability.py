"""Reliability of the training job: non-finite steps, strict JSON, settings, damaged checkpoints,
the resume contract, small user data, replica checks (SDC)."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from dsv3_jax.train import trainer

QUIET = dict(progress=False, log=lambda *_: None)


def _tiny_cfg(tmp_path, **train):
  """The small model of tests/train/test_trainer.py (2 layers, hidden 64, 8 experts)."""
  c = tiny.get_config()
  c.model.update(dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      n_routed_experts=8, num_hidden_layers=2, max_position_embeddings=64))
  c.data.seq_len = 64
  c.data.eval_sequences = 8
  c.train.update(dict(batch_size=8, steps=4, warmup_steps=1, log_every=1, eval_every=4,
                      checkpoint_every=2, workdir=str(tmp_path / "run"), learning_rate=3e-3))
  c.train.update(train)
  return c


def _strict(text: str):
  """json.loads that rejects NaN / Infinity (as strict parsers do)."""
  def bad(token):
    raise ValueError(f"non-standard JSON token {token}")
  return json.loads(text, parse_constant=bad)


def _rows(workdir):
  return [_strict(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def test_nonfinite_steps_are_skipped_then_stop_and_no_nan_checkpoint(tmp_path):
  # Learning rate 1e6: the loss is NaN from step 3 (as in the issue).
  cfg = _tiny_cfg(tmp_path, learning_rate=1e6, warmup_steps=0, steps=12, checkpoint_every=2,
                  log_every=1, eval_every=100, max_nonfinite_steps=2)
  with pytest.raises(trainer.TrainingStopped, match=r"not finite for 2 steps in a row "
                     r"\(train.max_nonfinite_steps=2\).*newest checkpoint is step (\d+)") as e:
    trainer.train(cfg, **QUIET)
  rows = _rows(cfg.train.workdir)  # strict JSON: null, never NaN
  skipped = [r for r in rows if r.get("skipped")]
  assert len(skipped) == 2 and skipped[-1]["nonfinite_steps"] == 2
  assert skipped[0]["loss"] is None or skipped[0]["grad_norm"] is None
  # Every checkpoint holds finite values; the newest is the last step that trained.
  from dsv3_jax.train.checkpoint import Checkpointer
  from dsv3_jax.train.integrity import nonfinite_leaves

  job = trainer._build(cfg, trainer.validate(cfg), lambda *_: None)
  ckpt = Checkpointer(cfg.train.workdir, save_every=1)
  newest = int(e.value.args[0].split("newest checkpoint is step ")[1].split()[0])
  assert ckpt.all_steps()[-1] == newest and newest < rows[-1]["step"]  # the stop step: not saved
  state, _ = ckpt.restore(newest, job.state)
  assert not nonfinite_leaves(state)
  ckpt.close()


def test_summary_is_strict_json(tmp_path):
  cfg = _tiny_cfg(tmp_path, steps=1, eval_every=1, checkpoint_every=1, log_every=1)
  trainer.train(cfg, **QUIET)
  summary = _strict((tmp_path / "run" / "summary.json").read_text())
  assert summary["step_time_s"] is None  # one step: no step after the compiled one
  _rows(cfg.train.workdir)


@pytest.mark.parametrize("section,key,value,match", [
    ("model", "rope_theta", 0.0, r"model.rope_theta must be a number > 0"),
    ("train", "weight_decay", -0.1, r"train.weight_decay=-0.1; allowed: >= 0"),
    ("train", "b2", 1.0, r"train.b2=1.0; allowed: \[0, 1\)"),
    ("train", "grad_clip_norm", -1.0, r"train.grad_clip_norm=-1.0; allowed: >= 0 \(0 turns"),
    ("data", "eval_sequences", 0, r"data.eval_sequences must be a positive integer"),
    ("train", "max_nonfinite_steps", 0, r"train.max_nonfinite_steps must be an integer >= 1"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, section, key, value,
                                                             match):
  cfg = _tiny_cfg(tmp_path)
  cfg[section][key] = value
  with pytest.raises(ValueError, match=match):
    trainer.train(cfg, **QUIET)
  assert not os.path.exists(tmp_path / "run")


def test_warmup_longer_than_the_run_warns():
  cfg = tiny.get_config()
  cfg.train.steps, cfg.train.warmup_steps = 10, 50
  said = []
  trainer.validate(cfg, said.append)
  assert any("train.warmup_steps=50 > train.steps=10" in s for s in said)


def test_grad_clip_zero_means_no_clipping():
  import jax.numpy as jnp

  t = tiny.get_config().train
  t.grad_clip_norm, t.warmup_steps, t.weight_decay = 0.0, 0, 0.0
  opt = trainer.make_optimizer(t)
  p = {"w": jnp.ones((2, 2))}
  u, _ = opt.update({"w": jnp.full((2, 2), 100.0)}, opt.init(p), p)
  assert float(jnp.abs(u["w"]).max()) > 0  # not zeroed (clipping at 0 would zero it)
