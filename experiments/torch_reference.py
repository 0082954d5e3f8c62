"""The PyTorch reference training step: Hugging Face transformers `DeepseekV3ForCausalLM`.

Run by `experiments/benchmark_step.py` (its paired rounds) as a subprocess of a separate
virtual environment that has torch and transformers (the project's own dependencies stay as they
are); it imports neither jax nor dsv3_jax. Create that environment with

    python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.14.0 transformers==5.24.0

(`.venv-torch` is git-ignored; `--torch-python` / $DSV3_TORCH_PYTHON point elsewhere).

Protocol (worker mode): `torch_reference.py CONFIG_JSON DATA_NPY` builds the model from the
Hugging Face config dict (`dsv3_jax.convert.hf.config_to_hf` of the same `ModelConfig`), float32,
`sdpa` attention and `grouped_mm` experts when available, AdamW with the project's
hyper-parameters and global-norm clipping, torch threads = CPU count; then reads commands from
stdin, one per line:

    train N   N untimed steps (realistic routing, as the project's untimed steps)
    time N    N steps, each timed (wall clock and process CPU time)
    quit

and answers each with one JSON line on stdout ({"wall": [...], "cpu": [...]} for `time`).
The token windows [n, B, S + 1 (+ extra)] int32 come from DATA_NPY (the project's data
pipeline, so both programs train on the same bytes); step i uses window i mod n. Loss: mean
cross-entropy of next-token prediction over the B x S positions (HF has no MTP module).
"""

from __future__ import annotations

import json
import os
import sys
import time


def _step_fn(model, opt, seq_len, clip):
  import torch
  import torch.nn.functional as F

  def step(w):
    inp, tgt = w[:, :seq_len], w[:, 1:seq_len + 1]
    logits = model(input_ids=inp).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return float(loss.detach())

  return step


def worker(config_path: str, data_path: str) -> None:
  import numpy as np
  import torch
  import transformers
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

  with open(config_path) as f:
    spec = json.load(f)
  hf, train = spec["hf_config"], spec["train"]
  torch.manual_seed(0)
  torch.set_num_threads(int(spec.get("threads") or os.cpu_count()))
  cfg = DeepseekV3Config(**hf)
  kw = dict(attn_implementation="sdpa")
  try:
    model = DeepseekV3ForCausalLM._from_config(cfg, experts_implementation="grouped_mm", **kw)
  except (TypeError, ValueError, KeyError):
    model = DeepseekV3ForCausalLM._from_config(cfg, **kw)
  model = model.float().train()
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([dict(params=decay, weight_decay=train["weight_decay"]),
                           dict(params=no_decay, weight_decay=0.0)], lr=train["learning_rate"],
                          betas=(train["b1"], train["b2"]))
  windows = torch.from_numpy(np.load(data_path).astype(np.int64))
  step = _step_fn(model, opt, int(spec["seq_len"]), float(train["grad_clip_norm"]))
  i = 0
  info = dict(torch=torch.__version__, transformers=transformers.__version__,
              threads=torch.get_num_threads(),
              experts=getattr(model.config, "_experts_implementation", None),
              attention=getattr(model.config, "_attn_implementation", None),
              params=sum(p.numel() for p in model.parameters()))
  print(json.dumps(dict(ready=info)), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd:
      continue
    if cmd[0] == "quit":
      break
    n = int(cmd[1])
    wall, cpu, loss = [], [], None
    for _ in range(n):
      w = windows[i % len(windows)]
      i += 1
      t, c = time.perf_counter(), time.process_time()
      loss = step(w)
      wall.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
    import resource
    out = dict(loss=loss, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if cmd[0] == "time":
      out.update(wall=wall, cpu=cpu)
    print(json.dumps(out), flush=True)


class TorchReference:
  """Drives a `worker` subprocess from the project's environment (see the module docstring)."""

  def __init__(self, python: str, model_cfg, train_cfg, seq_len: int, windows, tmpdir: str):
    import subprocess

    import numpy as np

    from dsv3_jax.convert.hf import config_to_hf
    hf = config_to_hf(model_cfg)
    hf["num_nextn_predict_layers"] = 0  # HF builds no MTP module
    spec = dict(hf_config=hf, seq_len=seq_len, threads=os.cpu_count(),
                train={k: float(train_cfg[k]) for k in ("learning_rate", "weight_decay", "b1",
                                                       "b2", "grad_clip_norm")})
    cfg_path, data_path = os.path.join(tmpdir, "hf_config.json"), os.path.join(tmpdir,
                                                                               "windows.npy")
    with open(cfg_path, "w") as f:
      json.dump(spec, f)
    np.save(data_path, np.asarray(windows, np.int32))
    self.proc = subprocess.Popen([python, os.path.abspath(__file__), cfg_path, data_path],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = self._read()["ready"]

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the torch reference exited (code {self.proc.wait()})")
    return json.loads(line)

  def command(self, cmd: str, n: int) -> dict:
    self.proc.stdin.write(f"{cmd} {n}\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
    except OSError:
      pass
    self.proc.wait(timeout=60)


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  worker(sys.argv[1], sys.argv[2])
