"""Training across 2 launched processes x 2 CPU devices on one global 2 x 2 (node, gpu) mesh
(issue 11, "Multi-process faults"): an uninterrupted run, then `kill -9` of one worker mid-run
stops both within a bound with a message naming it, and rerunning the same command resumes
from the newest checkpoint and reproduces the uninterrupted run's losses bit for bit, with one
metrics row per step."""

import json
import os
import signal
import subprocess
import time

import pytest
from tiny_run import (ONE_MOE_LAYER, ROOT, flip_12_bytes, launch_command, small_corpus,
                      tiny_cfg, worker_pids)

from dsv3_jax.train.metrics import read_metrics

STEPS = 8  # checkpoints at 3, 6 and 8
STOP_BOUND_S = 30.0  # kill -9 of one worker -> the launcher has exited (measured: see report)


def _cfg(tmp_path, workdir):
  c = tiny_cfg(tmp_path, eval_sequences=8, steps=STEPS, warmup_steps=1, log_every=1,
               eval_every=STEPS, checkpoint_every=3, sdc_check_every=3)
  c.train.workdir = str(workdir)
  c.mesh.nodes, c.mesh.gpus_per_node = 2, 2
  c.model.update(ONE_MOE_LAYER)
  c.model.update(dict(n_group=2, topk_group=1, num_experts_per_tok=2))
  c.data.paths = (small_corpus(tmp_path),)
  return c


def _launch(cfg, log_dir, **kw):
  # One log directory for every run: the launcher keeps the compilation cache there, so the
  # later runs load process 0's executables instead of compiling again.
  return launch_command(cfg, log_dir, devices=4, processes=2, **kw)


ENV = dict(os.environ, XLA_FLAGS="")


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 2-process run: (cfg maker, log dir, its summaries, its losses)."""
  tmp = tmp_path_factory.mktemp("mp")
  cfg = _cfg(tmp, tmp / "reference")
  r = subprocess.run(_launch(cfg, tmp / "logs"), cwd=ROOT, env=ENV, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  return tmp, json.loads(r.stdout)["results"], _losses(cfg.train.workdir)


def test_two_processes_train_one_job_and_only_process_0_writes(reference):
  tmp, results, losses = reference
  assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
  same = ("heldout_loss", "capacity", "sdc_checks", "nonfinite_steps")
  assert {k: results[0][k] for k in same} == {k: results[1][k] for k in same}
  assert results[0]["final"]["loss"] == results[1]["final"]["loss"]  # one job, not two
  s = results[0]
  assert s["devices"] == 4 and s["resumed_from"] == 0 and s["sdc_checks"] == 3
  assert s["final"]["dropped_tokens"] == 0 and s["final"]["skipped"] == 0
  work = tmp / "reference"
  assert sorted(os.listdir(work / "checkpoints")) == ["6", "8"]  # max_to_keep=2
  # One writer: every row once, one TensorBoard file, one history row.
  rows = read_metrics(str(work / "metrics.jsonl"))
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
  assert len([f for f in os.listdir(work) if f.startswith("events.out.tfevents")]) == 1
  assert len(open(work / "run_history.jsonl").readlines()) == 1


def test_kill_9_of_one_worker_stops_both_and_the_same_command_resumes_bit_identically(
    reference):
  tmp, ref_results, ref_losses = reference
  cfg = _cfg(tmp, tmp / "killed")
  cmd = _launch(cfg, tmp / "logs")
  first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  work = tmp / "killed"
  ckpts = work / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and first.poll() is None:
    steps = sorted(_losses(str(work)))
    done = [int(n) for n in os.listdir(ckpts) if n.isdigit()] if ckpts.is_dir() else []
    if done and steps and steps[-1] >= max(done) + 1 and steps[-1] < STEPS:
      break
    time.sleep(0.05)
  pids = worker_pids(tmp / "logs")
  assert sorted(pids) == [0, 1] and first.poll() is None, first.communicate()
  os.kill(pids[1], signal.SIGKILL)  # process 1: process 0 is left waiting in a collective
  killed_at = time.time()
  out, err = first.communicate(timeout=120)
  stop_s = time.time() - killed_at
  assert first.returncode != 0
  assert f"process 1 of 2 (pid {pids[1]}) was killed by signal SIGKILL" in err, err[-3000:]
  assert stop_s < STOP_BOUND_S, stop_s
  assert not any(os.path.exists(f"/proc/{p}") and
                 open(f"/proc/{p}/stat").read().split()[2] != "Z" for p in pids.values())
  before = _losses(str(work))
  newest = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
  assert 0 < newest < max(before) < STEPS  # steps after the newest checkpoint are lost

  again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-4000:]
  results = json.loads(again.stdout)["results"]
  assert results[0]["resumed_from"] == results[1]["resumed_from"] == newest
  after = _losses(str(work))
  assert sorted(after) == list(range(1, STEPS + 1))  # one row per step
  assert after == ref_losses  # bit for bit, the lost steps recomputed included
  assert all(before[s] == ref_losses[s] for s in before)
  assert results[0]["heldout_loss"] == ref_results[0]["heldout_loss"]
  print(f"kill -9 of process 1 -> launcher exited after {stop_s:.1f} s; resumed at step "
        f"{newest}, killed run had logged {max(before)}")


def test_a_damaged_newest_checkpoint_is_set_aside_by_both_processes_and_the_older_resumed(
    reference):
  import shutil

  tmp, _, ref_losses = reference
  work = tmp / "damaged"
  shutil.copytree(tmp / "reference", work)
  flip_12_bytes(str(work / "checkpoints" / "8"))  # found by the all-gathered checksums
  r = subprocess.run(_launch(_cfg(tmp, work), tmp / "logs"), cwd=ROOT, env=ENV,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  results = json.loads(r.stdout)["results"]
  assert results[0]["resumed_from"] == results[1]["resumed_from"] == 6
  for i in (0, 1):
    log = (tmp / "logs" / f"process_{i}.log").read_text()
    assert f"checkpoint step 8 in {work}/checkpoints is damaged (item 'state'" in log, log[-3000:]
    assert "falling back to step 6" in log
    # The all-device group of the damage check's gather, created before the restore (without
    # it the first process there waited > gloo's ~30 s for the other under the suite's load).
    assert "warm-up of the node+gpu communicators (4 members each)" in log, log[-3000:]
  assert (work / "checkpoints_damaged" / "8").is_dir()  # moved once, by process 0
  assert sorted(os.listdir(work / "checkpoints")) == ["6", "8"]  # step 8 written again
  assert _losses(str(work)) == ref_losses  # steps 7 and 8 recomputed bit for bit
