"""Where the main job's resident memory goes, and its step-time outliers (issue 12).

The main job is configs/orion_4x8.py: the tiny DeepSeek-V3 on the 4 x 8 emulated mesh, i.e.
32 CPU devices that are all slices of one process's memory. Two measurements, in child
processes so that nothing is shared between them:

1. The accounting, once per setting: the train state's bytes on the devices (a replicated leaf
   counts once per device), the host data, and XLA's memory analysis of every program the loop
   runs (train step, eval step, replica checksums): per-device argument, output, aliased
   (donated) and temporary bytes, times the devices.
2. Short `dsv3-train` runs (`--steps` steps, an evaluation and a checkpoint every `--every`) in
   a temporary workdir, once per setting. Each run's summary.json holds the phases of
   `dsv3_jax.train.memory.PhaseLog`: resident memory at the end of each phase, the peak during
   it (VmHWM, reset between phases, so the kernel's ru_maxrss of the child no longer holds
   the run's peak: the largest phase peak does), live device bytes, XLA compilations.

Settings: "before" (DSV3_MEMORY_DEFAULTS=1: glibc's allocator defaults, no malloc_trim, XLA's
default flags), "low memory" (DSV3_LOW_MEMORY=1: also `memory.configure_malloc`, fewer glibc
arenas and a fixed mmap threshold), "replicated optimizer" (the shipped settings with ZeRO-1,
`train.shard_optimizer_state`, off), "recomputation" (the shipped settings with `train.remat`:
each decoder block's forward rerun in the backward pass) and "shipped" (dsv3-train as it runs by default:
`memory.XLA_MEMORY_FLAGS` and `memory.trim` after compiling).

Writes results/train_memory.{md,csv,png} and the children's raw outputs to
results/train_memory.json; `--report-only` rewrites the .md / .csv / .png from that file.

    python experiments/train_memory.py [--steps 6] [--every 3] [--report-only]

Timings are wall clock on a shared machine: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "orion_4x8.py")
GIB, MIB = 2**30, 2**20
# (name, environment, train.* config overrides); the last one is what dsv3-train runs by default.
SETTINGS = (("before", {"DSV3_MEMORY_DEFAULTS": "1"}, {}),
            ("low memory", {"DSV3_LOW_MEMORY": "1"}, {}),
            ("replicated optimizer", {}, {"shard_optimizer_state": False}),
            ("recomputation", {}, {"remat": True}),
            ("shipped", {}, {}))
# Why a setting with config overrides may compute slightly different numbers.
DIFFERS_BECAUSE = {"replicated optimizer": "the gradients are summed in another order",
                   "recomputation": "XLA fuses the recomputed forward differently"}
OVERRIDES_ENV = "TRAIN_MEMORY_OVERRIDES"  # train.* overrides (JSON) for `_ACCOUNTING`, which
# reads the variable under this name

# The accounting child: builds the main job as the trainer does (same allocator and XLA flag
# settings as dsv3-train for the setting) and prints one JSON line.
_ACCOUNTING = r"""
import json, os
from dsv3_jax.train import memory
if memory.low_memory():
  memory.configure_malloc()
os.environ["XLA_FLAGS"] = memory.xla_flags("--xla_force_host_platform_device_count=32")
import jax
from configs import orion_4x8
from dsv3_jax.train import data as data_lib, integrity, trainer

cfg = orion_4x8.get_config()
cfg.train.update(json.loads(os.environ.get("TRAIN_MEMORY_OVERRIDES", "{}")))
job = trainer._build(cfg, trainer.validate(cfg), lambda *_: None)
s, w, c = job.state, job.put(job.dataset[0]), job.initial_capacity
leaves = jax.tree.leaves
on_devices = lambda t: sum(sh.data.nbytes for x in leaves(t) for sh in x.addressable_shards)
out = {"xla_flags": os.environ["XLA_FLAGS"], "devices": job.n_dev,
       "state": {k: [on_devices(v), sum(x.nbytes for x in leaves(v))] for k, v in s.items()},
       "host_data": int(job.windows.nbytes) + int(data_lib.load_corpus(
           cfg.data.paths, cfg.data.heldout_fraction, window=258).train.nbytes),
       "programs": {}}
checked = {"params": s["params"], "other": s["other"]}
checker = integrity.ReplicaChecker(checked, job.mesh)
programs = (
    ("train step", lambda: job.fns.train_step.lower(s["params"], s["other"], s["opt_state"],
                                                    w, c)),
    ("eval step", lambda: job.fns.eval_step.lower(s["params"], s["other"], w, c)),
    ("replica checksums", lambda: checker._fn.lower(*[x for _, x in
                                                      integrity.named_leaves(checked)])))
for name, lower in programs:
  before = memory.process_memory()["rss"]
  memory.reset_peak()
  m = lower().compile().memory_analysis()
  after = memory.process_memory()
  row = {k: int(getattr(m, k + "_in_bytes")) for k in
         ("argument_size", "output_size", "alias_size", "temp_size")}
  row["compile_peak_over_start"] = after["hwm"] - before
  out["programs"][name] = row
print(json.dumps(out))
"""


def start_accounting(settings) -> dict:
  """{setting: child process}, one per setting, started at once (they only compile)."""
  return {name: subprocess.Popen([sys.executable, "-c", _ACCOUNTING], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, **env,
                                          **{OVERRIDES_ENV: json.dumps(overrides)}))
          for name, env, overrides in settings}


def accounting(procs: dict) -> dict:
  """{setting: accounting} from the children of `start_accounting`."""
  out = {}
  for name, p in procs.items():
    stdout, stderr = p.communicate()
    if p.returncode:
      raise RuntimeError(f"accounting child ({name}) failed:\n{stderr[-3000:]}")
    out[name] = json.loads(stdout.strip().splitlines()[-1])
  return out


def train_run(env: dict, overrides: dict, steps: int, every: int) -> dict:
  """A short dsv3-train run of the main job (`overrides`: train.* fields); its summary.json."""
  with tempfile.TemporaryDirectory() as work:
    cmd = [os.path.join(os.path.dirname(sys.executable), "dsv3-train"), f"--config={CONFIG}",
           f"--config.train.steps={steps}", f"--config.train.eval_every={every}",
           f"--config.train.checkpoint_every={every}", f"--config.train.workdir={work}"]
    cmd += [f"--config.train.{k}={v}" for k, v in overrides.items()]
    with open(os.path.join(work, "log.txt"), "w") as log:
      status = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, **env)).returncode
    if status:
      with open(os.path.join(work, "log.txt")) as f:
        raise RuntimeError(f"dsv3-train failed ({status}):\n{f.read()[-3000:]}")
    with open(os.path.join(work, "summary.json")) as f:
      return json.load(f)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--every", type=int, default=3, help="eval and checkpoint interval")
  ap.add_argument("--out", default=os.path.join(ROOT, "results"))
  ap.add_argument("--report-only", action="store_true",
                  help="rewrite the report from <out>/train_memory.json (no runs)")
  args = ap.parse_args()
  if args.steps < 2 or args.every < 1 or args.every > args.steps:
    ap.error("--steps must be >= 2 and 1 <= --every <= --steps")
  raw_path = os.path.join(args.out, "train_memory.json")
  if args.report_only:
    if not os.path.exists(raw_path):
      ap.error(f"--report-only needs {raw_path} (written by a full run)")
    with open(raw_path) as f:
      raw = json.load(f)
  else:
    children, runs = start_accounting(SETTINGS), {}
    for name, env, overrides in SETTINGS:
      runs[name] = train_run(env, overrides, args.steps, args.every)
      print(f"{name}: peak {runs[name]['peak_rss_bytes'] / GIB:.2f} GiB", flush=True)
    raw = dict(steps=args.steps, every=args.every, load=os.getloadavg()[0],
               accounting=accounting(children), runs=runs)
    os.makedirs(args.out, exist_ok=True)
    with open(raw_path, "w") as f:
      json.dump(raw, f, indent=1)
  args.steps, args.every = raw["steps"], raw["every"]
  write(args, raw["accounting"], raw["runs"], raw["load"], raw.get("note", ""))


def write(args, acc: dict, runs: dict, load: float, note: str = "") -> None:
  names = [n for n, _, _ in SETTINGS]
  gib = lambda b: "n/a" if b is None else f"{b / GIB:.2f}"
  mib = lambda b: "n/a" if b is None else f"{b / MIB:.0f}"
  a0 = acc[names[-1]]
  n = a0["devices"]
  lines = [
      "# Main job: where the resident memory goes, and step-time outliers",
      "",
      f"Generated by `experiments/train_memory.py --steps {args.steps} --every {args.every}` "
      f"(configs/orion_4x8.py, {n} emulated devices in one process, {os.cpu_count()} CPU "
      f"cores, load average {load:.1f} at the end: timings are inflated by other jobs). "
      "\"before\": glibc's allocator defaults, no malloc_trim, XLA's default flags "
      "(DSV3_MEMORY_DEFAULTS=1); \"low memory\": also fewer glibc arenas and a fixed mmap "
      "threshold (DSV3_LOW_MEMORY=1, `memory.configure_malloc`); \"replicated optimizer\": "
      "the shipped settings with ZeRO-1 off (`--config.train.shard_optimizer_state=False`: "
      "every device keeps the Adam moments of every parameter it holds); \"recomputation\": "
      "the shipped settings with `--config.train.remat=True` (each decoder block's forward "
      "rerun in the backward pass, model.transformer.recomputed); \"shipped\": "
      "dsv3-train as it runs by default, ZeRO-1 on (configs/orion_4x8.py), malloc_trim after "
      "compiling "
      f"(dsv3_jax/train/memory.py; XLA flags `{' '.join(a0['xla_flags'].split()[1:])}`)."
      + (f" {note}" if note else ""),
      "",
      "## Peak resident memory of `dsv3-train`",
      "",
      "| setting | peak resident memory (GiB) | median step (s) | "
      "first step incl. compile (s) | slowest step / median | slowest iteration / median |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  fmt = lambda v, p=2: "n/a" if v is None else f"{v:.{p}f}"
  for name in names:
    s = runs[name]
    lines.append(f"| {name} | {gib(s.get('peak_rss_bytes'))} | "
                 f"{fmt(s['step_time_s'])} | {fmt(s['first_step_s'], 1)} | "
                 f"{fmt(s.get('slowest_step_over_median'))} | "
                 f"{fmt(s.get('slowest_iteration_over_median'))} |")
  # The allocator / XLA-flag settings change no computed value; ZeRO-1 off sums the gradients
  # in another order (train/zero1.py: "mesh" gradient sum), so it is compared by its difference.
  keys = ("loss", "mtp_loss", "grad_norm", "dropped_tokens")
  alloc = [nm for nm, _, overrides in SETTINGS if not overrides]
  other = [nm for nm, _, overrides in SETTINGS if overrides]
  same = all(runs[nm]["final"].get(k) == runs[alloc[0]]["final"].get(k)
             for nm in alloc for k in keys)
  same = same and len({runs[nm]["heldout_loss"] for nm in alloc}) == 1
  f0 = runs[alloc[0]]["final"]
  rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)
  diffs = {nm: max([rel(runs[nm]["final"][k], f0[k]) for k in keys[:3]] +
                   [rel(runs[nm]["heldout_loss"], runs[alloc[0]]["heldout_loss"])])
           for nm in other}
  lines += [
      "",
      f"Same values in the allocator settings ({', '.join(alloc)}): {'yes' if same else 'NO'} "
      f"(step {f0.get('step')}: train loss {f0.get('loss')!r}, MTP loss {f0.get('mtp_loss')!r}, "
      f"gradient norm {f0.get('grad_norm')!r}, held-out loss "
      f"{runs[alloc[0]]['heldout_loss']!r}; compared to the last digit). " +
      " ".join(f"{nm}: the same values to the last digit." if d == 0 else
               f"{nm}: largest relative difference from them {d:.1e} ({DIFFERS_BECAUSE[nm]})."
               for nm, d in diffs.items()),
      "",
      "## Per phase (PhaseLog in summary.json; repeated phases accumulate, peak = the "
      "largest)",
      "",
      "| phase | times | " + " | ".join(f"{nm}: RSS at end / peak (MiB)" for nm in names) +
      " | live device arrays (MiB) | XLA compilations | seconds (shipped) |",
      "|---|---:|" + "---:|" * len(names) + "---:|---:|---:|",
  ]
  phases = {nm: {p["name"]: p for p in runs[nm]["memory"]} for nm in names}
  rows = []
  for p in runs[names[-1]]["memory"]:
    cells = []
    for nm in names:
      q = phases[nm].get(p["name"])
      cells.append(f"{mib(q['rss'])} / {mib(q['peak'])}" if q else "n/a")
      if q:
        rows.append(dict(setting=nm, phase=p["name"], count=q["count"], rss_bytes=q["rss"],
                         peak_bytes=q["peak"], live_bytes=q["live"], compiles=q["compiles"],
                         seconds=q["seconds"]))
    lines.append(f"| {p['name']} | {p['count']} | " + " | ".join(cells) +
                 f" | {mib(p['live'])} | {p['compiles']} | {p['seconds']:.1f} |")
  lines += [
      "",
      "## The accounting (XLA memory analysis, per device; x devices for the process)",
      "",
      "| item | " + " | ".join(f"{nm} (MiB per device)" for nm in names) +
      f" | x {n} devices, shipped (GiB) |",
      "|---|" + "---:|" * len(names) + "---:|",
  ]
  lines.append("| host: training text + held-out windows (process) | " +
               " | ".join(f"{acc[nm]['host_data'] / MIB:.1f}" for nm in names) + " | |")
  for k in ("params", "other", "opt_state"):
    on_dev, one = a0["state"][k]
    lines.append(f"| state `{k}` on the devices (one copy: {one / MIB:.1f} MiB) | " +
                 " | ".join(f"{acc[nm]['state'][k][0] / n / MIB:.1f}" for nm in names) +
                 f" | {on_dev / GIB:.2f} |")
  for prog in a0["programs"]:
    for key, label in (("temp_size", "temporaries"), ("argument_size", "arguments"),
                       ("alias_size", "donated (aliased)")):
      lines.append(f"| {prog}: {label} | " +
                   " | ".join(f"{acc[nm]['programs'][prog][key] / MIB:.1f}" for nm in names) +
                   f" | {a0['programs'][prog][key] * n / GIB:.2f} |")
    lines.append(f"| {prog}: compile, peak RSS over its start (process, not per device) | " +
                 " | ".join(f"{acc[nm]['programs'][prog]['compile_peak_over_start'] / MIB:.0f}"
                            for nm in names) + " | |")
  tr = a0["programs"]["train step"]
  s_step = runs[names[-1]]["step_time_s"]
  state_b = sum(v[0] for v in a0["state"].values())
  floor = state_b + tr["temp_size"] * n
  peak = runs[names[-1]]["peak_rss_bytes"]
  lines += [
      "",
      f"The floor of the train step on this mesh: the state on the devices "
      f"{state_b / GIB:.2f} GiB (replicated leaves once per device) + the step's temporaries "
      f"{tr['temp_size'] / MIB:.1f} MiB x {n} devices = {tr['temp_size'] * n / GIB:.2f} GiB, "
      f"{floor / GIB:.2f} GiB ({floor / 1e9:.2f} GB) before any runtime, code or allocator "
      f"overhead; the shipped run peaks {(peak - floor) / GIB:.2f} GiB above it. With ZeRO-1 "
      "on (shipped) the largest term left is the train step's temporaries."]
  if "recomputation" in acc:
    rt = acc["recomputation"]["programs"]["train step"]["temp_size"]
    rfloor = state_b + rt * n
    rpeak = runs["recomputation"]["peak_rss_bytes"]
    lines[-1] += (
        f" Recomputation (`train.remat`) keeps only each block's input between the passes: "
        f"temporaries {rt / MIB:.1f} MiB per device, floor {rfloor / GIB:.2f} GiB "
        f"({rfloor / 1e9:.2f} GB), peak {rpeak / GIB:.2f} GiB "
        f"({(rpeak - peak) / peak:+.0%} against shipped) for a "
        f"{runs['recomputation']['step_time_s'] / s_step - 1:+.0%} median step "
        "(one more forward pass).")
  s = runs[names[-1]]
  lines += [
      "",
      f"Shipped run: median held-out evaluation {fmt(s.get('eval_s'))} s "
      f"({cfg_eval_batches()} forward passes of a full batch, so an iteration with an "
      f"evaluation is inherently longer than a train step; the slowest train step alone "
      f"excludes it), checkpoint save, blocking part {fmt(s.get('checkpoint_save_s'))} s, "
      f"replica check {fmt(s.get('sdc_check_s'))} s, compiling the eval and check programs "
      f"before the loop {fmt(s.get('warmup_s'), 1)} s.",
  ]
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, "train_memory")
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  keys = ["setting", "phase", "count", "rss_bytes", "peak_bytes", "live_bytes", "compiles",
          "seconds"]
  with open(base + ".csv", "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=keys)
    wr.writeheader()
    wr.writerows(rows)
    for nm in names:
      wr.writerow(dict(setting=nm, phase="whole run", peak_bytes=runs[nm]["peak_rss_bytes"]))
  plot(base + ".png", names, runs)
  print("\n".join(lines))
  print(f"wrote {base}.md, .csv, .png")


def cfg_eval_batches() -> int:
  sys.path.insert(0, ROOT)
  from configs import orion_4x8

  c = orion_4x8.get_config()
  return c.data.eval_sequences // c.train.batch_size


def plot(path: str, names: list, runs: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  order = [p["name"] for p in runs[names[-1]]["memory"]]
  fig, ax = plt.subplots(figsize=(8, 4))
  y = np.arange(len(order))
  h = 0.8 / len(names)
  for i, nm in enumerate(names):
    by = {p["name"]: p for p in runs[nm]["memory"]}
    ax.barh(y + i * h, [(by[o]["peak"] or 0) / GIB if o in by else 0 for o in order], h,
            label=f"{nm} (peak {runs[nm]['peak_rss_bytes'] / GIB:.2f} GiB)")
  ax.set_yticks(y + h * (len(names) - 1) / 2, order)
  ax.invert_yaxis()
  ax.axvline(3e9 / GIB, color="0.5", ls="--", lw=1, label="target 3 GB")
  ax.set_xlabel("peak resident memory during the phase (GiB)")
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
