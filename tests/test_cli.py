"""`dsv3-train` end to end in a subprocess (it sets the emulated device count itself)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
  env = dict(os.environ, XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "dsv3_jax.train.cli", *args], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=900)


def test_bad_config_exits_with_a_message_and_writes_nothing(tmp_path):
  work = tmp_path / "run"
  r = _run([f"--config={ROOT}/configs/orion_4x8.py", "--config.model.topk_group=6",
            f"--config.train.workdir={work}"], tmp_path)
  assert r.returncode == 2
  assert "model.topk_group=6 must be <= model.n_group=4" in r.stderr
  assert not work.exists()


def test_a_mesh_size_below_one_is_refused_before_jax_starts(tmp_path):
  work = tmp_path / "run"
  r = _run([f"--config={ROOT}/configs/tiny.py", "--config.mesh.nodes=0",
            f"--config.train.workdir={work}"], tmp_path)
  assert r.returncode == 2
  assert r.stderr.strip() == "dsv3-train: error: mesh.nodes must be a positive integer, got 0"
  assert not work.exists()


def test_main_job_config_runs_on_32_emulated_devices_on_a_data_folder_from_the_command_line(
    tmp_path):
  import sysconfig

  # One run (each costs a jax import and a compile) for three subjects: the main job's config
  # on 32 emulated devices, a data folder given as `--config.data.paths` (README, Configs), and
  # the per-phase memory log dsv3-train starts before its imports (train/memory.py). 64-byte
  # sequences: a step of 256 took 4.4 s here, of 64 1.9 s (the same programs, smaller).
  work = tmp_path / "run"
  stdlib = sysconfig.get_paths()["stdlib"]
  r = _run([f"--config={ROOT}/configs/orion_4x8.py", "--config.train.steps=2",
            "--config.train.log_every=1", "--config.train.eval_every=2",
            "--config.data.seq_len=64", "--config.data.eval_sequences=32",
            f"--config.data.paths=('{stdlib}',)",
            f"--config.train.workdir={work}"], tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "held-out loss" in r.stdout
  summary = json.load(open(work / "summary.json"))
  assert summary["devices"] == 32 and summary["steps"] == 2
  config = json.load(open(work / "config.json"))
  assert config["data"]["paths"] == [stdlib]
  phases = {p["name"]: p for p in summary["memory"]}
  assert {"imports", "mesh + model init", "first train step (compile + run)",
          "held-out evaluation", "checkpoint save (blocking part)"} <= set(phases)
  assert phases["first train step (compile + run)"]["compiles"] >= 1
  assert summary["peak_rss_bytes"] == max(p["peak"] for p in summary["memory"]) > 0


def test_own_data_paths_override_from_the_command_line(tmp_path):
  # `--config.data.paths` takes a tuple of files or folders (README, Configs); a missing one
  # stops before anything is written, with the trainer's message.
  work = tmp_path / "run"
  r = _run([f"--config={ROOT}/configs/tiny.py", "--config.data.paths=('/no/such/texts',)",
            f"--config.train.workdir={work}"], tmp_path)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "data.paths: '/no/such/texts' does not exist" in r.stderr
  assert not work.exists()


def test_help_prints_usage_and_the_config_fields(tmp_path):
  r = _run(["--help"], tmp_path)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("usage: dsv3-train --config=CONFIG.py")
  for field in ("train.learning_rate = 0.003", "model.rope_theta = 10000.0",
                "train.max_nonfinite_steps = 3", "data.paths = None"):
    assert field in r.stdout
  r = _run([f"--config={ROOT}/configs/orion_4x8.py", "--help"], tmp_path)
  assert r.returncode == 0 and "mesh.nodes = 4" in r.stdout


def test_missing_config_file_and_misspelt_key_give_one_line(tmp_path):
  work = tmp_path / "run"
  r = _run(["--config=configs/nope.py", f"--config.train.workdir={work}"], tmp_path)
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert "config file 'configs/nope.py' not found" in r.stderr
  r = _run([f"--config={ROOT}/configs/tiny.py", "--config.train.lerning_rate=1",
            f"--config.train.workdir={work}"], tmp_path)
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert ("--config.train.lerning_rate=1: there is no setting 'lerning_rate' (did you mean "
          "'learning_rate'?)") in r.stderr
  r = _run([f"--config={ROOT}/configs/tiny.py", "--config.train.b2=1.0",
            f"--config.train.workdir={work}"], tmp_path)
  assert r.returncode == 2 and "train.b2=1.0; allowed: [0, 1)" in r.stderr
  r = _run([f"--config={ROOT}/configs/tiny.py", "--config.train.remat=yes",
            f"--config.train.workdir={work}"], tmp_path)
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert ("--config.train.remat=yes is not a boolean; allowed: True, False (also true, false, "
          "1, 0)") in r.stderr
  assert not work.exists()
