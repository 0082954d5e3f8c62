"""DeepSeek-V3's full training layout, PP16 x DP2 x EP64, executed on 2048 emulated devices
(16 processes x 128 with `--processes 16`; default one EP group of 64 per process), with the
state kept in the pipeline layout.

V3 report §3.2: 16-way pipeline parallelism, 64-way expert parallelism over 8 nodes, ZeRO-1
data parallelism. Mesh (`stage`, `replica`, `node`, `gpu`) = (16, 2, 8, 8)
(`make_pipeline_mesh(16, 16, 8, ep_nodes=8)`): per stage 16 nodes of 8 devices, EP groups of
8 nodes (64 routed experts, one per device), 2 replicas. Layers as configs/tiny.py's layout
(one dense layer, then one MoE layer per stage, MTP 1 on the last stage) at the widths of
`SMALL_DIMS`; two_hop dispatch; 1F1B with 16 micro-batches; the `all_gather` stage transfer
(groups of the stage axis only); SGD. The step is
`train.pipeline_stacked.make_stacked_pipeline_step`: parameters stacked over `stage` and
sharded over it, the whole step (gradients, norm, update, router-bias update) in one
shard_map, so every compiled collective is over one mesh axis (or (node, gpu) inside a
process): the limits of ../shared/NOTES-2048.md are met with one EP group per process, so
the MoE all-to-alls stay inside a process and only the `stage` and `replica` collectives
cross processes (gloo).

Reported per configuration: build + lower, compile, communicator warm-up, each step's time,
the loss, peak resident memory (largest process and the launcher's sampled sum), the state
bytes per device, the executed idle slots per stage against the slot-table simulator and the
Table 2 formula, the compiled collectives by mesh axis (kind, group size, bytes per device),
and the H800 estimate of the same step from them (`_scale_layout.pipeline_h800_estimate`).

    python experiments/pipeline_2048.py [--stages 16 --nodes 16 --gpus 8 --ep-nodes 8
        --micro-batches 16 --schedule 1F1B --seq-len 16 --steps 1 --processes P]
        [--compile-only] [--from-launch DIR]

Each run replaces its own rows of results/pipeline_2048.csv (keyed by devices and schedule)
and rewrites results/pipeline_2048.{md,png} from all rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--stages", type=int, default=16)
  ap.add_argument("--nodes", type=int, default=16, help="nodes per stage")
  ap.add_argument("--gpus", type=int, default=8, help="devices per node")
  ap.add_argument("--ep-nodes", type=int, default=8, help="nodes per expert-parallel group")
  ap.add_argument("--micro-batches", type=int, default=16)
  ap.add_argument("--schedule", default="1F1B", choices=("1F1B", "ZB1P", "DualPipe"))
  ap.add_argument("--seq-len", type=int, default=16)
  ap.add_argument("--steps", type=int, default=1, help="steps to execute")
  ap.add_argument("--processes", type=int, default=0,
                  help="processes (default: stages x replicas, one EP group each); each must "
                       "hold whole EP groups")
  ap.add_argument("--timeout", type=float, default=5400.0, help="seconds for the whole job")
  ap.add_argument("--compile-only", action="store_true",
                  help="compile in one process, do not execute")
  ap.add_argument("--from-launch", default="",
                  help="log directory of a finished launch of this configuration: report "
                       "its results instead of running again")
  a = ap.parse_args(argv)
  if a.stages < 2:
    ap.error(f"--stages={a.stages}: a pipeline needs >= 2 stages")
  for name in ("nodes", "gpus", "ep_nodes", "micro_batches", "seq_len", "steps"):
    if getattr(a, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
  if a.nodes % a.ep_nodes:
    ap.error(f"--ep-nodes={a.ep_nodes} must divide --nodes={a.nodes}")
  from dsv3_jax.parallel import pipeline_schedule as ps  # (no jax import)
  try:
    ps.check_micro_batches(a.schedule, a.stages, a.micro_batches)
  except ValueError as e:
    ap.error(f"--schedule {a.schedule} --stages {a.stages} --micro-batches {a.micro_batches}: {e}")
  groups = a.stages * a.nodes // a.ep_nodes  # EP groups in the cluster
  if a.processes < 0 or (a.processes and groups % a.processes):
    ap.error(f"--processes={a.processes} must divide the {groups} EP groups (stages x "
             "nodes / ep-nodes), so that every all-to-all stays inside a process")
  return a


# Executed runs: DeepSeek-V3's dims are far too large for 2048 emulated devices on one host;
# these keep the layout (17 layers, 64 routed experts, MTP 1) and shrink the widths
# (scale_2048's hidden 32, experts of 16): ~0.5 MB of state per device.
SMALL_DIMS = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=8, v_head_dim=8)


def _configs(stages, nodes, gpus, ep_nodes, micro_batches, seq_len, small):
  """(train config, ModelConfig, global batch) of the layout: configs/tiny.py with one MoE layer
  per stage after one dense layer, one routed expert per device of an EP group."""
  from configs import tiny
  from dsv3_jax.model.config import ModelConfig

  ep = ep_nodes * gpus
  c = tiny.get_config()
  c.model.update(dict(num_hidden_layers=stages + 1, first_k_dense_replace=1,
                      n_routed_experts=ep, n_group=ep_nodes, topk_group=min(4, ep_nodes),
                      max_position_embeddings=max(64, seq_len + 8), dispatch="two_hop",
                      **(SMALL_DIMS if small else {})))
  batch = nodes * gpus * micro_batches  # one sequence per data device per micro-batch
  c.train.update(dict(batch_size=batch, warmup_steps=0))
  return c, ModelConfig.from_dict(c.model.to_dict()), batch


def pipeline_worker(stages: int, nodes: int, gpus: int, ep_nodes: int, micro_batches: int,
                    schedule: str, seq_len: int, small: bool = True, steps: int = 2,
                    seed: int = 0, lr: float = 0.1, execute: bool = True,
                    load_wave: int = 4) -> dict:
  """One process's part of the pipelined train step with the state in the pipeline layout
  (`train.pipeline_stacked.make_stacked_pipeline_step`), the target of `launch.launch`.

  Mesh `make_pipeline_mesh(stages, nodes, gpus, ep_nodes)` over `launch.cluster_devices`:
  with P = stages x nodes / ep_nodes processes, process p holds the EP group of stage p // R,
  replica p % R (R = nodes / ep_nodes): every MoE all-to-all stays inside a process, and only
  the `stage` and `replica` collectives cross processes. Weights are drawn with numpy
  (`model.host_init`), identically on every process, and placed with
  `jax.make_array_from_callback`; SGD; tokens uniform over the vocabulary.

  Returns:
    A JSON-able dict: lower / compile / warm-up / step seconds, losses, the step's metrics
    (idle slots, peak activations per stage), XLA's memory analysis (bytes per device), this
    process's peak RSS, and on process 0 the compiled collectives by mesh axis and XLA's
    FLOP count.
  """
  import gc

  import jax
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from dsv3_jax.cluster import hlo, launch
  from dsv3_jax.model.host_init import host_init
  from dsv3_jax.model.transformer import Transformer
  from dsv3_jax.parallel.mesh import make_mesh, make_pipeline_mesh, state_shardings
  from dsv3_jax.train.pipeline_stacked import make_stacked_pipeline_step
  from experiments._scale_layout import collectives_by_axis

  t_start = time.perf_counter()
  c, mc, batch = _configs(stages, nodes, gpus, ep_nodes, micro_batches, seq_len, small)
  n = stages * nodes * gpus
  devices = launch.cluster_devices(n)
  mesh = make_pipeline_mesh(stages, nodes, gpus, ep_nodes=ep_nodes, devices=devices)
  stage_mesh = make_mesh(nodes, gpus, ep_nodes, devices=devices[:nodes * gpus])
  model = nnx.eval_shape(lambda: Transformer(mc, mesh=stage_mesh, rngs=nnx.Rngs(seed)))
  capacity = tuple(int(x) for x in model.layers[1].mlp.worst_case_capacity(
      batch * seq_len // micro_batches))
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  psh, osh = state_shardings(params, mesh), state_shardings(other, mesh)
  opt = optax.sgd(lr)
  step = make_stacked_pipeline_step(graphdef, opt, mc, c.train, seq_len, mesh, psh, osh,
                                    schedule=schedule, micro_batches=micro_batches,
                                    transfer="all_gather", donate=True)
  host = step.to_pipeline(host_init(mc, params, seed), host_init(mc, other, seed))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  rng = np.random.default_rng(seed + 1)
  window = rng.integers(0, mc.vocab_size, (batch, seq_len + 1 + mc.mtp_depth), dtype=np.int32)
  w_sh = NamedSharding(mesh, P(mesh.axis_names[1:]))
  if execute:
    place = lambda a, sh: jax.make_array_from_callback(a.shape, sh, lambda i, a=a: a[i])
  else:
    place = lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
  state = jax.tree.map(place, host, step.shardings)
  opt_state = opt.init((host.stage_params, host.shared_params))  # SGD: no arrays
  window = place(window, w_sh)
  del model, params, other, host
  t0 = time.perf_counter()
  lowered = step.train_step.lower(state, opt_state, window, capacity)
  t_lower = time.perf_counter() - t0
  t_compile = 0.0
  if jax.process_count() > 1 and load_wave > 0:
    # Process 0 compiles (launch's share_binary), the others load its executable in waves.
    for w in range(-(-jax.process_count() // load_wave)):
      if w == jax.process_index() // load_wave:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        t_compile = time.perf_counter() - t0
        gc.collect()
        launch.trim_memory()
      launch.barrier(f"load_wave_{w}", timeout_s=1800)
  else:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
  del lowered
  mem = compiled.memory_analysis()
  out = dict(devices=n, mesh=dict(mesh.shape), schedule=schedule, micro_batches=micro_batches,
             layers=mc.num_hidden_layers, experts=mc.n_routed_experts, hidden=mc.hidden_size,
             batch=batch, seq_len=seq_len, params=n_params, capacity=list(capacity),
             process_count=jax.process_count(), local_devices=n // jax.process_count(),
             setup_s=time.perf_counter() - t_start - t_compile - t_lower, lower_s=t_lower,
             compile_s=t_compile,
             temp_bytes_per_device=int(mem.temp_size_in_bytes),
             argument_bytes_per_device=int(mem.argument_size_in_bytes),
             state_bytes_per_device=sum(x.addressable_data(0).nbytes
                                        for x in jax.tree.leaves(state)) if execute else None)
  if jax.process_index() == 0:
    out["axes"] = collectives_by_axis(hlo.parse_hlo(compiled.as_text(), n_devices=n), mesh)
    cost = compiled.cost_analysis()
    out["flops"] = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
  jax.clear_caches()
  gc.collect()
  launch.trim_memory()
  say = (lambda m: print(f"[process 0] {m}", flush=True)) if jax.process_index() == 0 else (
      lambda m: None)
  say(f"{n} devices: lowered in {t_lower:.1f} s, compiled in {t_compile:.1f} s")
  if not execute:
    out["peak_rss_bytes"] = launch.peak_rss_bytes()
    return out
  launch.barrier("compiled", timeout_s=1800)
  # Every communicator the step uses, minor axis first (`warm_up_collectives`): the compiled
  # step's groups are single mesh axes (results/pipeline_2048.md lists them).
  axes = [a for a in ("gpu", "node", "replica", "stage") if mesh.shape.get(a, 1) > 1]
  out["warm_up_s"] = launch.warm_up_collectives(
      mesh, timeout_s=1800, axes=axes, log=print if jax.process_index() == 0 else lambda m: None)
  times, losses = [], []
  local = lambda a: np.asarray(a.addressable_data(0))
  for _ in range(steps):
    t0 = time.perf_counter()
    state, opt_state, metrics = compiled(state, opt_state, window)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    losses.append(float(local(metrics["loss"])))
    say(f"step {len(times)}: {times[-1]:.1f} s, loss {losses[-1]:.6g}")
  out.update(step_s=times, loss=losses, grad_norm=float(local(metrics["grad_norm"])),
             skipped=float(local(metrics["skipped"])),
             dropped=float(local(metrics["dropped_tokens"])),
             # this process's stage: its devices' shard of the per-stage metrics
             stage=int(np.argwhere(np.vectorize(lambda d: d.process_index)(mesh.devices)
                                   == jax.process_index())[0][0]),
             idle_slots=[int(v) for v in local(metrics["idle_slots"]).ravel()],
             peak_activations=[int(v) for v in local(metrics["peak_activations"]).ravel()],
             schedule_mismatches=[int(v) for v in
                                  local(metrics["schedule_mismatches"]).ravel()],
             peak_rss_bytes=launch.peak_rss_bytes())
  return out


# --------------------------------------------------------------------------- driver side

NAME = "pipeline_2048"
RUN_KEYS = ("devices", "schedule", "executed")


def _groups(a) -> tuple:
  """Collective group sizes of the layout, for the launcher's open-file check: stage, node,
  gpu, replica (the compiled step's groups: results/pipeline_2048.md)."""
  sizes = (a.stages, a.ep_nodes, a.gpus, a.nodes // a.ep_nodes)
  return tuple(sorted((x for x in sizes if x > 1), reverse=True))


def measure(a, log=print) -> list[dict]:
  """Runs (or with --compile-only, compiles in one process) the configuration of `a`; returns
  its csv rows: one 'run' row and one 'axes' row per compiled collective kind and axes."""
  from dsv3_jax.analysis import flops
  from dsv3_jax.cluster import launch
  from dsv3_jax.parallel import pipeline_schedule as ps
  from experiments import _scale_layout

  n = a.stages * a.nodes * a.gpus
  replicas = a.nodes // a.ep_nodes
  kwargs = dict(stages=a.stages, nodes=a.nodes, gpus=a.gpus, ep_nodes=a.ep_nodes,
                micro_batches=a.micro_batches, schedule=a.schedule, seq_len=a.seq_len,
                steps=a.steps)
  if a.compile_only:
    r = launch.launch(f"experiments.{NAME}:pipeline_worker", n, 1,
                      dict(kwargs, execute=False), timeout_s=a.timeout, max_local_devices=n)
  elif a.from_launch:
    if not os.path.isfile(os.path.join(a.from_launch, "result_0.json")):
      raise SystemExit(f"--from-launch {a.from_launch}: no result_0.json there (give the log "
                       "directory of a finished launch)")
    r = launch.read_results(a.from_launch, _groups(a))
  else:
    p = a.processes or a.stages * replicas  # default: one EP group per process
    log(f"[{n}] {p} processes x {n // p} devices, groups {_groups(a)}")
    env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                         " --xla_cpu_multi_thread_eigen=false").strip()}
    r = launch.launch(f"experiments.{NAME}:pipeline_worker", n, p, kwargs,
                      group_sizes=_groups(a), timeout_s=a.timeout, echo=True, env=env)
  res = r.results[0]
  want = dict(devices=n, schedule=a.schedule, micro_batches=a.micro_batches,
              seq_len=a.seq_len, mesh=dict(zip(("stage", "replica", "node", "gpu"), (
                  a.stages, a.nodes // a.ep_nodes, a.ep_nodes, a.gpus))))
  if a.nodes == a.ep_nodes:
    want["mesh"].pop("replica")
  got = {k: res.get(k) for k in want}
  if got != want:
    raise SystemExit(f"results hold {got}, not the requested {want}")
  executed = "step_s" in res
  table = ps.build_slot_table(a.schedule, a.stages, a.micro_batches)
  row = dict(table="run", devices=n, schedule=a.schedule, executed="yes" if executed else "no",
             mesh=" x ".join(f"{k} {v}" for k, v in res["mesh"].items()),
             processes=len(r.results), local_devices=res["local_devices"],
             micro_batches=a.micro_batches, layers=res["layers"], experts=res["experts"],
             hidden=res["hidden"], params=res["params"], batch=res["batch"],
             seq_len=res["seq_len"], lower_s=res["lower_s"], compile_s=res["compile_s"],
             temp_bytes_per_device=res["temp_bytes_per_device"],
             argument_bytes_per_device=res["argument_bytes_per_device"],
             flops=res.get("flops"), formula_bubble=table.formula_bubble(),
             simulated_idle="/".join(map(str, table.idle_slots())),
             formula_activations=table.formula_memory()[1],
             simulated_activations="/".join(map(str, table.peak_per_rank["x"])),
             peak_rss_max_process_bytes=max(r.peak_rss), peak_rss_sum_bytes=sum(r.peak_rss),
             peak_rss_sampled_bytes=r.peak_rss_total or "", wall_s=r.wall_s,
             measured_at=time.strftime("%Y-%m-%d %H:%M", time.localtime(
                 os.path.getmtime(os.path.join(r.log_dir, "result_0.json"))
                 if a.from_launch else time.time())))
  if executed:
    by_stage = {}
    for x in r.results:  # every process of a stage reports the same per-stage metrics
      by_stage.setdefault(x["stage"], (x["idle_slots"][0], x["peak_activations"][0],
                                       x["schedule_mismatches"][0]))
    stages = [by_stage[s] for s in range(a.stages)]
    row.update(warm_up_s="/".join(f"{k}={v:.1f}" for k, v in res["warm_up_s"].items()),
               first_step_s=res["step_s"][0], step_s=res["step_s"][-1],
               steps=len(res["step_s"]), loss_first=res["loss"][0], loss_last=res["loss"][-1],
               losses_agree="yes" if all(x["loss"] == res["loss"] for x in r.results) else "no",
               grad_norm=res["grad_norm"], skipped=res["skipped"], dropped=res["dropped"],
               state_bytes_per_device=res["state_bytes_per_device"],
               executed_idle="/".join(str(s[0]) for s in stages),
               executed_activations="/".join(str(s[1]) for s in stages),
               schedule_mismatches=sum(s[2] for s in stages))
  # H800: the schedule's timeline with per-op times from the compiled collectives; compute
  # from analysis.flops (forward FLOPs of one micro-batch's tokens on one stage's layers).
  _, mc, _ = _configs(a.stages, a.nodes, a.gpus, a.ep_nodes, a.micro_batches, a.seq_len, True)
  fwd = flops.forward_flops_per_token(mc, (a.seq_len + 1) / 2).total
  fwd_stage = fwd * a.seq_len / a.stages  # one sequence per data device per micro-batch
  est = _scale_layout.pipeline_h800_estimate(res["axes"], a.schedule, a.stages, a.micro_batches,
                                             1, fwd_stage, a.gpus)
  p2p = _scale_layout.pipeline_h800_estimate(res["axes"], a.schedule, a.stages,
                                             a.micro_batches, 1, fwd_stage, a.gpus,
                                             point_to_point=True)
  row.update(h800_p2p_step_s=p2p["step_s"], h800_p2p_transfer_s=p2p["transfer_s"])
  row.update(h800_step_s=est["step_s"], h800_pipeline_s=est["pipeline_s"],
             h800_tail_s=est["tail_s"], h800_F_s=est["F_s"], h800_B_s=est["B_s"],
             h800_W_s=est["W_s"], h800_exchange_s=est["exchange_s"],
             h800_transfer_s=est["transfer_s"],
             max_group=max(x["group_size"] for x in res["axes"]))
  gpus = a.gpus
  # The link class from today's `_scale_layout.LINKS` (a --from-launch result keeps its own)
  link = lambda axes: ("IB" if any(_scale_layout.LINKS.get(x) == "IB" for x in axes.split("+"))
                       else "NVLink")
  axes = [dict(table="axes", devices=n, schedule=a.schedule, executed=row["executed"],
               **dict(x, link=link(x["axes"])), h800_s=_scale_layout.collective_seconds(x, gpus))
          for x in res["axes"]]
  return [row] + axes


def _read(path: str) -> list[dict]:
  import csv

  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = list(csv.DictReader(f))
  return [r for r in rows if r.get("table") in ("run", "axes")]  # older formats: dropped


def _num(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return None


def render(rows: list[dict]) -> None:
  """results/pipeline_2048.{csv,md,png} from every run's rows."""
  from experiments import _report as R

  keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "table", k))
  R.write_csv(NAME, [{k: r.get(k, "") for k in keys} for r in rows])
  runs = sorted((r for r in rows if r["table"] == "run"), key=lambda r: _num(r["devices"]))
  gb = lambda v: "—" if _num(v) is None else f"{_num(v) / 2**30:.2f}"
  s = lambda v, d=1: "—" if _num(v) is None else f"{_num(v):,.{d}f}"
  us = lambda v: "—" if _num(v) is None else f"{_num(v) * 1e6:,.1f}"
  main = [[s(r["devices"], 0), r["mesh"], r["schedule"], s(r["micro_batches"], 0),
           f"{r['processes']} x {r['local_devices']}" if r["executed"] == "yes"
           else "compile only", s(r["lower_s"]), s(r["compile_s"]), r.get("warm_up_s") or "—",
           s(r.get("first_step_s")), s(r.get("step_s")), gb(r["peak_rss_max_process_bytes"]),
           gb(r["peak_rss_sum_bytes"]), s(r.get("state_bytes_per_device"), 0),
           s(r["temp_bytes_per_device"], 0), us(r["h800_step_s"])] for r in runs]
  bubbles = [[s(r["devices"], 0), r["schedule"], s(r["micro_batches"], 0),
              r.get("executed_idle") or "—", r["simulated_idle"], s(r["formula_bubble"], 0),
              r.get("executed_activations") or "—", r["simulated_activations"],
              s(r["formula_activations"], 0), s(r.get("schedule_mismatches"), 0)]
             for r in runs]
  losses = [[s(r["devices"], 0), s(r.get("steps"), 0), s(r.get("loss_first"), 6),
             s(r.get("loss_last"), 6), r.get("losses_agree") or "—", s(r.get("grad_norm"), 4),
             s(r.get("skipped"), 0), s(r.get("dropped"), 0)] for r in runs
            if r["executed"] == "yes"]
  first = runs[0] if runs else {}
  md = [f"# DeepSeek-V3's training layout (PP x DP2 x EP64) on emulated devices, executed", "",
        f"Generated by `experiments/{NAME}.py` on {platform.machine()}, {os.cpu_count()} CPU "
        "cores (shared with other jobs). The step is `make_stacked_pipeline_step`: the state "
        "in the pipeline layout (stage layers stacked and sharded over `stage`), the whole "
        "step in one shard_map. Model: "
        "stages + 1 layers (one dense, then one MoE layer per stage; MTP 1 on the last "
        f"stage), {first.get('experts', '?')} routed experts (one per "
        f"device of an EP group), hidden {first.get('hidden', '?')} (`SMALL_DIMS`); two_hop "
        "dispatch, the all_gather stage transfer, SGD; one sequence of "
        f"{first.get('seq_len', '?')} tokens per data device per micro-batch. Each process "
        "holds whole EP groups (64 devices each; 128 = one stage's two replicas): the MoE "
        "all-to-alls stay inside a process, the `stage` collectives (and with one EP group "
        "per process the `replica` ones) cross processes through gloo.", "",
        R.md_table(["devices", "mesh", "schedule", "micro-batches", "processes x devices",
                    "build + lower (s)", "compile (s)", "communicators (s)", "first step (s)",
                    "last step (s)", "peak RSS, largest process (GiB)", "peak RSS sum (GiB)",
                    "state bytes / device", "XLA temp bytes / device", "H800 estimate (µs)"],
                   main), "",
        "Executed schedule against the slot-table simulator (`parallel.pipeline_schedule`) "
        "and the V3 report's Table 2 formulas (idle slots with F = 1, B = 2, W = 1 slot; "
        "activations in micro-batches), per stage:", "",
        R.md_table(["devices", "schedule", "micro-batches", "idle slots, executed",
                    "idle slots, simulator", "bubble, formula", "peak activations, executed",
                    "peak activations, simulator", "activations, formula",
                    "schedule mismatches"], bubbles), "",
        "Losses (every process reports the same loss: 'agree'):", "",
        R.md_table(["devices", "steps", "loss, step 1", "loss, last step", "agree",
                    "grad norm", "skipped", "dropped tokens"], losses), "",
        "Peak RSS: the larger of each worker's own peak and the launcher's samples; the sum "
        "is over processes. State bytes: this device's shards of the parameters and router "
        "biases (SGD has no optimizer state).", "",
        "H800 estimate of the same step (`_scale_layout.pipeline_h800_estimate`): the "
        "schedule's timeline (`analysis.timeline.pipeline_tasks`, `simulate`) with per-op "
        "times rebuilt from the compiled collectives (one MoE exchange set x = dispatch and "
        "combine over both hops plus the routing metadata, `analysis.network` times; the "
        "stage transfer t; forward compute c from `analysis.flops` at the BF16 peak): F = c + "
        "x + t, input-gradient B = 2c + 2x + t (recomputed forward), W = 2c + 2x; then the "
        "all-reduces once each. The emulation moves stage messages with an all_gather over "
        "`stage` (the only stage group gloo can open here); a cluster sends one message to "
        "the neighbour (point-to-point columns). No overlap is credited; at these widths every collective is "
        "latency-bound, so the step is microseconds of latency, not bandwidth.", "",
        R.md_table(["devices", "F (µs)", "B (µs)", "W (µs)", "MoE exchange set x (µs)",
                    "stage transfer t (µs)", "pipeline makespan (µs)", "all-reduces (µs)",
                    "step (µs)", "t point-to-point (µs)", "step, point-to-point t (µs)"],
                   [[s(r["devices"], 0), us(r["h800_F_s"]), us(r["h800_B_s"]),
                     us(r["h800_W_s"]), us(r["h800_exchange_s"]), us(r["h800_transfer_s"]),
                     us(r["h800_pipeline_s"]), us(r["h800_tail_s"]), us(r["h800_step_s"]),
                     us(r.get("h800_p2p_transfer_s")), us(r.get("h800_p2p_step_s"))]
                    for r in runs if _num(r.get("h800_F_s")) is not None])]
  for r in runs:
    rs = [x for x in rows if x["table"] == "axes" and x["devices"] == r["devices"]
          and x["schedule"] == r["schedule"]]
    md += ["", f"Compiled collectives of the {s(r['devices'], 0)}-device step (HLO, per "
           "device per call; count = calls in the program):", "",
           R.md_table(["kind", "axes", "link", "group size", "count", "operands",
                       "bytes in / device", "wire bytes / device", "H800 µs per call"],
                      [[x["kind"], x["axes"], x["link"], s(x["group_size"], 0),
                        s(x["count"], 0), x["operands"][:60], s(x["operand_bytes"], 0),
                        s(x["wire_bytes"], 0), f"{_num(x['h800_s']) * 1e6:,.1f}"]
                       for x in rs])]
  md += ["", f"Regenerate (each run replaces its own rows): `flock /tmp/dsv3_heavy.lock "
         f".venv/bin/python experiments/{NAME}.py --processes 16` (2048 devices, one stage "
         "per process, ~22 min), `... --stages 4 --micro-batches 4 --steps 2` (512 devices, "
         "one EP group per process, ~6 min); `--compile-only` compiles in one process."]
  with open(R.path(NAME, "md"), "w") as f:
    f.write("\n".join(md) + "\n")
  import matplotlib.pyplot as plt  # (the Agg backend: set by _report)

  fig, ax = plt.subplots(figsize=(8, 4))
  for r in runs:
    rs = [x for x in rows if x["table"] == "axes" and x["devices"] == r["devices"]]
    by = {}
    for x in rs:
      by[x["axes"]] = by.get(x["axes"], 0) + _num(x["count"]) * _num(x["wire_bytes"])
    names = sorted(by)
    ax.bar([f"{nm}\n({s(r['devices'], 0)})" for nm in names], [by[k] for k in names])
  ax.set_yscale("log")
  ax.set_ylabel("wire bytes per device per step")
  ax.set_title("PP x DP2 x EP64: compiled collectives by mesh axis (devices)", fontsize=9)
  fig.tight_layout()
  fig.savefig(R.path(NAME, "png"), dpi=120)


def main(argv=None) -> None:
  a = _args(argv)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  new = measure(a)
  key = lambda r: tuple(str(r.get(k)) for k in RUN_KEYS)
  old = [r for r in _read(os.path.join(root, "results", f"{NAME}.csv"))
         if key(r) != key(new[0])]
  render(old + new)
  run = new[0]
  print(f"{run['devices']} devices: lower {run['lower_s']:.1f} s, compile {run['compile_s']:.1f} s, "
        f"step {run.get('step_s', float('nan')):.1f} s, peak RSS sum "
        f"{run['peak_rss_sum_bytes'] / 2**30:.2f} GiB, H800 {run['h800_step_s'] * 1e6:.0f} µs")


if __name__ == "__main__":
  main()
