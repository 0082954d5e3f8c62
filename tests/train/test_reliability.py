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


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4, and its built job."""
  tmp = tmp_path_factory.mktemp("ckpt")
  cfg = _tiny_cfg(tmp)
  summary = trainer.train(cfg, **QUIET)
  job = trainer._build(cfg, trainer.validate(cfg), lambda *_: None)
  return cfg, job, summary


def _data_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep or
           os.path.basename(d) == "d"]
  return max(files, key=os.path.getsize)


def _truncate(p):
  f = _data_file(p)
  os.truncate(f, os.path.getsize(f) // 2)


def _overwrite(p):
  f = _data_file(p)
  open(f, "wb").write(np.random.default_rng(0).bytes(os.path.getsize(f)))


def _flip12(p):
  f = _data_file(p)
  b = bytearray(open(f, "rb").read())
  mid = len(b) // 2
  for i in range(mid, mid + 12):
    b[i] ^= 0xFF
  open(f, "wb").write(bytes(b))


def _no_state(p):
  import shutil

  shutil.rmtree(os.path.join(p, "state"))


def _garble_meta(p):
  open(os.path.join(p, "meta", "metadata"), "w").write('{"step": 4, "capac')


def _garble_state_metadata(p):
  open(os.path.join(p, "state", "_METADATA"), "w").write("\x00garbage")


@pytest.mark.parametrize("damage,item", [
    (_truncate, "state"), (_overwrite, "state"), (_flip12, "state"), (_no_state, "state"),
    (_garble_meta, "meta"), (_garble_state_metadata, "state")])
def test_a_damaged_checkpoint_is_named_set_aside_and_the_older_one_restored(
    trained_run, tmp_path, damage, item):
  import shutil

  from dsv3_jax.train.checkpoint import Checkpointer

  cfg, job, _ = trained_run
  work = tmp_path / "run"
  shutil.copytree(cfg.train.workdir, work)
  damage(str(work / "checkpoints" / "4"))
  said = []
  ckpt = Checkpointer(str(work), save_every=2)
  state, _, start = trainer._restore(job, ckpt, said.append)
  assert start == 2
  warning = next(s for s in said if s.startswith("warning:"))
  assert f"checkpoint step 4 in {work}/checkpoints is damaged (item '{item}'" in warning
  assert "falling back to step 2" in warning and "remove" not in warning
  assert (work / "checkpoints_damaged" / "4").is_dir()  # kept, not deleted
  assert ckpt.all_steps() == [2]
  # What was restored is step 2 exactly (its stored checksums verified).
  ref = Checkpointer(cfg.train.workdir, save_every=2)
  want, _ = ref.restore(2, job.state)
  from dsv3_jax.train.integrity import leaf_checksums

  assert leaf_checksums(state) == leaf_checksums(want)
  ref.close()
  ckpt.close()


def test_flipped_bytes_are_caught_by_the_checksums_and_the_run_resumes(trained_run, tmp_path):
  import shutil

  cfg, _, summary = trained_run
  work = tmp_path / "run"
  shutil.copytree(cfg.train.workdir, work)
  _flip12(str(work / "checkpoints" / "4"))
  c = cfg.copy_and_resolve_references()
  c.train.workdir = str(work)
  said = []
  s = trainer.train(c, progress=False, log=said.append)
  assert any("checkpoint step 4" in l and "is damaged" in l for l in said), said
  assert s["resumed_from"] == 2 and s["steps"] == 4
  # Steps 3 and 4 retrained from step 2: the same losses as the first time (bit-identical).
  assert s["final"]["loss"] == summary["final"]["loss"]
  assert s["checkpoint_restore_s"] > 0 and summary["checkpoint_save_s"] > 0


# ----------------------------------------------------------------------------- resume contract


def _copy_run(cfg, tmp_path):
  import shutil

  work = tmp_path / "run"
  shutil.copytree(cfg.train.workdir, work)
  c = cfg.copy_and_resolve_references()
  c.train.workdir = str(work)
  return c, work


def test_resuming_with_math_changes_is_refused_unless_opted_in_and_then_recorded(
    trained_run, tmp_path):
  from dsv3_jax.train import resume

  cfg, _, _ = trained_run
  c, work = _copy_run(cfg, tmp_path)
  before = {p: (work / p).read_bytes() for p in ("config.json", "metrics.jsonl")}
  c.train.learning_rate, c.model.num_experts_per_tok, c.train.steps = 1e-3, 2, 6
  c.train.log_every = 2  # bookkeeping only: never listed
  with pytest.raises(ValueError, match=r"change the training math: model.num_experts_per_tok: "
                     r"4 -> 2; train.learning_rate: 0.003 -> 0.001; train.steps: 4 -> 6\. .*"
                     r"allow_config_change=True"):
    trainer.train(c, **QUIET)
  assert {p: (work / p).read_bytes() for p in before} == before  # nothing written
  c.train.allow_config_change = True
  c.train.steps = 4  # finished: resumes, trains nothing
  c.model.num_experts_per_tok = 4
  trainer.train(c, **QUIET)
  hist = resume.read_history(str(work))
  assert hist[-1]["event"] == "resume" and hist[-1]["step"] == 4
  assert hist[-1]["changes"] == {"train.learning_rate": {"old": 0.003, "new": 0.001}}
  assert json.loads((work / "config.json").read_text())["train"]["learning_rate"] == 1e-3


def test_after_a_crash_metrics_have_one_row_per_step_and_resume_is_bit_identical(
    trained_run, tmp_path):
  import shutil

  from dsv3_jax.train.metrics import read_metrics

  cfg, _, summary = trained_run
  c, work = _copy_run(cfg, tmp_path)
  first = read_metrics(str(work / "metrics.jsonl"))
  # A crash after step 4's metrics but before its checkpoint, mid-way through a line.
  shutil.rmtree(work / "checkpoints" / "4")
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "loss": 2.')
  s = trainer.train(c, **QUIET)
  assert s["resumed_from"] == 2
  rows = [_strict(l) for l in open(work / "metrics.jsonl")]  # no garbled line left
  train_rows = [r["step"] for r in rows if "loss" in r]
  assert train_rows == [1, 2, 3, 4]
  assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in first if "loss" in r]
  assert s["heldout_loss"] == summary["heldout_loss"]


def test_a_single_small_file_trains(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("a single small file of my own text, a few windows long. " * 6)  # 336 bytes
  cfg = _tiny_cfg(tmp_path, steps=1, eval_every=1, checkpoint_every=1)
  cfg.data.paths = (str(text),)
  said = []
  s = trainer.train(cfg, progress=False, log=said.append)
  assert np.isfinite(s["heldout_loss"]) and any("split within files" in l for l in said)


# ----------------------------------------------------------------------------- SDC


def test_a_bit_flip_in_one_replica_is_found_and_stops_the_run_before_the_checkpoint(tmp_path):
  # An 8-device (2 x 4) mesh of the 32 the test session emulates (32 devices cost ~4x more
  # for the same check).
  import jax

  from dsv3_jax.train import integrity

  cfg = _tiny_cfg(tmp_path, steps=6, checkpoint_every=2, log_every=1, eval_every=6,
                  sdc_check_every=4)
  cfg.mesh.nodes, cfg.mesh.gpus_per_node = 2, 4
  cfg.model.update(dict(n_group=2, topk_group=1, num_experts_per_tok=2))
  injected = {}

  def flip_after_step_3(step, state):
    if step != 3:
      return state
    leaves, tree = jax.tree_util.tree_flatten(state)
    names = [n for n, _ in integrity.named_leaves(state)]
    i = names.index("params/layers/0/self_attn/q_a_proj/kernel")
    devices = list(leaves[i].sharding.mesh.devices.reshape(-1))
    leaves[i] = integrity.flip_bit(leaves[i], 5, flat_index=7, bit=3, devices=devices)
    injected.update(step=step, device=devices[5].id)
    return jax.tree_util.tree_unflatten(tree, leaves)

  with pytest.raises(trainer.TrainingStopped, match=r"stopped at step 4: silent data "
                     r"corruption: replicas that must be bit-identical differ: "
                     r"params/layers/0/self_attn/q_a_proj/kernel differs on device 5\. Not "
                     r"checkpointed. The newest checkpoint is step 2"):
    trainer.train(cfg, progress=False, log=lambda *_: None, after_step=flip_after_step_3)
  assert injected == {"step": 3, "device": 5}
  # Flipped after step 3 (no check), found by the check after step 4 (every 4 steps and before
  # each checkpoint): one step later, and step 4's checkpoint is not written.
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
