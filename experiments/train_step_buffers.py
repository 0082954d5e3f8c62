"""What the main job's train step keeps live at its memory peak, per device (issue 12).

The step's temporaries (XLA's `memory_analysis().temp_size_in_bytes`, x 32 devices: the largest
term of `make train`'s resident memory, results/train_memory.md) are one slab per device in which
XLA's buffer assignment places every intermediate value at an offset. This script compiles the
train step of configs/orion_4x8.py as the trainer builds it, with XLA's dump of that assignment
(`--xla_dump_to`, into a temporary directory), and reads two of its files:

* `...-buffer-assignment.txt`: every value of the preallocated-temp allocation, its bytes and
  its offset in the slab;
* `...-live-range.txt`: the program's instruction sequence and each value's live range in it.

The live bytes at each point of the sequence are the bytes of the slab covered by the values
live there (the union of their [offset, offset + size) ranges: a value updated in place, e.g. a
loop-carried buffer and the dynamic-update-slice that writes it, shares its bytes with another
and counts once); the peak is the largest. The buffers live at the peak (values with the same
offset and size counted once) are grouped by shape, and a shape is named by what produces it at
the main job's dims (R = 32 source devices x capacity rows received by a device's expert, plus
the grouped kernel's padding; T tokens per device, k experts per token).

Writes <--out>/train_step_buffers.{md,csv,png} (default results/).

    python experiments/train_step_buffers.py [--out results]
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20

_VALUE = re.compile(r"\s*value: <\d+ (\S+?)(\{[^}]*\})?(?: \(phi\))? @\d+> "
                    r"\(size=(\d+),offset=(\d+)\): (\S+)")
_RANGE = re.compile(r"\s+(\S+?\{[^}]*\}):(\d+)-(\d+)$")
_SEQ = re.compile(r"\s+(\d+):(\S+)$")


def temp_values(assignment_text: str) -> list[tuple[str, int, int, str]]:
  """(value name with its tuple index, bytes, offset in the slab, shape) of every value in the
  preallocated-temp allocation of an XLA `-buffer-assignment.txt` dump."""
  out, in_temp = [], False
  for line in assignment_text.splitlines():
    if line.startswith("allocation"):
      in_temp = "preallocated-temp" in line
      continue
    m = _VALUE.match(line) if in_temp else None
    if m:
      out.append((m.group(1) + (m.group(2) or "{}"), int(m.group(3)), int(m.group(4)),
                  m.group(5).split("{")[0]))
  return out


def live_ranges(live_range_text: str) -> tuple[list[str], dict[str, tuple[int, int]]]:
  """(instruction sequence, {value name with tuple index: (first, last) position}) of an XLA
  `-live-range.txt` dump."""
  seq, ranges = {}, {}
  for line in live_range_text.splitlines():
    m = _SEQ.match(line)
    if m:
      seq[int(m.group(1))] = m.group(2)
      continue
    m = _RANGE.match(line)
    if m:
      ranges[m.group(1)] = (int(m.group(2)), int(m.group(3)))
  return [seq[i] for i in range(len(seq))], ranges


def _union_bytes(spans) -> int:
  """Bytes covered by [start, end) spans."""
  total, reach = 0, -1
  for a, b in sorted(spans):
    if b > reach:
      total += b - max(a, reach)
      reach = b
  return total


def live_profile(values, ranges, n: int):
  """(slab bytes covered by live values at each of the n positions, peak position, [(name,
  bytes, offset, shape)] of the buffers live at the peak (one per offset and size), bytes of
  values without a live range)."""
  starts = collections.defaultdict(list)
  unplaced = 0
  for v in values:
    if v[0] not in ranges:
      unplaced += v[1]
      continue
    a, b = ranges[v[0]]
    starts[a].append((min(b, n - 1), v))
  live, active = [], []
  for t in range(n):
    active = [(b, v) for b, v in active if b >= t] + starts.get(t, [])
    live.append(_union_bytes((v[2], v[2] + v[1]) for _, v in active))
  peak = max(range(n), key=live.__getitem__)
  at_peak = {}
  for v in values:
    if v[0] in ranges and ranges[v[0]][0] <= peak <= ranges[v[0]][1]:
      at_peak.setdefault((v[2], v[1]), v)
  return live, peak, list(at_peak.values()), unplaced


def compile_main_job_step(dump_dir: str):
  """Builds configs/orion_4x8.py as dsv3-train does and compiles its train step with the XLA
  dump on; returns (job, memory analysis). Must run before jax is imported."""
  from dsv3_jax.train import memory
  os.environ["XLA_FLAGS"] = memory.xla_flags(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=32") + (
      f" --xla_dump_to={dump_dir} --xla_dump_hlo_module_re=.*train_step.*")
  sys.path.insert(0, ROOT)
  from configs import orion_4x8
  from dsv3_jax.train import trainer

  cfg = orion_4x8.get_config()
  job = trainer._build(cfg, trainer.validate(cfg), lambda *_: None)
  s = job.state
  compiled = job.fns.train_step.lower(s["params"], s["other"], s["opt_state"],
                                      job.put(job.dataset[0]), job.initial_capacity).compile()
  return job, compiled.memory_analysis()


def shape_names(job) -> dict[str, tuple[str, bool]]:
  """{shape: (what it is, whether its rows are the receive capacity)} for the MoE shapes of the
  main job's step (float32; the grouped kernel's window and tail window as `expert_compute`
  runs them in training)."""
  import inspect

  from dsv3_jax.model.experts import expert_compute, pad_rows

  kw = inspect.signature(expert_compute).parameters
  mc = job.model_cfg
  n_dev = job.n_dev
  cap = job.initial_capacity[0]
  r = n_dev * cap
  rp = r + pad_rows(r, kw["window"].default, kw["tail_window"].default)
  t = job.tokens_per_step // n_dev
  d, f, k = mc.hidden_size, mc.moe_intermediate_size, mc.num_experts_per_tok
  return {
      f"f32[{rp},{d}]": (f"MoE: a device's received rows sorted by expert, padded (R = {n_dev} "
                         f"x {cap} + {rp - r}), the kernel's input kept for the backward, and "
                         "its output / input gradient", True),
      f"f32[{rp},{f}]": ("MoE: the routed experts' gate and up pre-activations kept for the "
                         "backward", True),
      f"f32[{n_dev},{cap},{d}]": ("MoE: the all_to_all send / receive buffers", True),
      f"f32[{r},1,{d}]": ("MoE: the all_to_all receive buffer as rows", True),
      f"f32[{t},{k},{d}]": ("MoE: each token's k expert outputs, kept for the gate gradient",
                            False),
  }


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(ROOT, "results"), help="output folder")
  args = ap.parse_args(argv)
  try:  # a bad --out fails here, before the compile
    os.makedirs(args.out, exist_ok=True)
  except OSError as e:
    ap.error(f"--out={args.out}: {e.strerror}; allowed: a folder that can be created or "
             "written")
  with tempfile.TemporaryDirectory() as dump:
    job, mem = compile_main_job_step(dump)
    files = {kind: glob.glob(os.path.join(dump, f"*jit_train_step*after_optimizations-{kind}.txt"))
             for kind in ("buffer-assignment", "live-range")}
    if not all(len(v) == 1 for v in files.values()):
      raise RuntimeError(f"expected one train-step dump of each kind, got {files}")
    values = temp_values(open(files["buffer-assignment"][0]).read())
    seq, ranges = live_ranges(open(files["live-range"][0]).read())
  live, peak, at_peak, unplaced = live_profile(values, ranges, len(seq))
  names = shape_names(job)
  by_shape = collections.defaultdict(lambda: [0, 0])
  for _, size, _, shape in at_peak:
    by_shape[shape][0] += 1
    by_shape[shape][1] += size
  rows = sorted(by_shape.items(), key=lambda kv: -kv[1][1])
  moe = sum(b for s, (_, b) in rows if s in names)
  capacity_sized = sum(b for s, (_, b) in rows if s in names and names[s][1])
  total = sum(b for _, (_, b) in rows)
  base = os.path.join(args.out, "train_step_buffers")
  # The figure first and the .md last: the .md names the other two files.
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 3.5))
  ax.plot(range(len(live)), [b / MIB for b in live])
  ax.axvline(peak, color="gray", ls=":")
  ax.set_xlabel("position in the train step's instruction sequence")
  ax.set_ylabel("live temporaries per device (MiB)")
  ax.set_title("configs/orion_4x8.py train step: forward, then backward and update")
  fig.tight_layout()
  fig.savefig(base + ".png", dpi=120)
  with open(base + ".csv", "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["shape", "buffers_live_at_peak", "mib", "what"])
    for s, (c, b) in rows:
      w.writerow([s, c, f"{b / MIB:.3f}", names.get(s, ("",))[0]])
  top = rows[:12]
  lines = [
      "# Main job's train step: what is live at its memory peak, per device",
      "",
      "Generated by `experiments/train_step_buffers.py` (configs/orion_4x8.py, 32 emulated "
      "devices; XLA's buffer assignment and live ranges of the compiled train step, read from "
      "its `--xla_dump_to` dump). Per device: temporaries (XLA memory analysis) "
      f"{mem.temp_size_in_bytes / MIB:.1f} MiB, arguments {mem.argument_size_in_bytes / MIB:.1f} "
      f"MiB. The temp slab holds {len(values)} values; at the peak (position {peak} of "
      f"{len(seq)}, `{seq[peak]}`) {len(at_peak)} buffers are live (values that share an "
      f"offset and size, e.g. a buffer updated in place, counted once), {total / MIB:.1f} MiB "
      f"({live[peak] / MIB:.1f} MiB of the slab by their byte ranges; {unplaced / MIB:.1f} "
      "MiB of values have no live range in the dump).",
      "",
      f"The MoE shapes below hold {moe / MIB:.1f} MiB ({100 * moe / max(total, 1):.0f} %) at "
      f"the peak; {capacity_sized / MIB:.1f} MiB ({100 * capacity_sized / max(total, 1):.0f} "
      "%) are capacity-sized: their row count is the receive capacity, not the load (a device "
      "sizes its expert's buffers for 32 sources x the capacity, 3 x the balanced load, "
      "`model.capacity_factor`), so they scale with the capacity factor and with the "
      "activation dtype; the tokens' k expert outputs scale with the tokens. Everything else "
      "(attention and MLA activations kept for the backward, the dense layer, norms, the "
      "backward's working set) is the rest.",
      "",
      "| shape | buffers live at the peak | MiB | what |",
      "|---|---:|---:|---|",
  ]
  for s, (c, b) in top:
    lines.append(f"| `{s}` | {c} | {b / MIB:.2f} | {names.get(s, ('',))[0]} |")
  rest = rows[len(top):]
  lines.append(f"| {len(rest)} other shapes | {sum(c for _, (c, _) in rest)} | "
               f"{sum(b for _, (_, b) in rest) / MIB:.2f} | |")
  lines += ["", "Every shape: train_step_buffers.csv. Live bytes over the program: "
            "train_step_buffers.png.", ""]
  with open(base + ".md", "w") as fh:
    fh.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
