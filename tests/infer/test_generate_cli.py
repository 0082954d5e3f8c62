"""`dsv3-generate`: streams the greedy completion of a checkpoint; bad settings stop with a
message naming the option before anything is loaded or run."""

import io
import json
import os
import re

import numpy as np
import pytest

from dsv3_jax.infer import cli

REF = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "hf_deepseek_v3", "tiny")


def test_generate_from_a_hugging_face_checkpoint_prints_the_greedy_completion(capsys):
  ref = np.load(os.path.join(REF, "generation.npz"))
  prompt, tokens = ref["prompt_1"], ref["tokens_1"][:12]
  out = io.StringIO()
  rc = cli.main(["--hf", REF, "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", "12", "--page-size", "32"], out=out)
  assert rc == 0
  assert out.getvalue() == bytes(tokens.tolist()).decode("utf-8", errors="replace") + "\n"
  assert "12 tokens" in capsys.readouterr().err


def test_a_fresh_dsv3_generate_sets_up_its_own_mesh():
  # A new process with no XLA_FLAGS: the command emulates the --nodes x --gpus-per-node devices
  # itself (importing infer.cli must not start jax) and prints the reference's greedy tokens.
  import subprocess
  import sys
  ref = np.load(os.path.join(REF, "generation.npz"))
  prompt, tokens = ref["prompt_1"], ref["tokens_1"][:8]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-m", "dsv3_jax.infer.cli", "--hf", REF, "--prompt-ids",
                        ",".join(map(str, prompt)), "--max-new-tokens", "8", "--nodes", "4",
                        "--gpus-per-node", "2"], env=env, capture_output=True, timeout=600)
  assert out.returncode == 0, out.stderr.decode()[-2000:]
  assert out.stdout.decode() == bytes(tokens.tolist()).decode("utf-8", errors="replace") + "\n"


@pytest.mark.parametrize("args,match", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be a positive"),
    (["--prompt", "x", "--top-p", "2"], r"--top-p must be in \(0, 1\]"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
    (["--prompt", "x", "--nodes", "0"], "--nodes"),
    (["--prompt", "x", "--speculative-depth", "-1"], "--speculative-depth must be >= 0"),
    (["--prompt", "x", "--speculative-depth", "1", "--temperature", "0.5"], "greedy only"),
])
def test_bad_settings_name_the_option(args, match, capsys):
  assert cli.main(["--hf", REF] + args) == 2
  assert re.search(match, capsys.readouterr().err)


def test_a_workdir_without_checkpoint_is_refused(tmp_path, capsys):
  assert cli.main(["--workdir", str(tmp_path), "--prompt", "x"]) == 2
  assert "no config.json" in capsys.readouterr().err
  (tmp_path / "config.json").write_text(json.dumps({}))
  assert cli.main(["--workdir", str(tmp_path), "--prompt", "x"]) == 2
  assert "no checkpoint" in capsys.readouterr().err
  # --dtype is for Hugging Face checkpoints; with a run it is refused, not ignored.
  assert cli.main(["--workdir", str(tmp_path), "--prompt", "x", "--dtype", "bfloat16"]) == 2
  assert "--dtype bfloat16 applies to --hf checkpoints only" in capsys.readouterr().err


def test_requests_and_meshes_the_model_cannot_take_are_refused_before_loading(capsys,
                                                                             monkeypatch):
  # Read from the checkpoint's config.json: no weights are loaded for these.
  from dsv3_jax.infer.engine import Engine

  def no_loading(*a, **k):
    raise AssertionError("the checkpoint was loaded before the settings were checked")

  monkeypatch.setattr(Engine, "from_hf", no_loading)
  cases = [
      (["--prompt", "x" * 257], "--prompt: the prompt has 257 tokens, more than the model's "
                                "max_position_embeddings=256; allowed: 1..256"),
      (["--prompt-ids", "300"], r"--prompt-ids: prompt token id\(s\) \[300\] outside the "
                                r"vocabulary; allowed: 0..255"),
      (["--prompt", "x", "--stop-ids", "256"], r"--stop-ids: stop token\(s\) \[256\] outside"),
      (["--prompt", "x", "--nodes", "3"],
       r"--nodes 3 x --gpus-per-node 1 = 3 devices do not divide the model's 16 routed experts "
       r"\(n_routed_experts\); allowed device counts: \[1, 2, 4, 8, 16\]"),
      (["--prompt", "x", "--nodes", "8"],
       r"--nodes 8: the model routes over n_group=4 expert groups, one per node .*allowed: "
       r"--nodes 1 or --nodes 4"),
      (["--prompt", "x", "--top-k", "1000", "--temperature", "1"],
       r"--top-k 1000 exceeds the model's vocabulary; allowed: 0..256"),
      (["--prompt", "x", "--num-pages", "1", "--max-new-tokens", "100"],
       r"--num-pages 1 holds 16 tokens, too few .*allowed: --num-pages >= 7"),
      # the reference checkpoints have no MTP module
      (["--prompt", "x", "--speculative-depth", "1"],
       r"--speculative-depth 1: the checkpoint has 0 MTP module\(s\).*allowed: 0$"),
  ]
  for args, match in cases:
    assert cli.main(["--hf", REF] + args) == 2, args
    assert re.search(match, capsys.readouterr().err), args


def test_bad_steps_and_sampling_settings_are_refused_before_loading(tmp_path, capsys):
  # a run directory with checkpoints at steps 3 and 5 only (nothing is loaded)
  (tmp_path / "config.json").write_text(json.dumps({"model": {}}))
  for step in ("3", "5"):
    (tmp_path / "checkpoints" / step).mkdir(parents=True)
  assert cli.main(["--workdir", str(tmp_path), "--prompt", "x", "--step", "4"]) == 2
  assert "--step 4: no checkpoint at that step" in capsys.readouterr().err
  assert cli.main(["--hf", REF, "--prompt", "x", "--step", "4"]) == 2
  assert "--step 4 applies to --workdir runs only" in capsys.readouterr().err
  for t in ("nan", "inf"):
    assert cli.main(["--hf", REF, "--prompt", "x", "--temperature", t]) == 2
    assert "--temperature must be a finite number >= 0" in capsys.readouterr().err
  # bytes the shell could not decode
  assert cli.main(["--hf", REF, "--prompt", "\udcff\udcfe"]) == 2
  assert "--prompt is not valid UTF-8" in capsys.readouterr().err
