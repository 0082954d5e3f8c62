"""Training-step throughput of the tiny DeepSeek-V3 (configs/tiny.py dims) on this machine, and
its ratio to the PyTorch reference (Hugging Face transformers `DeepseekV3ForCausalLM`).

The comparison point: 8 sequences of 256 bytes, float32, dropless routing, AdamW, one device.
Each variant is compiled, then `--train-steps` untimed steps train on real data (the default
corpus) so that the timed steps see a realistically unbalanced router (byte-level text routes
~29 % of tokens, the spaces, alike); the PyTorch reference (experiments/torch_reference.py, run
in its own virtual environment) trains the same number of steps on the same windows. Then
`--rounds` paired rounds: in each, every program runs `--steps` steps timed one by one (wall
clock, synchronised, and process CPU time), the order alternating between rounds. The machine
is shared, so only ratios within a round mean much: each round's ratio is the reference's median
step time over the project's (> 1: the project is faster), and the table reports the median over
rounds. The MTP variant (depth 1, as trained) is compared with the same reference (HF has no
MTP module). A third variant compiles the no-MTP step with XLA:CPU's default options (YNNPACK)
instead of the training step's `step.TRAIN_CPU_OPTIONS`, and a fourth with those options but
LLVM at XLA's default -O3 instead of -O2 (`xla_cpu.LLVM_O2`): the A/B of each choice in the same
rounds. Then `--mesh-rounds` paired rounds of the main job's step on the emulated 4 x 8 mesh
against the same model on one device at the same global batch (experiments/_mesh_timing.py).
Prints and writes compile time, step time, tokens/s, peak resident memory and the ratios to
results/benchmark_step.{md,csv,png} (per round: benchmark_step_rounds.csv).

    python experiments/benchmark_step.py [--rounds 5] [--steps 5] [--train-steps 20]
        [--mesh-rounds 3] [--quick] [--no-torch] [--torch-python .venv-torch/bin/python]

Without the torch environment it says how to create it and exits with status 2 (--no-torch
times the project alone).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile

import _step_timing as T
from dsv3_jax import xla_cpu  # does not import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The versions the issues measured the reference with (an older torch is slower here).
TORCH_VENV_HELP = ("python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.14.0 "
                   "transformers==5.24.0")

VARIANTS = (
    # (name, model overrides, XLA:CPU options instead of step.TRAIN_CPU_OPTIONS (None = those;
    # {} = XLA's defaults))
    ("tiny, no MTP (equal-size comparison)", dict(num_nextn_predict_layers=0), None),
    ("tiny + MTP depth 1 (as trained)", dict(num_nextn_predict_layers=1), None),
    ("tiny, no MTP, XLA:CPU defaults (YNNPACK dots and reductions)",
     dict(num_nextn_predict_layers=0), {}),
    ("tiny, no MTP, LLVM -O3 (XLA's default level)", dict(num_nextn_predict_layers=0),
     dict(xla_cpu.NO_YNNPACK)),
)
# The mesh comparison (experiments/_mesh_timing.py): timed steps per program and round, and
# untimed steps first (a mesh step takes seconds here).
MESH_STEPS, MESH_TRAIN_STEPS = 3, 3
TORCH_NAME = "PyTorch reference (HF DeepseekV3ForCausalLM, no MTP)"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  T.add_args(ap)
  ap.set_defaults(steps=5, train_steps=20)
  ap.add_argument("--rounds", type=int, default=5, help="paired rounds (>= 1)")
  ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  ap.add_argument("--mesh-rounds", type=int, default=3,
                  help="paired rounds of the 4 x 8 mesh against one device (0 = skip)")
  ap.add_argument("--torch-python", default=os.environ.get(
      "DSV3_TORCH_PYTHON", os.path.join(ROOT, ".venv-torch", "bin", "python")),
                  help="python of the environment with torch and transformers")
  ap.add_argument("--out", default=os.path.join(ROOT, "results"), help="results folder")
  args = T.parse_args(ap)
  if args.quick:
    args.rounds = min(args.rounds, 2)
    args.mesh_rounds = min(args.mesh_rounds, 1)
  if args.rounds < 1:
    ap.error("--rounds must be >= 1")
  if args.mesh_rounds < 0:
    ap.error("--mesh-rounds must be >= 0")
  if not args.no_torch and not os.path.exists(args.torch_python):
    print(f"the PyTorch reference needs a separate environment with torch and transformers; "
          f"{args.torch_python} does not exist. Create it from the checkout with\n\n    "
          f"{TORCH_VENV_HELP}\n\nor pass --torch-python PATH, or --no-torch.", file=sys.stderr)
    sys.exit(2)

  import jax
  import numpy as np
  from torch_reference import TorchReference

  sessions = []
  for name, overrides, cpu_options in VARIANTS:
    s = T.StepSession(overrides, args.batch, cpu_options=cpu_options)
    print(f"{name}: compiled in {s.compile_s:.1f} s", flush=True)
    s.run(args.train_steps, timed=False)  # realistic routing state
    sessions.append((name, s))
  ref = None
  tmp = tempfile.TemporaryDirectory()
  if not args.no_torch:
    s0 = sessions[0][1]
    n_win = args.train_steps + args.rounds * args.steps
    ref = TorchReference(args.torch_python, s0.model_cfg, s0.train_cfg, T.SEQ_LEN,
                         s0.windows(n_win), tmp.name)
    print(f"{TORCH_NAME}: torch {ref.info['torch']}, transformers {ref.info['transformers']}, "
          f"{ref.info['threads']} threads, attention {ref.info['attention']}, experts "
          f"{ref.info['experts']}, {ref.info['params']} parameters", flush=True)
    ref.command("train", args.train_steps)

  programs = [n for n, _ in sessions] + ([TORCH_NAME] if ref else [])
  wall = {n: [] for n in programs}
  cpu = {n: [] for n in programs}
  round_rows = []
  torch_rss = 0
  for r in range(args.rounds):
    order = programs if r % 2 == 0 else programs[::-1]
    load = os.getloadavg()[0]  # the other jobs' load at the round's start (1-minute average)
    med = {}
    for n in order:
      if n == TORCH_NAME:
        out = ref.command("time", args.steps)
        w, c = out["wall"], out["cpu"]
        torch_rss = max(torch_rss, out["peak_rss_bytes"])
      else:
        w, c = dict(sessions)[n].run(args.steps)
      wall[n] += w
      cpu[n] += c
      med[n] = (float(np.median(w)), float(np.median(c)))
    line = [f"round {r + 1} (load {load:.1f}):"]
    for n in programs:
      row = dict(round=r + 1, program=n, load_1min=load, step_s=med[n][0],
                 step_cpu_s=med[n][1], tokens_per_s=args.batch * T.SEQ_LEN / med[n][0])
      if ref and n != TORCH_NAME:
        row["ratio_to_torch"] = med[TORCH_NAME][0] / med[n][0]
        row["cpu_ratio_to_torch"] = med[TORCH_NAME][1] / med[n][1]
        line.append(f"{n.split(' (')[0]} {row['tokens_per_s']:.0f} tok/s = "
                    f"{row['ratio_to_torch']:.2f}x torch (CPU time {row['cpu_ratio_to_torch']:.2f}x)")
      elif n == TORCH_NAME:
        line.append(f"torch {row['tokens_per_s']:.0f} tok/s")
      round_rows.append(row)
    print(" | ".join(line), flush=True)
  if ref:
    ref.close()
  mesh = None
  if args.mesh_rounds:
    from _mesh_timing import measure_mesh
    mesh = measure_mesh(args.mesh_rounds, MESH_STEPS, MESH_TRAIN_STEPS,
                        log=lambda m: print(m, flush=True))

  rows = []
  for n in programs:
    ws, cs = wall[n], cpu[n]
    mw = float(np.median(ws))
    row = dict(variant=n, compile_s=dict(sessions)[n].compile_s if n != TORCH_NAME else
               float("nan"), step_s=mw, step_min_s=float(np.min(ws)),
               step_cpu_s=float(np.median(cs)), tokens_per_s=args.batch * T.SEQ_LEN / mw)
    if n != TORCH_NAME:
      m = dict(sessions)[n].metrics
      row.update(load_max_over_mean=float(m["expert_load_max_over_mean"]),
                 dropped=float(m["dropped_tokens"]))
      rr = [x for x in round_rows if x["program"] == n and "ratio_to_torch" in x]
      if rr:
        row.update(ratio_to_torch_median=float(np.median([x["ratio_to_torch"] for x in rr])),
                   ratio_to_torch_min=float(np.min([x["ratio_to_torch"] for x in rr])),
                   ratio_to_torch_max=float(np.max([x["ratio_to_torch"] for x in rr])),
                   cpu_ratio_to_torch_median=float(np.median(
                       [x["cpu_ratio_to_torch"] for x in rr])))
    rows.append(row)
  peak = T.peak_rss_bytes()
  for r in rows:
    print(f"{r['variant']}: compile {r['compile_s']:.1f} s | step {r['step_s'] * 1e3:.0f} ms "
          f"(min {r['step_min_s'] * 1e3:.0f}, CPU {r['step_cpu_s'] * 1e3:.0f}) | "
          f"{r['tokens_per_s']:.0f} tokens/s" +
          (f" | {r['ratio_to_torch_median']:.2f}x torch (median of {args.rounds} rounds)"
           if "ratio_to_torch_median" in r else ""), flush=True)
  print(f"peak resident memory: this process (the JAX variants) {peak / 2**30:.2f} GiB" +
        (f", torch reference {torch_rss / 2**30:.2f} GiB" if ref else ""), flush=True)

  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, "benchmark_step")
  keys = ["variant", "compile_s", "step_s", "step_min_s", "step_cpu_s", "tokens_per_s",
          "load_max_over_mean", "dropped", "ratio_to_torch_median", "ratio_to_torch_min",
          "ratio_to_torch_max", "cpu_ratio_to_torch_median"]
  if mesh:
    one_tok = mesh["batch"] * T.SEQ_LEN / mesh["step_s"]["one device"]
    for name, prog in (("4x8 emulated mesh, main job's step (orion_4x8)", "mesh"),
                       ("one device, main job's model at its global batch", "one device")):
      rows.append(dict(variant=name, compile_s=mesh["compile_s"][prog],
                       step_s=mesh["step_s"][prog],
                       tokens_per_s=mesh["batch"] * T.SEQ_LEN / mesh["step_s"][prog]))
    print(f"4x8 mesh: {rows[-2]['tokens_per_s']:.0f} tokens/s = "
          f"{rows[-2]['tokens_per_s'] / one_tok:.2f}x one device at batch {mesh['batch']} "
          f"(median per-round ratio "
          f"{float(np.median([x['ratio'] for x in mesh['rounds']])):.2f}; target >= 0.8)",
          flush=True)
  with open(base + ".csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows([{k: r.get(k, "") for k in keys} for r in rows])
  rkeys = ["round", "program", "load_1min", "step_s", "step_cpu_s", "tokens_per_s",
           "ratio_to_torch", "cpu_ratio_to_torch"]
  with open(base + "_rounds.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=rkeys)
    w.writeheader()
    w.writerows([{k: r.get(k, "") for k in rkeys} for r in round_rows])
  machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}"
  torch_s = (f"; reference: torch {ref.info['torch']}, transformers {ref.info['transformers']}, "
             f"attention `{ref.info['attention']}`, experts `{ref.info['experts']}`, "
             f"{ref.info['threads']} threads" if ref else "")
  fmt = lambda v, p=1: "" if v is None or v != v else f"{v:.{p}f}"
  lines = [
      "# Training-step throughput, tiny config",
      "",
      f"Generated by `experiments/benchmark_step.py --rounds {args.rounds} --steps {args.steps} "
      f"--train-steps {args.train_steps} --batch {args.batch}"
      f"{' --no-torch' if not ref else ''}` on {machine}{torch_s}.",
      f"{args.batch} sequences x 256 bytes per step, float32, dropless, AdamW, one device; "
      f"{args.train_steps} untimed training steps first (realistic routing), then "
      f"{args.rounds} rounds of {args.steps} timed steps per program, alternating. Step = "
      "median over all timed steps (wall clock); ratio = the reference's median step over "
      "the project's within each round (> 1: faster than PyTorch), median [min, max] over "
      "rounds; CPU ratio the same with process CPU time (the machine is shared: CPU time is "
      "less disturbed by the other jobs' load). "
      f"1-minute load average at the rounds' starts: {load_range(round_rows)} (0 = no other "
      "job; only rounds at a similar load compare).",
      "",
      "| variant | compile (s) | step (ms) | CPU / step (ms) | tokens/s | x PyTorch (rounds) "
      "| x PyTorch, CPU time | expert load max/mean | dropped |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows[:len(programs)]:
    ratio = (f"{r['ratio_to_torch_median']:.2f} [{r['ratio_to_torch_min']:.2f}, "
             f"{r['ratio_to_torch_max']:.2f}]" if "ratio_to_torch_median" in r else "")
    lines.append(f"| {r['variant']} | {fmt(r['compile_s'])} | {r['step_s'] * 1e3:.0f} | "
                 f"{r['step_cpu_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} | {ratio} | "
                 f"{fmt(r.get('cpu_ratio_to_torch_median'), 2)} | "
                 f"{fmt(r.get('load_max_over_mean'), 2)} | {fmt(r.get('dropped'), 0)} |")
  lines += ["", f"Peak resident memory: this process (the JAX variants compiled and trained) "
            f"{peak / 2**30:.2f} GiB" + (f"; the PyTorch reference {torch_rss / 2**30:.2f} GiB."
                                         if ref else "."),
            ""] + (mesh_lines(mesh, args.mesh_rounds) if mesh else []) + [
            "Per round: results/benchmark_step_rounds.csv. Where the time goes: "
            "results/profile_step.md (`experiments/profile_step.py`)."]
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 3))
  ax.barh([r["variant"] for r in rows], [r["tokens_per_s"] for r in rows],
          color=["C0"] * len(sessions) + (["0.6"] if ref else []) + ["C1"] * (len(rows)
                                                                        - len(programs)))
  ax.set_xlabel("tokens / s (tiny config, 8 x 256, fp32; median step)")
  ax.invert_yaxis()
  fig.tight_layout()
  fig.savefig(base + ".png", dpi=120)
  print(f"wrote {base}.md, .csv, _rounds.csv, .png")


def load_range(round_rows: list) -> str:
  """'a' or 'a-b': the range of the rounds' 1-minute load averages (one decimal)."""
  loads = sorted({round(r["load_1min"], 1) for r in round_rows})
  return f"{loads[0]:.1f}" if len(loads) == 1 else f"{loads[0]:.1f}-{loads[-1]:.1f}"


def mesh_lines(mesh: dict, rounds: int) -> list:
  """The results section of the mesh comparison (`_mesh_timing.measure_mesh`'s result)."""
  import numpy as np
  ratios = [r["ratio"] for r in mesh["rounds"]]
  lines = [
      "## The emulated 4 x 8 mesh against one device, same global batch",
      "",
      f"`experiments/_mesh_timing.py`, one child process with {mesh['devices']} emulated CPU "
      f"devices and dsv3-train's XLA flags: the main job's training step (configs/orion_4x8.py: "
      f"ZeRO-1, flat dispatch with capacity, MTP depth 1) and the same model on the child's "
      f"first device (dropless grouped kernel), {mesh['batch']} sequences x 256 bytes each, "
      f"{MESH_TRAIN_STEPS} untimed steps, then {rounds} rounds of {MESH_STEPS} timed steps "
      "per program, alternating. Ratio = the one-device median step over the mesh's (the "
      "mesh's tokens/s as a fraction of one device's; target >= 0.8).",
      "",
      "| program | compile (s) | step (ms) | tokens/s |",
      "|---|---:|---:|---:|"]
  for name, prog in (("4x8 emulated mesh (32 devices)", "mesh"), ("one device", "one device")):
    st = mesh["step_s"][prog]
    lines.append(f"| {name} | {mesh['compile_s'][prog]:.1f} | {st * 1e3:.0f} | "
                 f"{mesh['batch'] * 256 / st:.0f} |")
  lines += ["", f"Mesh / one device, per round: " + ", ".join(f"{r:.2f}" for r in ratios) +
            f"; median {float(np.median(ratios)):.2f}. Peak resident memory of the child "
            f"(both programs compiled and trained): {mesh['peak_rss_bytes'] / 2**30:.2f} GiB.",
            ""]
  return lines


if __name__ == "__main__":
  main()
