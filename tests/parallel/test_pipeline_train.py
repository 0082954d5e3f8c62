"""`dsv3-train` runs configs/orion_pp.py (DualPipe, 4 stages x 2 nodes x 4 GPUs) like the main job."""

import json
import os
import subprocess
import sys

from dsv3_jax.parallel import pipeline_schedule as ps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dsv3_train_runs_the_pipeline_config(tmp_path):
  work = tmp_path / "run"
  # The config as shipped, cut short: 1 step of 32-token sequences, a small held-out set
  # (a step of this executor takes ~8 s here; the compile of the first ~42 s).
  cmd = [sys.executable, "-m", "dsv3_jax.train.cli", "--config=configs/orion_pp.py",
         "--config.train.steps=1", "--config.train.warmup_steps=1", "--config.train.log_every=1",
         "--config.train.checkpoint_every=1", "--config.data.seq_len=32",
         "--config.data.eval_sequences=64", f"--config.train.workdir={work}"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  steps = [r for r in rows if "loss" in r]
  assert [r["step"] for r in steps] == [1]
  table = ps.build_slot_table("DualPipe", 4, 8)
  for r in steps:  # what the executor measured, per stage
    assert r["idle_slots"] == list(table.simulated.bubble_per_rank)
    assert max(r["idle_slots"]) == 2  # DualPipe PP4: (PP/2-1)(F&B+B-3W) = 2 slots
    assert r["peak_activations"] == list(table.peak_per_rank["x"])
    assert max(r["peak_activations"]) == 5  # PP + 1
    assert r["schedule_mismatches"] == [0, 0, 0, 0]
    assert r["dropped_tokens"] >= 0 and r["grad_norm"] > 0
  assert json.load(open(work / "summary.json"))["heldout_loss"] > 0
  assert os.path.isdir(work / "checkpoints" / "1")
