"""The small training config of the tests in tests/train/ and the launcher command that runs it
in worker processes (`dsv3_jax.cluster.launch` + `dsv3_jax.train.cli:train_target`)."""

import json
import os
import sys

from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# 2 layers (the first dense), hidden 64, 8 routed experts of width 32, top-4, sequence 64.
MODEL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_hidden_layers=2,
             max_position_embeddings=64)

# The smallest program with expert-parallel dispatch: one MoE layer and no MTP module, for the
# tests whose subject is the job around the model (compile time dominates them).
ONE_MOE_LAYER = dict(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)


def tiny_cfg(tmp_path, *, eval_sequences: int = 16, **train):
  """configs/tiny.py at the `MODEL` size: seq_len 64, batch 8, learning rate 3e-3, workdir
  `<tmp_path>/run`; `train` overrides train.* fields (steps, log_every, ...)."""
  c = tiny.get_config()
  c.model.update(MODEL)
  c.data.seq_len = 64
  c.data.eval_sequences = eval_sequences
  c.train.update(dict(batch_size=8, steps=30, warmup_steps=5, log_every=10, eval_every=30,
                      checkpoint_every=15, workdir=str(tmp_path / "run"), learning_rate=3e-3))
  c.train.update(train)
  return c


def small_corpus(tmp_path, lines: int = 400) -> str:
  """A text file of its own for launched workers (no standard-library scan in each one)."""
  text = tmp_path / "text.txt"
  text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                          for i in range(lines)))
  return str(text)


def launch_command(cfg, log_dir, *, devices: int = 1, processes: int = 1,
                   timeout_s: int = 600) -> list:
  """`python -m dsv3_jax.cluster.launch run ...` training `cfg` (every model / data / train /
  mesh field passed as an override of configs/tiny.py) in `processes` workers."""
  overrides = {f"{s}.{k}": v for s in ("model", "data", "train", "mesh")
               for k, v in cfg[s].items() if not isinstance(v, (list, tuple)) and v is not None}
  if cfg.data.paths:
    overrides["data.paths"] = list(cfg.data.paths)
  kwargs = json.dumps({"config": os.path.join(ROOT, "configs", "tiny.py"),
                       "overrides": overrides})
  return [sys.executable, "-m", "dsv3_jax.cluster.launch", "run", "--devices", str(devices),
          "--processes", str(processes), "--target", "dsv3_jax.train.cli:train_target",
          "--kwargs", kwargs, "--log-dir", str(log_dir), "--timeout", str(timeout_s)]


def worker_pids(log_dir) -> dict:
  """{process id: pid} of the running launched workers whose command line names `log_dir`."""
  out = {}
  for p in os.listdir("/proc"):
    if not p.isdigit():
      continue
    try:
      cmd = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
    except OSError:
      continue
    args = [a.decode(errors="replace") for a in cmd]
    if "worker" in args and any(str(log_dir) in a for a in args):
      i = int(args[args.index("--process-id") + 1]) if "--process-id" in args else 0
      out[i] = int(p)
  return out


def data_file(step_dir) -> str:
  """The largest data file of a checkpoint step's `state` item (orbax OCDBT: under a `d/`
  folder; one per writing process in a multi-process checkpoint)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep or
           os.path.basename(d) == "d"]
  return max(files, key=os.path.getsize)


def flip_12_bytes(step_dir) -> None:
  """Inverts 12 bytes in the middle of `data_file(step_dir)` (the issue's damage)."""
  f = data_file(step_dir)
  with open(f, "rb") as fh:
    b = bytearray(fh.read())
  mid = len(b) // 2
  for i in range(mid, mid + 12):
    b[i] ^= 0xFF
  with open(f, "wb") as fh:
    fh.write(bytes(b))
