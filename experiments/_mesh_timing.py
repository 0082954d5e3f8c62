"""The emulated-mesh side of benchmark_step.py: the main job's training step (configs/orion_4x8.py,
4 nodes x 8 GPUs = 32 emulated CPU devices, 32 sequences of 256 bytes) against the same model
trained on one device at the same global batch (32 sequences, the grouped dropless kernel), in
paired rounds inside one child process (the device count is fixed when jax starts). The child
builds the main job as dsv3-train does (trainer._build: ZeRO-1, the flat dispatch with capacity
96 per device pair, MTP depth 1, dsv3-train's XLA:CPU flags); the one-device step runs on the
child's first device. Both train `train_steps` untimed steps on the job's windows first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, os, sys, time
from dsv3_jax.train import memory
os.environ["XLA_FLAGS"] = memory.xla_flags("--xla_force_host_platform_device_count=32")
import jax, numpy as np
from flax import nnx
from configs import orion_4x8
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.train import trainer

rounds, steps, train_steps = (int(a) for a in sys.argv[1:4])
cfg = orion_4x8.get_config()
job = trainer._build(cfg, trainer.validate(cfg), lambda *_: None)
windows = [job.dataset[i] for i in range(train_steps + rounds * steps)]

class Mesh:
  name = "mesh"
  def __init__(self):
    self.state = (job.state["params"], job.state["other"], job.state["opt_state"])
    t = time.perf_counter()
    self.fn = job.fns.train_step.lower(*self.state, job.put(windows[0]),
                                       job.initial_capacity).compile()
    self.compile_s = time.perf_counter() - t
  def step(self, w):
    *st, m = self.fn(*self.state, job.put(w))
    self.state = tuple(st)
    return st, m

class One:
  name = "one device"
  def __init__(self):
    mc = ModelConfig.from_dict(cfg.model.to_dict())
    graphdef, params, other = nnx.split(Transformer(mc, rngs=nnx.Rngs(cfg.train.seed)),
                                        nnx.Param, ...)
    opt = trainer.make_optimizer(cfg.train)
    self.state = (params, other, opt.init(params))
    fns = trainer.make_step_fns(graphdef, opt, mc, cfg.train, 256, donate=True)
    t = time.perf_counter()
    self.fn = fns.train_step.lower(*self.state, jax.numpy.asarray(windows[0]), (1,)).compile()
    self.compile_s = time.perf_counter() - t
  def step(self, w):
    *st, m = self.fn(*self.state, jax.numpy.asarray(w))
    self.state = tuple(st)
    return st, m

progs = [Mesh(), One()]
for p in progs:
  for w in windows[:train_steps]:
    out = p.step(w)
  jax.block_until_ready(out)
times = {p.name: [] for p in progs}
i = train_steps
rows = []
for r in range(rounds):
  med = {}
  for p in (progs if r % 2 == 0 else progs[::-1]):
    ts = []
    for w in windows[i:i + steps]:
      t = time.perf_counter()
      jax.block_until_ready(p.step(w))
      ts.append(time.perf_counter() - t)
    times[p.name] += ts
    med[p.name] = float(np.median(ts))
  i += steps
  rows.append(dict(round=r + 1, mesh_step_s=med["mesh"], one_device_step_s=med["one device"],
                   ratio=med["one device"] / med["mesh"]))
  print(json.dumps(dict(progress=rows[-1])), flush=True)
print(json.dumps(dict(
    rounds=rows, batch=int(cfg.train.batch_size), devices=int(job.n_dev),
    compile_s={p.name: p.compile_s for p in progs},
    step_s={k: float(np.median(v)) for k, v in times.items()},
    peak_rss_bytes=memory.process_memory()["hwm"])))
"""


def measure_mesh(rounds: int, steps: int, train_steps: int, log=print) -> dict:
  """Runs the child; returns its result: rounds (per round: mesh_step_s, one_device_step_s,
  ratio = one-device median step / mesh median step, i.e. the mesh's tokens/s over the
  one-device tokens/s at the same global batch), batch, devices, compile_s and step_s per
  program ('mesh', 'one device'), and the child's peak_rss_bytes.

  Raises:
    RuntimeError: the child failed (its stderr's tail in the message).
  """
  p = subprocess.Popen([sys.executable, "-c", _CHILD, str(rounds), str(steps), str(train_steps)],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  result = None
  for line in p.stdout:
    if not line.startswith("{"):
      continue
    out = json.loads(line)
    if "progress" in out:
      r = out["progress"]
      log(f"mesh round {r['round']}: 4x8 mesh {r['mesh_step_s'] * 1e3:.0f} ms, one device "
          f"{r['one_device_step_s'] * 1e3:.0f} ms per step = {r['ratio']:.2f}x")
    else:
      result = out
  err = p.stderr.read()
  if p.wait() or result is None:
    raise RuntimeError(f"mesh timing child failed ({p.returncode}):\n{err[-3000:]}")
  return result
