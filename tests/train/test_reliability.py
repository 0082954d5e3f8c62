"""Reliability of the training job: non-finite steps, strict JSON, settings, damaged checkpoints,
the resume contract, small user data, replica checks (SDC)."""

import json
import os

import numpy as np
import pytest
from tiny_run import (ONE_MOE_LAYER, ROOT, data_file, flip_12_bytes, launch_command,
                      small_corpus, tiny_cfg, worker_pids)

from configs import tiny
from dsv3_jax.train import trainer

QUIET = dict(progress=False, log=lambda *_: None)


def _tiny_cfg(tmp_path, **train):
  """The small model of tests/train/tiny_run.py (2 layers, hidden 64, 8 experts), 4 steps with
  checkpoints at 2 and 4."""
  return tiny_cfg(tmp_path, eval_sequences=8, **{
      **dict(steps=4, warmup_steps=1, log_every=1, eval_every=4, checkpoint_every=2), **train})


def _strict(text: str):
  """json.loads that rejects NaN / Infinity (as strict parsers do)."""
  def bad(token):
    raise ValueError(f"non-standard JSON token {token}")
  return json.loads(text, parse_constant=bad)


def _rows(workdir):
  return [_strict(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def test_nonfinite_steps_are_skipped_then_stop_and_no_nan_checkpoint(tmp_path):
  # Learning rate 1e6 (the case): the loss turns NaN after a few steps.
  cfg = _tiny_cfg(tmp_path, learning_rate=1e6, warmup_steps=0, steps=12, checkpoint_every=2,
                  log_every=1, eval_every=100, max_nonfinite_steps=2)
  cfg.model.update(ONE_MOE_LAYER)
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


def test_a_workdir_that_is_a_file_is_refused_and_left_alone(tmp_path):
  cfg = _tiny_cfg(tmp_path)
  path = tmp_path / "run"
  path.write_text("notes")
  with pytest.raises(ValueError, match=r"train.workdir=.* exists and is not a directory"):
    trainer.train(cfg, **QUIET)
  assert path.read_text() == "notes"


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


_data_file = data_file


def _truncate(p):
  f = _data_file(p)
  os.truncate(f, os.path.getsize(f) // 2)


def _overwrite(p):
  f = _data_file(p)
  open(f, "wb").write(np.random.default_rng(0).bytes(os.path.getsize(f)))


_flip12 = flip_12_bytes


def _no_state(p):
  import shutil

  shutil.rmtree(os.path.join(p, "state"))


def _garble_meta(p):
  open(os.path.join(p, "meta", "metadata"), "w").write('{"step": 4, "capac')


def _garble_state_metadata(p):
  open(os.path.join(p, "state", "_METADATA"), "w").write("\x00garbage")


def _stale_state(p):
  """Step 2's state under step 4's metadata: every file reads back, only the checksums can
  tell."""
  import shutil

  shutil.rmtree(os.path.join(p, "state"))
  shutil.copytree(os.path.join(os.path.dirname(p), "2", "state"), os.path.join(p, "state"))


@pytest.mark.parametrize("damage,item,reason", [
    (_truncate, "state", ""), (_overwrite, "state", ""), (_flip12, "state", ""),
    (_no_state, "state", ""), (_garble_meta, "meta", ""), (_garble_state_metadata, "state", ""),
    (_stale_state, "state", "content checksum mismatch in ")])
def test_a_damaged_checkpoint_is_named_set_aside_and_the_older_one_restored(
    trained_run, tmp_path, damage, item, reason):
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
  assert f"checkpoint step 4 in {work}/checkpoints is damaged (item '{item}': {reason}" in warning
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


def test_resuming_on_other_text_is_refused_unless_opted_in_and_then_recorded(trained_run,
                                                                             tmp_path):
  from dsv3_jax.train import resume

  cfg, _, _ = trained_run
  c, work = _copy_run(cfg, tmp_path)
  stored = json.loads((work / resume.DATA).read_text())
  assert stored["train_files"] > 0 and len(stored["sha256"]) == 64
  # The same data.paths with other text under them: here the record of a run that read one
  # byte more (as if a file had grown since the checkpoints were written).
  other = dict(stored, train_bytes=stored["train_bytes"] - 1, sha256="0" * 64)
  (work / resume.DATA).write_text(json.dumps(other))
  before = {p: (work / p).read_bytes() for p in ("config.json", "metrics.jsonl", resume.DATA)}
  with pytest.raises(ValueError, match=r"the text under data.paths is not the text its "
                     r"checkpoints were trained on .*allow_config_change=True"):
    trainer.train(c, **QUIET)
  assert {p: (work / p).read_bytes() for p in before} == before  # nothing written
  c.train.allow_config_change = True
  trainer.train(c, **QUIET)  # finished: resumes, trains nothing
  hist = resume.read_history(str(work))
  assert list(hist[-1]["changes"]) == ["data (the text read)"]
  assert json.loads((work / resume.DATA).read_text()) == stored


def test_loading_a_step_without_a_checkpoint_names_the_steps_there(trained_run):
  cfg, _, _ = trained_run
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3 under .*; allowed "
                     r"steps: 2, 4"):
    trainer.load_trained(cfg.train.workdir, step=3)


def test_the_data_fingerprint_sees_a_file_added_under_the_same_path(tmp_path):
  from dsv3_jax.train import data as data_lib, resume

  folder = tmp_path / "text"
  folder.mkdir()
  for i in range(3):
    (folder / f"f{i}.txt").write_text(f"file {i}: " + "the quick brown fox " * 200)
  fp = lambda: resume.data_fingerprint(data_lib.load_corpus((str(folder),), 0.05, window=66))
  a = fp()
  assert fp() == a  # deterministic
  (folder / "f3.txt").write_text("one more file " * 100)
  b = fp()
  assert b["sha256"] != a["sha256"] and b["train_bytes"] > a["train_bytes"]


def test_after_a_crash_metrics_have_one_row_per_step_and_resume_is_bit_identical(
    trained_run, tmp_path):
  from dsv3_jax.train.metrics import read_metrics

  cfg, _, summary = trained_run
  c, work = _copy_run(cfg, tmp_path)
  first = read_metrics(str(work / "metrics.jsonl"))
  # A crash mid-way through a metrics line, and step 4's checkpoint with 12 flipped bytes
  # (found, set aside: the run resumes from step 2). The read itself may fail (a corrupt
  # compressed chunk) or the checksums catch it, depending on which bytes lie in the middle of
  # the data file, and that is not the same in every run (once, under load, the message was not
  # the checksum one): either way the step is named damaged. The checksum path on its own:
  # `_stale_state` in test_a_damaged_checkpoint_is_named_set_aside_and_the_older_one_restored.
  _flip12(str(work / "checkpoints" / "4"))
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "loss": 2.')
  said = []
  s = trainer.train(c, progress=False, log=said.append)
  assert any(f"checkpoint step 4 in {work}/checkpoints is damaged (item 'state'" in l
             for l in said), said
  assert s["resumed_from"] == 2 and s["checkpoint_restore_s"] > 0
  assert summary["checkpoint_save_s"] > 0
  rows = [_strict(l) for l in open(work / "metrics.jsonl")]  # no garbled line left
  train_rows = [r["step"] for r in rows if "loss" in r]
  assert train_rows == [1, 2, 3, 4]
  assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in first if "loss" in r]
  assert s["heldout_loss"] == summary["heldout_loss"]


def test_a_single_small_file_trains(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("a single small file of my own text, a few windows long. " * 6)  # 336 bytes
  cfg = _tiny_cfg(tmp_path, steps=1, eval_every=1, checkpoint_every=1)
  cfg.model.update(ONE_MOE_LAYER)
  cfg.data.paths = (str(text),)
  said = []
  s = trainer.train(cfg, progress=False, log=said.append)
  assert np.isfinite(s["heldout_loss"]) and any("split within files" in l for l in said)
  # summary.json is strict JSON: one step leaves no timed step after the compiled one (null).
  summary = _strict((tmp_path / "run" / "summary.json").read_text())
  assert summary["step_time_s"] is None and summary["heldout_loss"] == s["heldout_loss"]
  _rows(cfg.train.workdir)


# ----------------------------------------------------------------------------- SDC


def test_a_bit_flip_in_one_replica_is_found_and_stops_the_run_before_the_checkpoint(tmp_path):
  # A 4-device (1 x 4) mesh of the 32 the test session emulates: small, and with a majority
  # among the replicas to single out the flipped one (the 32-device main job runs the same
  # check; results/reliability_cost.md).
  import jax

  from dsv3_jax.train import integrity

  cfg = _tiny_cfg(tmp_path, steps=6, checkpoint_every=2, log_every=1, eval_every=6,
                  sdc_check_every=4)
  cfg.mesh.nodes, cfg.mesh.gpus_per_node = 1, 4
  cfg.model.update(ONE_MOE_LAYER)
  cfg.model.update(dict(n_group=2, topk_group=1, num_experts_per_tok=2))
  injected = {}

  def flip_after_step_3(step, state):
    if step != 3:
      return state
    leaves, tree = jax.tree_util.tree_flatten(state)
    names = [n for n, _ in integrity.named_leaves(state)]
    i = names.index("params/layers/0/self_attn/q_a_proj/kernel")
    devices = list(leaves[i].sharding.mesh.devices.reshape(-1))
    leaves[i] = integrity.flip_bit(leaves[i], 1, flat_index=7, bit=3, devices=devices)
    injected.update(step=step, device=devices[1].id)
    return jax.tree_util.tree_unflatten(tree, leaves)

  with pytest.raises(trainer.TrainingStopped, match=r"stopped at step 4: silent data "
                     r"corruption: replicas that must be bit-identical differ: "
                     r"params/layers/0/self_attn/q_a_proj/kernel differs on device 1\. Not "
                     r"checkpointed. The newest checkpoint is step 2"):
    trainer.train(cfg, progress=False, log=lambda *_: None, after_step=flip_after_step_3)
  assert injected == {"step": 3, "device": 1}
  # Flipped after step 3 (no check), found by the check after step 4 (every 4 steps and before
  # each checkpoint): one step later, and step 4's checkpoint is not written.
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]


# ----------------------------------------------------------------------------- kill -9


def test_kill_9_then_the_same_command_resumes_bit_identically(tmp_path):
  """A launched training worker killed with SIGKILL mid-run (the launcher names it and exits
  non-zero); the same command resumes from the newest checkpoint and recomputes the steps the
  killed run had logged after it bit for bit. (Two processes: test_multiprocess_training.py.)"""
  import signal
  import subprocess
  import time

  from dsv3_jax.train.metrics import read_metrics

  work = tmp_path / "run"
  c = _tiny_cfg(tmp_path, steps=8, checkpoint_every=3, eval_every=8)
  c.model.update(ONE_MOE_LAYER)
  c.data.paths = (small_corpus(tmp_path),)
  cmd = launch_command(c, tmp_path / "logs")
  # Both runs share a compilation cache: the rerun loads the first run's executables.
  env = dict(os.environ, XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  metrics, ckpts = work / "metrics.jsonl", work / "checkpoints"
  deadline = time.time() + 540
  while time.time() < deadline and first.poll() is None:
    steps = [r["step"] for r in read_metrics(str(metrics)) if "loss" in r]
    done = [int(n) for n in os.listdir(ckpts) if n.isdigit()] if ckpts.is_dir() else []
    if done and steps and steps[-1] >= max(done) + 1 and steps[-1] < 8:
      break
    time.sleep(0.05)
  worker = worker_pids(tmp_path / "logs")
  assert list(worker) == [0] and first.poll() is None, first.communicate()
  os.kill(worker[0], signal.SIGKILL)
  out, err = first.communicate(timeout=60)
  assert first.returncode != 0 and "process 0 of 1" in err and "killed by signal SIGKILL" in err
  before = {r["step"]: r["loss"] for r in read_metrics(str(metrics)) if "loss" in r}
  # Rerun the same command: resumes from the newest checkpoint and finishes.
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  summary = json.loads(again.stdout)["results"][0]
  start = summary["resumed_from"]
  assert start > 0 and summary["steps"] == 8
  after = {r["step"]: r["loss"] for r in read_metrics(str(metrics)) if "loss" in r}
  assert sorted(after) == list(range(1, 9))  # one row per step
  redone = [s for s in before if s > start]
  assert redone and all(after[s] == before[s] for s in before)  # bit-identical
