"""What the reliability checks cost on the main job's state (configs/orion_4x8.py, 32 emulated
devices): checkpoint save (with the per-leaf BLAKE2b checksums) and restore (with their
verification), and one replica check for silent data corruption (params + router biases).

    python experiments/reliability_cost.py [--repeats 3]

Prints the seconds and writes results/reliability_cost.md. The state is the freshly initialised
one (sizes and layout are those of training; values do not change the cost).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from dsv3_jax.parallel.mesh import set_host_device_count

set_host_device_count(32)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import orion_4x8  # noqa: E402
from dsv3_jax.train import integrity, trainer  # noqa: E402
from dsv3_jax.train.checkpoint import Checkpointer  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  cfg = orion_4x8.get_config()
  job = trainer._build(cfg, trainer.validate(cfg), lambda *_: None)
  state = job.state
  n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  checked = trainer._checked(state)
  checker = integrity.ReplicaChecker(checked, job.mesh)
  checker.check(checked)  # compile
  rows = {"save (blocking, incl. checksums)": [], "checksums (within save)": [],
          "save until on disk": [], "restore + verify": [], "verify (within restore)": [],
          "replica check (SDC), params + biases": []}
  for i in range(a.repeats):
    work = tempfile.mkdtemp(prefix="dsv3_ckpt_cost_")
    try:
      ck = Checkpointer(work, save_every=1)
      t0 = time.perf_counter()
      ck.save(1, state, {"step": 1, "capacity": [1]}, force=True)
      rows["save (blocking, incl. checksums)"].append(ck.save_s)
      rows["checksums (within save)"].append(ck.checksum_s)
      ck.wait()
      rows["save until on disk"].append(time.perf_counter() - t0)
      ck.restore(1, state)
      rows["restore + verify"].append(ck.restore_s)
      rows["verify (within restore)"].append(ck.verify_s)
      ck.close()
    finally:
      shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    checker.check(checked)
    rows["replica check (SDC), params + biases"].append(time.perf_counter() - t0)
  lines = [f"# Reliability costs, main job state ({n_bytes / 2**20:.0f} MiB, 32 devices)", "",
           "Written by `experiments/reliability_cost.py`; median of "
           f"{a.repeats} (seconds, on this machine at the time of the run).", "",
           "| what | seconds (median) | min | max |", "|---|---:|---:|---:|"]
  for k, v in rows.items():
    lines.append(f"| {k} | {np.median(v):.3f} | {min(v):.3f} | {max(v):.3f} |")
    print(f"{k}: {np.median(v):.3f} s (min {min(v):.3f}, max {max(v):.3f})")
  out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results",
                     "reliability_cost.md")
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
