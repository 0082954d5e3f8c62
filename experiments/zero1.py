"""ZeRO-1 on the main job's mesh (configs/orion_4x8.py, 4 nodes x 8 GPUs = 32 devices): the
optimizer-state bytes per device measured from the arrays against the formula of
`dsv3_jax.analysis.memory`, and the same training steps with and without ZeRO-1 (losses, their
largest difference, step time), for the "mesh" and "per_axis" gradient sums.

Writes results/zero1.{md,csv,png}.

    .venv/bin/python experiments/zero1.py             # the state bytes only (no step)
    .venv/bin/python experiments/zero1.py --steps 20 [--grad-sums mesh,per_axis]

Each run is `dsv3_jax.train.trainer.train` of configs/orion_4x8.py cut to `--steps` steps (the
learning-rate schedule follows the step count; warmup 12 as in the main job), logging every
step, no replica check (ZeRO-1 defeats it: README, "Reliability"), one checkpoint at the end,
in a temporary workdir. The state bytes are read with the `after_step` hook after step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

NAME = "zero1"


def run(grad_sum: str, on: bool, steps: int, workdir: str) -> dict:
  """One training run; returns its per-step losses, step time and state bytes per device."""
  from configs import orion_4x8
  from dsv3_jax.train import trainer, zero1
  from dsv3_jax.train.metrics import read_metrics

  cfg = orion_4x8.get_config()
  cfg.train.update(dict(steps=max(steps, 1), log_every=1, eval_every=max(steps, 1),
                        checkpoint_every=max(steps, 1),
                        sdc_check_every=0, shard_optimizer_state=on, workdir=workdir))
  cfg.train.grad_sum = grad_sum
  seen = {}
  if steps == 0:  # the state only: built and placed as the trainer does, no step compiled
    job = trainer._build(cfg, trainer.validate(cfg), lambda *_: None)
    return dict(grad_sum=grad_sum, zero1=on, losses=[], step_s=None, first_step_s=None,
                wall_s=None, opt_bytes=sorted(set(zero1.bytes_per_device(
                    job.state["opt_state"]).values())),
                param_bytes=sorted(set(zero1.bytes_per_device(job.state["params"]).values())))

  def after_step(step, state):
    if step == 1:
      seen["opt"] = zero1.bytes_per_device(state["opt_state"])
      seen["params"] = zero1.bytes_per_device(state["params"])
    return state

  t0 = time.perf_counter()
  summary = trainer.train(cfg, progress=False, log=lambda *_: None, after_step=after_step)
  rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  return dict(grad_sum=grad_sum, zero1=on, losses=[r["loss"] for r in rows],
              step_s=summary["step_time_s"], first_step_s=summary["first_step_s"],
              wall_s=time.perf_counter() - t0,
              opt_bytes=sorted(set(seen["opt"].values())),
              param_bytes=sorted(set(seen["params"].values())))


def formula_rows() -> list[dict]:
  """analysis.memory's optimizer bytes per device: the main job's mesh and DeepSeek-V3 671B
  at its training layout (2048 devices, EP64: V3 report §3.2)."""
  from dsv3_jax.analysis import memory

  out = []
  for name, devices, ep in (("orion_4x8", 32, 32), ("deepseek_v3_671b", 2048, 64)):
    rep, routed = memory.trained_parameter_split(name)
    for on in (False, True):
      out.append(dict(table="formula", config=name, devices=devices, ep_size=ep, zero1=on,
                      replicated_params=rep, routed_params=routed,
                      bytes_per_device=memory.optimizer_state_bytes_per_device(
                          rep, routed, devices=devices, ep_size=ep, zero1=on)))
  return out


def render(runs: list[dict], formulas: list[dict], steps: int, load: str) -> None:
  from experiments import _report as R
  import matplotlib.pyplot as plt

  f = {(r["config"], r["zero1"]): r for r in formulas}
  main = lambda on: f["orion_4x8", on]["bytes_per_device"]
  mib = lambda b: f"{b / 2**20:,.2f}"
  rows = []
  by = {(r["grad_sum"], r["zero1"]): r for r in runs}
  for r in runs:
    ref = by.get((r["grad_sum"], False))
    diff = (max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])) if ref and r["losses"]
            else None)
    losses = f"{r['losses'][0]:.6f} -> {r['losses'][-1]:.6f}" if r["losses"] else "—"
    rows.append([r["grad_sum"], "on" if r["zero1"] else "off",
                 " / ".join(mib(b) for b in r["opt_bytes"]), mib(main(r["zero1"])),
                 " / ".join(mib(b) for b in r["param_bytes"]),
                 losses, "—" if diff is None or not r["zero1"] else
                 f"{diff:.2e}" + (" (bit-equal)" if diff == 0 else ""),
                 "—" if r["step_s"] is None else f"{r['step_s']:.2f}"])
  v3 = lambda on: f["deepseek_v3_671b", on]["bytes_per_device"]
  rep, routed = f["orion_4x8", True]["replicated_params"], f["orion_4x8", True]["routed_params"]
  saving = 1 - main(True) / main(False)
  sections = [
      "\n".join([
          "configs/orion_4x8.py on 4 x 8 = 32 emulated devices, "
          + (f"{steps} steps each run (load average during the runs: {load})" if steps else
             "the state as the trainer builds and places it (no step run: `--steps 0`; the "
             "20-step loss equality is tests/train/test_zero1.py's, on a smaller model)")
          + ". The optimizer is AdamW (two float32 "
          "moments per parameter; the parameters are the float32 master weights, so there is "
          "no separate master copy). Without ZeRO-1 every device holds the moments of every "
          f"replicated parameter ({rep:,} elements) and of its own routed experts ({routed:,} "
          "/ 32); with ZeRO-1 each moment lives on one device: "
          f"{mib(main(False))} -> {mib(main(True))} MiB per device ({saving:.1%} less, "
          f"{mib(32 * (main(False) - main(True)))} MiB over the mesh).", "",
          R.md_table(["gradient sum", "ZeRO-1", "optimizer state / device, measured (MiB)",
                      "formula (MiB)", "parameters / device (MiB)",
                      f"loss step 1 -> {steps or 'N'}",
                      f"max |loss - ZeRO-1 off| over {steps or 'N'} steps", "step (s)"], rows),
          "",
          "Measured: the bytes of the optimizer-state shards each device holds "
          "(`zero1.bytes_per_device`; one value: every device holds the same). Formula: "
          "`analysis.memory.optimizer_state_bytes_per_device` with "
          "`trained_parameter_split(configs/orion_4x8.py)` (2 x 4 bytes per parameter, over "
          "the devices that hold it, plus two int32 step counts). The losses differ from the "
          "replicated optimizer's only by float summation order: the reduce-scatter sums each "
          "slice, and the clipping norm is summed over slices then devices (the Adam update "
          "of every element is the same arithmetic)."]),
      "\n".join([
          "## The same formula at DeepSeek-V3's scale", "",
          R.md_table(["model", "devices", "EP", "replicated params", "routed params",
                      "ZeRO-1 off (GB / device)", "ZeRO-1 on (GB / device)"],
                     [["DeepSeek-V3 671B (+ MTP)", "2048", "64",
                       f"{f['deepseek_v3_671b', True]['replicated_params']:,}",
                       f"{f['deepseek_v3_671b', True]['routed_params']:,}",
                       f"{v3(False) / 1e9:.1f}", f"{v3(True) / 1e9:.2f}"]]), "",
          "Adam moments in float32 (the report keeps them in BF16, §3.3.4, which halves "
          "both columns; its FP32 master weights would add 4 bytes per parameter, also "
          "partitioned), and no pipeline parallelism (the report's PP16 puts 1 / 16 of the "
          "layers on each device).", "",
          "Caveat: with ZeRO-1 every replica of a parameter is overwritten each step by the "
          "slice one device updated and each moment has one copy, so the replica comparison "
          "of the silent-data-corruption check (`train.sdc_check_every`) no longer sees a "
          "flipped bit in them; `train.shard_optimizer_state` is off by default."])]
  R.write_markdown(NAME, "ZeRO-1 on the main job's mesh", sections, f"{NAME}.py")
  csv_rows = [dict(table="run", grad_sum=r["grad_sum"], zero1=r["zero1"], steps=steps,
                   opt_bytes_per_device=r["opt_bytes"][-1], param_bytes_per_device=
                   r["param_bytes"][-1], formula_bytes=main(r["zero1"]), step_s=r["step_s"],
                   first_step_s=r["first_step_s"], wall_s=r["wall_s"],
                   losses=json.dumps(r["losses"])) for r in runs]
  R.write_csv(NAME, csv_rows + formulas)
  fig, axs = plt.subplots(1, 2, figsize=(10, 3.6))
  labels = [f"{r['grad_sum']}\nZeRO-1 {'on' if r['zero1'] else 'off'}" for r in runs]
  axs[0].bar(labels, [r["opt_bytes"][-1] / 2**20 for r in runs], label="measured")
  axs[0].plot(labels, [main(r["zero1"]) / 2**20 for r in runs], "kx", label="formula")
  axs[0].set_ylabel("optimizer state per device (MiB)")
  axs[0].legend(fontsize=8)
  for r in [r for r in runs if r["losses"]]:
    axs[1].plot(range(1, len(r["losses"]) + 1), r["losses"],
                ls="--" if r["zero1"] else "-", label=labels[runs.index(r)].replace("\n", " "))
  axs[1].set_xlabel("step")
  axs[1].set_ylabel("training loss")
  axs[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(R.path(NAME, "png"), dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=0,
                  help="training steps per run (0: the state bytes only, no step compiled)")
  ap.add_argument("--grad-sums", default="mesh,per_axis")
  a = ap.parse_args(argv)
  grad_sums = tuple(a.grad_sums.split(","))
  for g in grad_sums:
    if g not in ("mesh", "per_axis"):
      raise ValueError(f"--grad-sums: {g!r}; allowed: mesh, per_axis")
  if a.steps < 0:
    raise ValueError(f"--steps must be >= 0 (0: measure the state only), got {a.steps}")
  from dsv3_jax.parallel.mesh import set_host_device_count

  set_host_device_count(32)
  loads = []
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for g in grad_sums:
      for on in (False, True):
        loads.append(os.getloadavg()[0])
        runs.append(run(g, on, a.steps, os.path.join(tmp, f"{g}_{on}")))
        print(f"{g} zero1={on}: {runs[-1]['opt_bytes']} B/device, step {runs[-1]['step_s']}"
              f" s, losses {runs[-1]['losses'][:1]} -> {runs[-1]['losses'][-1:]}", flush=True)
  render(runs, formula_rows(), a.steps, f"{min(loads):.1f}-{max(loads):.1f}")
  print(f"wrote results/{NAME}.md, .csv, .png")


if __name__ == "__main__":
  main()
