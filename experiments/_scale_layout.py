"""DeepSeek-V3's training layout in experiments/scale_2048.py: EP groups of `ep_nodes` nodes,
data parallel across groups (the mesh's `replica` axis), one EP group per process.

V3 report §3.2: 64-way expert parallelism over 8 nodes and ZeRO-1 data parallelism (PP16 is
left out here). On the emulated cluster an EP group of 64 devices per process keeps every
all_to_all inside one process; only the `replica` collectives (the gradient sums, and with
ZeRO-1 their reduce-scatters / all-gathers) cross processes. This module reads the compiled
program's collectives by mesh axis (`collectives_by_axis`), estimates the same step on H800
from those bytes (`h800_estimate`: `analysis.network` for the all-to-alls and the ring
collectives' latencies, `analysis.timeline` to lay the step out) and renders its section of
results/scale_2048.md (`render_section`).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

# Link class of each mesh axis (report §3.2 / Insights §5: NVLink inside a node, IB across).
# Pipeline stages are different nodes (`make_pipeline_mesh`: consecutive blocks of nodes).
LINKS = {"gpu": "NVLink", "node": "IB", "replica": "IB", "stage": "IB"}


def layout_label(ep_nodes: int, nodes: int, gpus: int) -> str:
  """'EP64 x DP8' for EP groups of `ep_nodes` nodes of `gpus` devices among `nodes` nodes."""
  return f"EP{ep_nodes * gpus} x DP{nodes // ep_nodes}"


def collectives_by_axis(collectives, mesh) -> list[dict]:
  """Compiled collectives merged by (kind, mesh axes spanned, operand types).

  The axes a collective spans are read from its first replica group: the mesh axes along
  which its members' mesh coordinates differ (device ids in the HLO are positions in the mesh's
  device order).

  Args:
    collectives: `cluster.hlo.Collective`s (compiled HLO) of a program on `mesh`.
    mesh: the jax Mesh.

  Returns:
    dicts: kind, axes ('+'-joined), link (NVLink / IB), group_size, count, operands,
    operand_bytes and wire_bytes (per device per call), total_wire_bytes.
  """
  shape, names = mesh.devices.shape, tuple(mesh.axis_names)
  rows: "OrderedDict[tuple, dict]" = OrderedDict()
  for c in collectives:
    coords = np.array([np.unravel_index(d, shape) for d in c.groups[0]])
    axes = "+".join(n for i, n in enumerate(names) if len(set(coords[:, i])) > 1)
    ops = ", ".join(OrderedDict.fromkeys(str(a) for a in c.operands))
    key = (c.kind, axes, ops)
    if key not in rows:
      link = "IB" if any(LINKS.get(a) == "IB" for a in axes.split("+")) else "NVLink"
      rows[key] = dict(kind=c.kind, axes=axes, link=link, group_size=c.group_size, count=0,
                       operands=ops if len(ops) < 80 else ops[:77] + "...",
                       operand_bytes=c.operand_bytes, wire_bytes=c.wire_bytes,
                       total_wire_bytes=0.0)
    rows[key]["count"] += 1
    rows[key]["total_wire_bytes"] += c.wire_bytes
  return list(rows.values())


def collective_seconds(row: dict, gpus: int, hw=None) -> float:
  """H800 time of one call of a `collectives_by_axis` row, seconds.

  All-to-all: `analysis.network.all_to_all` (bottleneck resource + longest-path latency) on a
  multi-rail fat-tree: over `gpu`, one node's NVLink; over `node` or `replica` (two_hop's
  inter-node hop: same-index GPUs of S nodes), S nodes of one rail; over (`node`, `gpu`),
  S / gpus nodes of every rail. Ring all-reduce / reduce-scatter / all-gather: the wire bytes
  at the link's bandwidth (NVLink achieved 160 GB/s, IB effective 40 GB/s per GPU) plus one
  64-byte latency per ring step (`network.end_to_end_latency`: NVLink, or IB cross-leaf).
  """
  from dsv3_jax.analysis import hardware, network

  hw = hw or hardware.H800
  s, b, axes = int(row["group_size"]), float(row["operand_bytes"]), str(row["axes"]).split("+")
  if s <= 1:
    return 0.0
  if row["kind"] == "all-to-all":
    per_peer = max(b / s, 1.0)
    if axes == ["gpu"]:
      res = network.all_to_all("multi_rail", 1, per_peer, gpus_per_node=s)
    elif "gpu" not in axes:
      res = network.all_to_all("multi_rail", s, per_peer, gpus_per_node=1)
    else:
      res = network.all_to_all("multi_rail", s // gpus, per_peer, gpus_per_node=gpus)
    return res.time_s
  nvlink = axes == ["gpu"]
  bw = hw.scale_up_bandwidth_achieved if nvlink else hw.scale_out_bandwidth_effective
  latency = (network.end_to_end_latency("nvlink", 1) if nvlink else
             network.end_to_end_latency("infiniband", 3))
  steps = {"all-reduce": 2 * (s - 1)}.get(row["kind"], s - 1)
  return float(row["wire_bytes"]) / bw + steps * latency


def h800_estimate(rows: list[dict], flops: float, gpus: int, hw=None) -> dict:
  """The measured step on H800: compute (`flops` per device at the BF16 dense peak) and every
  collective call of `rows` (`collective_seconds`) as tasks of `analysis.timeline.simulate`,
  one after the other as the emulated program runs them (XLA:CPU executes collectives
  synchronously; no overlap assumed, so an upper bound for this program).

  Returns:
    dict: step_s (the timeline's makespan), compute_s, nvlink_s, ib_s, calls.
  """
  from dsv3_jax.analysis import hardware
  from dsv3_jax.analysis.timeline import Task, simulate

  hw = hw or hardware.H800
  compute_s = float(flops) / hw.bf16_dense_flops
  tasks, prev, by_link, calls = [Task("compute", "compute", compute_s)], "compute", {}, 0
  for i, r in enumerate(rows):
    t = collective_seconds(r, gpus, hw)
    for k in range(int(r["count"])):
      name = f"{r['kind']}[{r['axes']}] {i}.{k}"
      tasks.append(Task(name, "network", t, deps=(prev,), kind=r["kind"]))
      prev, calls = name, calls + 1
    by_link[r["link"]] = by_link.get(r["link"], 0.0) + t * int(r["count"])
  timeline = simulate(tasks)
  return dict(step_s=timeline.makespan, compute_s=compute_s, nvlink_s=by_link.get("NVLink", 0.0),
              ib_s=by_link.get("IB", 0.0), calls=calls)


def render_section(runs: list[dict], axis_rows: list[dict], script: str) -> str:
  """The markdown section of the EP-layout rows (runs with a `layout`) and their collectives."""
  from experiments import _report as R

  gb = lambda v: "—" if v in ("", None) else f"{float(v) / 2**30:.2f}"
  s = lambda v, d=2: "—" if v in ("", None) else f"{float(v):,.{d}f}"
  us = lambda v: "—" if v in ("", None) else f"{float(v) * 1e6:,.1f}"
  table = []
  for r in runs:
    how = (f"{r['processes']} x {r['local_devices']}" if r["executed"] == "yes"
           else "compile only")
    table.append([s(r["devices"], 0), r["layout"], r["schedule"], r["optimizer"], how,
                  s(r["compile_s"]), s(r.get("first_step_s")), s(r.get("step_s")),
                  gb(r.get("peak_rss_max_process_bytes")), gb(r["peak_rss_sum_bytes"]),
                  s(r.get("opt_state_bytes_per_device"), 0), us(r.get("h800_step_s")),
                  r["group_sizes"] or "—", r["reason"] or ""])
  parts = [
      "## DeepSeek-V3's layout: EP64 inside a process, data parallel across processes", "",
      "V3 report §3.2 trains with 64-way expert parallelism over 8 nodes and ZeRO-1 data "
      "parallelism (and PP16, not used here). Mesh ('replica', 'node', 'gpu') = (nodes / 8, 8, "
      "8) (`make_mesh(..., ep_nodes=8)`): 64 routed experts, one per device of an EP group, "
      "replicated over the replicas; n_group = 8 nodes, topk_group = min(4, 8). One EP group "
      "per process (P = replicas x 64 devices), so both two_hop all-to-alls (8 members each) "
      "stay inside a process and only the `replica` collectives cross processes (gloo). The "
      "gradient sums run one axis at a time (grad_sum='per_axis'); with ZeRO-1 (Adam, "
      "`train/zero1.py`) the replicated parameters' gradients are reduce-scattered over `gpu`, "
      "`node`, `replica` in turn, as far as each dimension divides, and the routed experts' "
      "over `replica`; the updated slices are all-gathered back.", "",
      R.md_table(["devices", "layout", "schedule", "optimizer", "processes x devices",
                  "compile (s)", "first step (s)", "step (s)", "peak RSS, largest process "
                  "(GiB)", "peak RSS sum (GiB)", "optimizer state / device (bytes)",
                  "H800 estimate (µs)", "collective groups", "not executed because"], table),
      "", "Optimizer state per device: measured from the arrays (`zero1.bytes_per_device`). "
      "H800 estimate: `_scale_layout.h800_estimate`, from the compiled collectives below "
      "(no overlap; at these tiny dims every collective is latency-bound, so ZeRO-1's "
      "per-leaf reduce-scatters and all-gathers, which XLA does not combine, double it). "
      "Emulated step times are gloo on this machine's 2 shared cores (other jobs ran beside "
      "these runs), not a network.",
      "", f"Regenerate: `flock /tmp/dsv3_heavy.lock .venv/bin/python experiments/{script} "
      "--devices 512 --ep-nodes 8 [--zero1]` (and 1024; 2048 with `--max-processes 32`)."]
  parts += _pipeline_rows()
  for r in runs:
    rs = [a for a in axis_rows if a["devices"] == r["devices"] and a["layout"] == r["layout"]
          and a["schedule"] == r["schedule"] and a["optimizer"] == r["optimizer"]]
    if not rs:
      continue
    parts += ["", f"Collectives of the {r['devices']}-device {r['layout']} {r['schedule']} "
              f"step ({r['optimizer']}; compiled HLO, per device per call):", "",
              R.md_table(["kind", "axes", "link", "group size", "count", "operands",
                          "bytes in / device", "wire bytes / device", "H800 µs per call"],
                         [[a["kind"], a["axes"], a["link"], s(a["group_size"], 0),
                           s(a["count"], 0), a["operands"], s(a["operand_bytes"], 0),
                           s(a["wire_bytes"], 0), us(a.get("h800_s"))] for a in rs])]
  return "\n".join(parts)


def pipeline_h800_estimate(rows: list[dict], schedule: str, pp: int, micro_batches: int,
                           moe_layers_per_stage: int, forward_flops: float, gpus: int,
                           hw=None, point_to_point: bool = False) -> dict:
  """H800 time of one pipelined step from its compiled collectives (`collectives_by_axis`
  rows of `train.pipeline_stacked`'s program): the schedule's timeline
  (`analysis.timeline.pipeline_tasks` + `simulate`) with per-op times built from the rows,
  then the all-reduces once each (the gradient, norm and metric sums after the pipeline).

  The program's rows are static occurrences (the slot loop's body and its switch branches
  appear once in the text), so the per-op times are rebuilt from what one op of
  `parallel.pipeline` executes. One MoE exchange set x = one dispatch and one combine per hop
  (the largest all-to-all over `node` and over `gpu`, each twice) plus one of every smaller
  all-to-all (routing metadata); the stage transfer t = the `stage` all-gathers; c = the
  stage's forward compute, `forward_flops` per device at the BF16 dense peak. Then, with n MoE
  layers per stage: F = c + n x + t; input-gradient B = 2c + 2n x + t (the forward recomputed,
  then pulled back); W = 2c + 2n x; full backward = B + W; DualPipe's F&B = F + full backward
  (no overlap credited). Collectives run one after another within an op (XLA:CPU executes
  them synchronously), so it is an upper bound for this program. `point_to_point`: the stage
  transfer as a real cluster sends it (one IB message to the neighbour stage, the
  `ppermute` transfer: the all_gather's one shard at the IB bandwidth plus one cross-leaf
  latency) instead of the emulation's ring all-gather over every stage.

  Returns:
    dict: step_s, pipeline_s (the timeline's makespan), tail_s (the all-reduces), F_s, B_s,
    W_s, exchange_s (x), transfer_s (t), compute_s (c).
  """
  from dsv3_jax.analysis import hardware
  from dsv3_jax.analysis.timeline import pipeline_tasks, simulate

  hw = hw or hardware.H800
  a2a = [r for r in rows if r["kind"] == "all-to-all" and r["axes"] in ("node", "gpu")]
  exchange = 0.0
  for axis in ("node", "gpu"):
    mine = sorted((r for r in a2a if r["axes"] == axis), key=lambda r: -float(r["operand_bytes"]))
    exchange += sum((2 if i == 0 else 1) * collective_seconds(r, gpus, hw)
                    for i, r in enumerate(mine))
  gathers = [r for r in rows if r["kind"] == "all-gather" and r["axes"] == "stage"]
  if point_to_point:
    from dsv3_jax.analysis import network
    transfer = sum(float(r["operand_bytes"]) / hw.scale_out_bandwidth_effective
                   + network.end_to_end_latency("infiniband", 3) for r in gathers)
  else:
    transfer = sum(collective_seconds(r, gpus, hw) for r in gathers)
  c = float(forward_flops) / hw.bf16_dense_flops
  n = int(moe_layers_per_stage)
  f = c + n * exchange + transfer
  b = 2 * c + 2 * n * exchange + transfer
  w = 2 * c + 2 * n * exchange
  kw = dict(F=f, B=b + w, W=w)
  if schedule == "DualPipe":
    kw["FB"] = f + b + w
  tasks, _ = pipeline_tasks(schedule, pp, micro_batches, **kw)
  pipeline_s = simulate(tasks).makespan
  tail = sum(int(r["count"]) * collective_seconds(r, gpus, hw) for r in rows
             if r["kind"] == "all-reduce")
  return dict(step_s=pipeline_s + tail, pipeline_s=pipeline_s, tail_s=tail, F_s=f, B_s=b,
              W_s=w, exchange_s=exchange, transfer_s=transfer, compute_s=c)


def _pipeline_rows() -> list[str]:
  """The pipelined layout's executed rows (results/pipeline_2048.csv, written by
  experiments/pipeline_2048.py), for the section above; [] before that script has run."""
  import csv
  import os

  from experiments import _report as R

  path = R.path("pipeline_2048", "csv")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    runs = sorted((r for r in csv.DictReader(f) if r.get("table") == "run"
                   and r["executed"] == "yes"), key=lambda r: float(r["devices"]))
  f1 = lambda v: f"{float(v):,.1f}"
  return ["", "With pipeline stages added (PP x DP2 x EP64, V3 report §3.2; "
          "`make_stacked_pipeline_step`, 1F1B; details in results/pipeline_2048.md):", "",
          R.md_table(["devices", "mesh", "micro-batches", "processes x devices", "compile (s)",
                      "step (s)", "peak RSS, largest process (GiB)", "peak RSS sum (GiB)",
                      "H800 estimate (µs)"],
                     [[f"{int(float(r['devices'])):,}", r["mesh"], r["micro_batches"],
                       f"{r['processes']} x {r['local_devices']}", f1(r["compile_s"]),
                       f1(r["step_s"]), f"{float(r['peak_rss_max_process_bytes']) / 2**30:.2f}",
                       f"{float(r['peak_rss_sum_bytes']) / 2**30:.2f}",
                       f"{float(r['h800_step_s']) * 1e6:,.0f}"] for r in runs])]
