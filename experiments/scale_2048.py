"""DeepSeekMoE forward + backward on up to 256 x 8 = 2048 emulated devices.

Writes results/scale_2048.{md,csv,png}.

    .venv/bin/python experiments/scale_2048.py            # 2048 devices, two_hop (and flat,
                                                          # compile-only): the compiled-HLO
                                                          # collective tables
    .venv/bin/python experiments/scale_2048.py --max-processes 32 --steps 2 --timeout 1800
                                                          # also execute the 2048-device step
                                                          # (32 x 64: ~30 min, ~25 GiB, alone)
    .venv/bin/python experiments/scale_2048.py --table    # the device-count table (8 .. 2048,
                                                          # both schedules)
    .venv/bin/python experiments/scale_2048.py --devices 512 --ep-nodes 8 [--zero1]
                                                          # DeepSeek-V3's layout: EP64 x DP8,
                                                          # one EP group per process
                                                          # (experiments/_scale_layout.py)

Each measured configuration is one training step of the MoE half of a decoder block, RMSNorm
then the real `DeepSeekMoE` layer (router with node-limited routing, shared expert, routed
experts one per device, the configured dispatch schedule), run by the library's training step
(`dsv3_jax.train.step.make_train_step`, grad_sum="per_axis") inside one `jax.shard_map` over
the mesh's ('node', 'gpu') axes: forward, loss = sum(y^2) / tokens, backward w.r.t. every
parameter (through the MoE's input to the norm), SGD update and the auxiliary-loss-free bias
update from the step's expert loads. The gradients of the replicated parameters (norm, router,
shared expert) are computed per device and summed over 'gpu' and then 'node', so no collective
spans more than one mesh axis: the largest group of the two_hop program is the 256-member
'node' axis, which the script checks in the compiled HLO.

Up to 256 devices run in one process (XLA:CPU in-process collectives); above, the job runs on
P processes of L devices joined by jax.distributed + gloo (`dsv3_jax.cluster.launch`), with
the fewest processes whose gloo sockets fit the open-file limit (README, "More than 256
devices"; `launch.check_layout`). Configurations
that would need more processes than `--max-processes` are compiled only (in one process, which
compiles any device count) and marked as not executed, with the reason.

Every number written comes from a measurement of this script; each invocation merges its rows
into results/scale_2048.csv (keyed by device count and schedule) and re-renders the markdown
and the figure from the whole csv.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from experiments import _scale_layout  # noqa: E402

NAME = "scale_2048"
GPUS_PER_NODE = 8
DEVICE_COUNTS = (8, 32, 256, 512, 1024, 2048)
SCHEDULES = ("two_hop", "flat")
# Per-device shapes: a few tokens, a small hidden size, one routed expert per device.
SHAPES = dict(tokens=4, hidden=32, ffn=16, top_k=8, topk_group=4, capacity_factor=3.0)


# --------------------------------------------------------------------------- worker side


def _rss_mib() -> int:
  """This process's resident set now, MiB (Linux /proc; 0 elsewhere)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) // 1024
  except OSError:
    pass
  return 0


def _moe_sublayer(cfg, mesh, rngs):
  """RMSNorm then DeepSeekMoE ([B, S, D] -> ([B, S, D], MoEStats)): the MoE half of a
  decoder block without its residual; `moe_layers` is what the training step's bias update
  reads."""
  from flax import nnx

  from dsv3_jax.model.moe import DeepSeekMoE
  from dsv3_jax.model.norms import RMSNorm

  class MoESublayer(nnx.Module):
    def __init__(self):
      self.moe = DeepSeekMoE(cfg, mesh=mesh, rngs=rngs)
      self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    @property
    def moe_layers(self):
      return [self.moe]

    def __call__(self, x, capacity):
      return self.moe(self.norm(x), None, capacity)

  return MoESublayer()


def moe_step(nodes: int, gpus: int, schedule: str, tokens: int, hidden: int, ffn: int,
             top_k: int, topk_group: int, capacity_factor: float, steps: int = 3,
             seed: int = 0, lr: float = 0.1, gamma: float = 1e-3, execute: bool = True,
             analyze: bool = True, load_wave: int = 4, ep_nodes: int | None = None,
             zero1: bool = False) -> dict:
  """One process's part of the measured MoE-layer step (the target of `launch.launch`).

  Args:
    nodes, gpus: mesh shape (node, gpu); the cluster (all processes) has nodes * gpus devices.
    schedule: "two_hop" or "flat".
    tokens: tokens per device (one sequence of `tokens` per device); hidden: D; ffn: F.
    top_k: experts per token; topk_group: M, nodes a token may reach (capped at `nodes`).
    capacity_factor: sets the static per-hop buffers (`DeepSeekMoE.initial_capacity`).
    steps: training steps to run (the first includes gloo's connection setup).
    execute: False compiles only (any device count fits in one process).
    analyze: on process 0, parse the compiled HLO and the lowered StableHLO collectives.
    load_wave: processes that load process 0's executable at the same time (0: all at once).
    ep_nodes: nodes per expert-parallel group (None: one group over every node); fewer makes
      a ('replica', 'node', 'gpu') mesh with ep_nodes x gpus experts (DeepSeek-V3: 8, EP64).
    zero1: Adam (lr / 100) with its moments partitioned by ZeRO-1 (`train/zero1.py`) instead
      of SGD (which has no state to partition).

  Returns:
    A JSON-able dict: seconds for lowering, compiling and each step, losses, the last step's
    dispatch statistics, XLA's memory analysis (bytes per device) and, on process 0 with
    `analyze`, the collective summaries (`hlo.summarize`).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from dsv3_jax.cluster import hlo, launch
  from dsv3_jax.model.config import ModelConfig
  from dsv3_jax.parallel import dispatch
  from dsv3_jax.parallel.mesh import make_mesh
  from dsv3_jax.train.step import make_train_step
  from experiments._scale_layout import collectives_by_axis

  t_start = time.perf_counter()
  rss = {"imported": _rss_mib()}
  from dsv3_jax.train import zero1 as zero1_lib

  n = nodes * gpus
  ep_nodes = ep_nodes or nodes
  cfg = ModelConfig(hidden_size=hidden, moe_intermediate_size=ffn,
                    n_routed_experts=ep_nodes * gpus, n_group=ep_nodes,
                    topk_group=min(topk_group, ep_nodes), num_experts_per_tok=top_k,
                    n_shared_experts=1, dispatch=schedule,
                    capacity_factor=capacity_factor).validate()
  mesh = make_mesh(nodes, gpus, ep_nodes if ep_nodes < nodes else None,
                   devices=launch.cluster_devices(n))
  axes = tuple(mesh.axis_names)
  # The layer's structure without running its initialisers (which would compile a few dozen
  # small XLA programs, ~125 MB of resident memory in each of the 32 processes); the values are
  # drawn below with numpy, identically on every process.
  layer = nnx.eval_shape(lambda: _moe_sublayer(cfg, mesh, nnx.Rngs(seed)))
  capacity = tuple(int(c) for c in layer.moe.initial_capacity(n * tokens))
  graphdef, params, other = nnx.split(layer, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  # Every projection's init: N(0, initializer_range^2) (the MoE's leaves come first, so they
  # draw the stream in the order of a bare DeepSeekMoE); the norm's weight: ones.
  params["moe"] = jax.tree.map(lambda a: rng.normal(0.0, cfg.initializer_range, a.shape).astype(
      a.dtype), params["moe"])
  params["norm"] = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), params["norm"])
  other = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), other)  # router bias b_i = 0
  p_specs = nnx.get_partition_spec(params)
  o_specs = jax.tree.map(lambda _: P(), other)
  x_spec = P(axes)

  def loss_fn(model, x, capacity):
    # loss = sum(y^2) over every token / (n * tokens): this device's share is its own sum
    # over the same denominator; the metric, averaged over devices, is the same loss.
    y, st = model(x, capacity)
    per_device = jnp.sum(jnp.square(y.astype(jnp.float32)))
    return per_device / (n * tokens), ({"loss": per_device / tokens}, [st])

  optimizer = optax.adam(lr / 100) if zero1 else optax.sgd(lr)
  opt_state = jax.tree.map(np.asarray, optimizer.init(params))  # plain SGD: no arrays
  # Adam's moments: partitioned per parameter (zero1.leaf_plan); the step count replicated.
  s_specs = optax.tree_map_params(
      optimizer, lambda x, spec: zero1_lib.leaf_plan(x.shape, spec, mesh).state_spec,
      opt_state, p_specs, transform_non_params=lambda _: P())
  sharding = lambda spec: NamedSharding(mesh, spec)
  shardings = lambda tree, specs: jax.tree.map(lambda _, s: sharding(s), tree, specs)
  step = make_train_step(
      graphdef, optimizer, loss_fn, bias_update_speed=gamma, mesh=mesh,
      param_shardings=shardings(params, p_specs), other_shardings=shardings(other, o_specs),
      opt_shardings=shardings(opt_state, s_specs), grad_sum="per_axis", zero1=zero1)

  x_host = rng.standard_normal((n, tokens, hidden)).astype(np.float32)
  if execute:
    place = lambda a, spec: jax.make_array_from_callback(
        a.shape, sharding(spec), lambda idx, a=np.asarray(a): a[idx])
  else:
    place = lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding(spec))
  params_g = jax.tree.map(place, params, p_specs)
  other_g = jax.tree.map(place, other, o_specs)
  opt_state = jax.tree.map(place, opt_state, s_specs)
  x_g = place(x_host, x_spec)
  del layer, params, other, x_host
  rss["model"] = _rss_mib()

  t0 = time.perf_counter()
  lowered = step.lower(params_g, other_g, opt_state, x_g, capacity)
  t_lower = time.perf_counter() - t0
  lowered_text = lowered.as_text() if analyze and jax.process_index() == 0 else ""
  rss["lowered"] = _rss_mib()
  t0 = time.perf_counter()
  if jax.process_count() > 1 and load_wave > 0:
    # Process 0 compiles; the others load its executable (launch's share_binary) in waves of
    # `load_wave` processes, returning freed memory after each, so that the transient memory
    # of loading is that of one wave, not of every process at once.
    wave = jax.process_index() // load_wave
    for w in range(-(-jax.process_count() // load_wave)):
      if w == wave:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        t_compile = time.perf_counter() - t0
        rss["compiled"] = _rss_mib()
        del lowered
        gc.collect()
        launch.trim_memory()
      launch.barrier(f"load_wave_{w}", timeout_s=1200)
  else:
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    rss["compiled"] = _rss_mib()
  out = dict(devices=n, nodes=nodes, gpus=gpus, schedule=schedule, capacity=list(capacity),
             opt_state_bytes_per_device=max(zero1_lib.bytes_per_device(opt_state).values(),
                                            default=0) if execute else None,
             process_index=jax.process_index(), process_count=jax.process_count(),
             local_devices=n // jax.process_count(), lower_s=t_lower, compile_s=t_compile,
             setup_s=t0 - t_start, row_bytes=dispatch.payload_bytes_per_row(None, hidden,
                                                                            jnp.float32))
  try:
    mem = compiled.memory_analysis()
    out["memory_analysis"] = {k: int(getattr(mem, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
        "generated_code_size_in_bytes") if hasattr(mem, k)}
  except Exception as e:  # not every backend / version implements it
    out["memory_analysis"] = {"error": str(e)[:200]}
  if analyze and jax.process_index() == 0:
    colls = hlo.parse_hlo(compiled.as_text(), n_devices=n)
    shlo = hlo.parse_stablehlo(lowered_text, n_devices=n)
    out["hlo"] = hlo.summarize(colls)
    out["stablehlo"] = hlo.summarize(shlo)
    out["group_sizes"] = list(hlo.group_sizes(colls, n))
    out["max_group"] = max((c.group_size for c in colls), default=1)
    out["axes"] = collectives_by_axis(colls, mesh)
    cost = compiled.cost_analysis()
    out["flops"] = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
  lowered = lowered_text = None
  jax.clear_caches()  # tracing caches; the executable lives on in `compiled`
  gc.collect()
  launch.trim_memory()
  rss["trimmed"] = _rss_mib()
  out["rss_mib"] = rss
  say = (lambda m: print(f"[process 0] {m}", flush=True)) if jax.process_index() == 0 else (
      lambda m: None)
  say(f"{n} devices {schedule}: lowered in {t_lower:.1f} s, compiled in {t_compile:.1f} s")
  if not execute:
    return out

  launch.barrier("compiled")
  # Every gloo communicator up front, one tiny psum per axis (gpu, then node), each behind a
  # barrier: created lazily inside the step, the gpu groups' first all-reduce is reached > 30 s
  # apart (after the node groups' ~200 s setup) and the run hangs (`warm_up_collectives`).
  out["warm_up_s"] = launch.warm_up_collectives(
      mesh, timeout_s=1200, log=print if jax.process_index() == 0 else lambda m: None)
  times, losses = [], []
  local = lambda a: np.asarray(a.addressable_data(0))
  for _ in range(steps):
    t0 = time.perf_counter()
    params_g, other_g, opt_state, metrics = compiled(params_g, other_g, opt_state, x_g)
    jax.block_until_ready((params_g, other_g, metrics))
    times.append(time.perf_counter() - t0)
    losses.append(float(local(metrics["loss"])))
    say(f"step {len(times)}: {times[-1]:.2f} s, loss {losses[-1]:.6g}")
    rss[f"step{len(times)}"] = _rss_mib()
  counts = local(metrics["expert_counts"])[0]
  out.update(
      step_s=times, loss=losses,
      dropped=float(local(metrics["dropped_tokens"])),
      needed_capacity=[int(v) for v in local(metrics["needed_capacity"])],
      rows_inter_node=float(local(metrics["rows_inter_node"])),
      rows_intra_node=float(local(metrics["rows_intra_node"])),
      buffer_rows_inter_node=float(local(metrics["buffer_rows_inter_node"])),
      buffer_rows_intra_node=float(local(metrics["buffer_rows_intra_node"])),
      assignments=float(counts.sum()), expert_load_max=float(counts.max()),
      expert_load_min=float(counts.min()), grad_norm=float(local(metrics["grad_norm"])))
  return out


# --------------------------------------------------------------------------- driver side


def _group_sizes(schedule: str, n: int, ep_nodes: int | None = None) -> tuple[int, ...]:
  """Replica-group sizes of the measured program (checked against its compiled HLO): one per
  distinct partition; with EP groups of `ep_nodes` nodes, the `replica`, `node` and `gpu`
  axes (and flat's (`node`, `gpu`) all-to-all)."""
  nodes = n // GPUS_PER_NODE
  if ep_nodes and ep_nodes < nodes:
    sizes = [nodes // ep_nodes, ep_nodes, GPUS_PER_NODE]
    sizes += [ep_nodes * GPUS_PER_NODE] if schedule == "flat" else []
    return tuple(sorted((s for s in sizes if s > 1), reverse=True))
  sizes = [nodes, GPUS_PER_NODE] if schedule == "two_hop" else [n, nodes, GPUS_PER_NODE]
  return tuple(sorted({s for s in sizes if s > 1}, reverse=True))


def _variant(ep_nodes: int | None, zero1: bool, nodes: int) -> dict:
  """The csv key columns of a layout: layout ('' = one EP group over every device, the rows
  measured before layouts existed) and optimizer."""
  layout = (_scale_layout.layout_label(ep_nodes, nodes, GPUS_PER_NODE)
            if ep_nodes and ep_nodes < nodes else "")
  return dict(layout=layout, optimizer="Adam, ZeRO-1" if zero1 else "SGD")


def measure(n: int, schedule: str, *, steps: int, max_processes: int, timeout_s: float,
            processes: int | None = None, compile_only: str = "", echo: bool = True,
            spare_devices: int = 64, log=print, ep_nodes: int | None = None,
            zero1: bool = False, from_launch: str = "") -> tuple[dict, list[dict]]:
  """Runs (or, when it cannot run here, compiles) one configuration.

  Args:
    compile_only: a reason to compile without executing ("" = execute when it fits).
    spare_devices: unused devices each process of a multi-process run emulates, for thread
      headroom (`launch.launch`); capped so that a process holds at most 256.
    ep_nodes, zero1: the layout and optimizer (`moe_step`); with EP groups smaller than the
      cluster, one EP group per process (processes = replicas) unless `processes` is given.
    from_launch: the log directory of an earlier, finished launch of this same configuration
      (`launch.read_results`): its workers' results are used instead of running again (a run
      whose script died afterwards); the launcher's RSS samples are then not available.

  Returns:
    (run row for the csv, hlo rows for the csv).
  """
  from dsv3_jax.cluster import launch

  nodes = n // GPUS_PER_NODE
  groups = _group_sizes(schedule, n, ep_nodes)
  variant = _variant(ep_nodes, zero1, nodes)
  kwargs = dict(nodes=nodes, gpus=GPUS_PER_NODE, schedule=schedule, steps=steps, **SHAPES)
  if variant["layout"]:
    kwargs.update(ep_nodes=ep_nodes)
    processes = processes or nodes // ep_nodes
  if zero1:
    kwargs.update(zero1=True)
  row = dict(table="run", devices=n, nodes=nodes, gpus=GPUS_PER_NODE, schedule=schedule,
             **variant, **{k: v for k, v in SHAPES.items()},
             measured_at=time.strftime("%Y-%m-%d %H:%M"))
  reason = compile_only
  try:
    p = processes or launch.min_processes(n, groups)
    launch.check_layout(n, p, groups)
    if p > max_processes and not reason:
      layout = launch.Layout(n, p, groups)
      reason = (f"needs >= {p} processes of {layout.local_devices} devices (gloo: "
                f"{layout.open_files} open files each for groups {list(groups)}, limit "
                f"{launch.open_file_limit()}), above --max-processes={max_processes}")
  except ValueError as e:
    reason, p = str(e), None
  if reason:
    log(f"[{n} {schedule}] not executed: {reason}; compiling in one process")
    r = launch.launch(f"experiments.{NAME}:moe_step", n, 1, dict(kwargs, execute=False),
                      timeout_s=timeout_s, max_local_devices=n)
    res = r.results[0]
    row.update(executed="no", reason=reason, processes=1, local_devices=n,
               compile_s=res["compile_s"], lower_s=res["lower_s"],
               peak_rss_sum_bytes=sum(r.peak_rss), wall_s=r.wall_s)
  else:
    spare = min(spare_devices, launch.MAX_LOCAL_DEVICES - n // p) if p > 1 else 0
    log(f"[{n} {schedule}] running on {p} process(es) x {n // p} devices (+{spare} spare)")
    # Multi-process: single-threaded Eigen inside each device's program, so that a device's
    # kernels do not fan out over the process's shared pool while other devices block in
    # collectives (see `launch.launch`'s spare_devices). The table's multi-process rows were
    # measured with both settings; neither cured the 32-process hang at 2048 devices (the
    # communicator warm-up did).
    env = {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                         " --xla_cpu_multi_thread_eigen=false").strip()} if p > 1 else None
    if from_launch:
      r = launch.read_results(from_launch, groups)
      got = {k: r.results[0].get(k) for k in ("devices", "schedule")}
      if got != dict(devices=n, schedule=schedule) or len(r.results) != p:
        raise ValueError(f"--from-launch {from_launch}: holds {got} on {len(r.results)} "
                         f"processes, not devices={n}, schedule={schedule!r} on {p}")
      log(f"[{n} {schedule}] results read back from {from_launch}")
      row["measured_at"] = time.strftime(
          "%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(
              os.path.join(from_launch, "result_0.json"))))
    else:
      r = launch.launch(f"experiments.{NAME}:moe_step", n, p, kwargs, group_sizes=groups,
                        timeout_s=timeout_s, echo=echo, spare_devices=spare, env=env)
    res = r.results[0]
    steady = res["step_s"][1:] or res["step_s"]
    row.update(executed="yes", reason="", processes=p, local_devices=n // p,
               spare_devices=spare,
               lower_s=res["lower_s"], compile_s=res["compile_s"],
               compile_s_max=max(x["compile_s"] for x in r.results),
               warm_up_s="/".join(f"{k}={v:.1f}" for k, v in res.get("warm_up_s", {}).items()),
               first_step_s=res["step_s"][0], step_s=statistics.median(steady),
               steps=len(res["step_s"]), peak_rss_sum_bytes=sum(r.peak_rss),
               peak_rss_sampled_bytes="" if from_launch else r.peak_rss_total,
               peak_rss_max_process_bytes=max(r.peak_rss), wall_s=r.wall_s,
               loss_first=res["loss"][0], loss_last=res["loss"][-1],
               dropped=res["dropped"], needed_capacity="/".join(map(str,
                                                                    res["needed_capacity"])),
               rows_inter_node=res["rows_inter_node"], rows_intra_node=res["rows_intra_node"],
               buffer_rows_inter_node=res["buffer_rows_inter_node"],
               buffer_rows_intra_node=res["buffer_rows_intra_node"],
               assignments=res["assignments"], expert_load_max=res["expert_load_max"],
               expert_load_min=res["expert_load_min"])
  row.update(capacity="/".join(map(str, res["capacity"])), row_bytes=res["row_bytes"],
             temp_bytes_per_device=res["memory_analysis"].get("temp_size_in_bytes", ""),
             group_sizes="/".join(map(str, res.get("group_sizes", []))),
             max_group=res.get("max_group", ""))
  if res.get("group_sizes") is not None and tuple(res["group_sizes"]) != groups:
    raise RuntimeError(f"[{n} {schedule}] compiled program's collective groups "
                       f"{res['group_sizes']} differ from the assumed {list(groups)}")
  hlo_rows = []
  if variant["layout"]:  # the collectives by mesh axis, with their H800 time
    for a in res.get("axes", []):
      hlo_rows.append(dict(table="axes", devices=n, schedule=schedule, **variant, **a,
                           h800_s=_scale_layout.collective_seconds(a, GPUS_PER_NODE)))
    est = _scale_layout.h800_estimate(res.get("axes", []), res.get("flops", 0.0),
                                      GPUS_PER_NODE)
    row.update(opt_state_bytes_per_device=res.get("opt_state_bytes_per_device"),
               flops=res.get("flops"), h800_step_s=est["step_s"],
               h800_nvlink_s=est["nvlink_s"], h800_ib_s=est["ib_s"],
               h800_compute_s=est["compute_s"], collective_calls=est["calls"])
  else:
    for source in ("hlo", "stablehlo"):
      for h in res.get(source, []):
        hlo_rows.append(dict(table="hlo", devices=n, schedule=schedule, **h))
  log(f"[{n} {schedule}] " + json.dumps({k: row.get(k) for k in (
      "executed", "processes", "compile_s", "first_step_s", "step_s", "peak_rss_sum_bytes",
      "wall_s")}))
  return row, hlo_rows


# --------------------------------------------------------------------------- report


def _read_csv(path: str) -> list[dict]:
  import csv

  if not os.path.exists(path):
    return []
  with open(path) as f:
    return list(csv.DictReader(f))


def _num(v):
  if v in ("", None):
    return None
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if f == int(f) and "." not in str(v) else f


def _key(r: dict) -> tuple:
  """A row's configuration: devices, schedule, layout and optimizer (rows written before the
  layouts existed: one EP group, SGD)."""
  return (str(r["devices"]), r["schedule"], r.get("layout") or "",
          r.get("optimizer") or "SGD")


def _merge(old: list[dict], new_runs: list[dict], new_hlo: list[dict]) -> list[dict]:
  """Replaces the rows of each newly measured configuration (`_key`) and keeps the others."""
  keys = {_key(r) for r in new_runs}
  kept = [r for r in old if _key(r) not in keys]
  rows = kept + new_runs + new_hlo
  order = {"run": 0, "hlo": 1, "axes": 2}
  return sorted(rows, key=lambda r: (order[r["table"]], int(r["devices"]),
                                     SCHEDULES.index(r["schedule"]), _key(r)[2:]))


def _gb(v) -> str:
  return "—" if v in ("", None) else f"{float(v) / 2**30:.2f}"


def _s(v, d=2) -> str:
  return "—" if v in ("", None) else f"{float(v):,.{d}f}"


# Shown while the csv holds no executed 2048-device two_hop row.
NOT_EXECUTED_2048 = """## The 2048-device run: not executed yet

Run `.venv/bin/python experiments/scale_2048.py --devices 2048 --schedules two_hop
--max-processes 32 --steps 2 --timeout 1800` on an otherwise idle machine (32 processes x 64
devices, ~30 min, ~25 GiB). The compiled 2048-device programs (compile-only, one process) are
below."""


def render(rows: list[dict], script: str = f"{NAME}.py") -> None:
  """Writes results/scale_2048.md and .png from the csv rows."""
  from experiments import _report as R
  import matplotlib.pyplot as plt

  layout_runs = [r for r in rows if r["table"] == "run" and r.get("layout")]
  runs = [r for r in rows if r["table"] == "run" and not r.get("layout")]
  hlos = [r for r in rows if r["table"] == "hlo"]
  sections = []
  head = next((r for r in runs if int(r["devices"]) == 2048 and r["schedule"] == "two_hop"
               and r["executed"] == "yes"), None)
  shapes = (f"Per device: {SHAPES['tokens']} tokens, hidden {SHAPES['hidden']}, expert FFN "
            f"{SHAPES['ffn']}, 1 routed expert (E = devices), 1 shared expert, top-"
            f"{SHAPES['top_k']} of E with node-limited routing (n_group = nodes, topk_group = "
            f"M = min({SHAPES['topk_group']}, nodes)), float32, capacity factor "
            f"{SHAPES['capacity_factor']} (`DeepSeekMoE.initial_capacity`).")
  if head:
    rb = float(head["row_bytes"])
    link = R.md_table(
        ["link class", "token rows (dispatch)", "bytes (dispatch)", "padded buffer rows",
         "padded buffer bytes"],
        [["inter-node (IB, `node` axis)", _s(head["rows_inter_node"], 0),
          _s(float(head["rows_inter_node"]) * rb, 0), _s(head["buffer_rows_inter_node"], 0),
          _s(float(head["buffer_rows_inter_node"]) * rb, 0)],
         ["intra-node (NVLink, `gpu` axis)", _s(head["rows_intra_node"], 0),
          _s(float(head["rows_intra_node"]) * rb, 0), _s(head["buffer_rows_intra_node"], 0),
          _s(float(head["buffer_rows_intra_node"]) * rb, 0)]])
    sections.append("\n".join([
        "## The 2048-device run: two_hop on a (node = 256, gpu = 8) mesh", "",
        f"Command: `.venv/bin/python experiments/{script} --devices 2048 --schedules two_hop "
        f"--max-processes 32 --steps 2 --timeout 1800` on an otherwise idle machine (measured "
        f"{head['measured_at']}; ~30 min, ~25 GiB: nothing else can run beside it).", "",
        "It hung in earlier attempts: XLA:CPU creates each gloo communicator lazily inside the "
        "first collective over its device group and gloo waits only ~30 s for the group's "
        "other members; the 256-member `node` groups take minutes to connect, so the members "
        "of a small group reached their first all-reduce minutes apart and blocked. The step "
        "now runs after `launch.warm_up_collectives` (one tiny psum per mesh axis, minor axis "
        "first, each behind a cross-process barrier), and the launcher's collective timeout "
        "turns any future hang into an error (tests/cluster/test_collective_warmup.py "
        "reproduces the hang with one member 40 s late).", "",
        R.md_table(["", "value"], [
            ["processes x devices", f"{head['processes']} x {head['local_devices']}"],
            ["compile (process 0; others load its executable), s", _s(head["compile_s"])],
            ["lowering (tracing), s", _s(head["lower_s"])],
            ["gloo communicators created up front, per axis (warm-up), s",
             head.get("warm_up_s") or "—"],
            ["first step, s", _s(head["first_step_s"])],
            [f"step, median of steps 2..{head['steps']}, s", _s(head["step_s"])],
            ["whole job wall clock (spawn to exit; a row read back with --from-launch: the longest process), s", _s(head["wall_s"], 1)],
            ["peak RSS summed over processes (sum of each process's peak), GiB",
             _gb(head["peak_rss_sum_bytes"])],
            ["peak of the sampled concurrent RSS sum, GiB", _gb(head["peak_rss_sampled_bytes"])],
            ["largest process peak RSS, GiB", _gb(head["peak_rss_max_process_bytes"])],
            ["loss (step 1 -> last)", f"{float(head['loss_first']):.6g} -> "
             f"{float(head['loss_last']):.6g}"],
            ["capacity (C1/C2 rows)", head["capacity"]],
            ["needed capacity (last step)", head["needed_capacity"]],
            ["dropped assignments (last step)", _s(head["dropped"], 0)],
            ["routed (token, expert) assignments", _s(head["assignments"], 0)],
            ["expert load min / max", f"{_s(head['expert_load_min'], 0)} / "
             f"{_s(head['expert_load_max'], 0)}"],
            ["largest collective group in the compiled HLO", head["max_group"]],
        ]), "",
        "Rows and bytes per link class (one forward dispatch, summed over all devices, from "
        "`DispatchStats`; combine moves the same rows back, and the backward pass repeats "
        f"both; {int(rb)} bytes per float32 row of hidden {SHAPES['hidden']}):", "", link]))
  else:
    sections.append(NOT_EXECUTED_2048)
  for sched in SCHEDULES:
    rs = [r for r in hlos if int(r["devices"]) == 2048 and r["schedule"] == sched]
    if not rs:
      continue
    run = next((r for r in runs if int(r["devices"]) == 2048 and r["schedule"] == sched), None)
    how = ("compiled by the executed run (process 0)" if run and run["executed"] == "yes"
           else "compile-only, one process with 2048 CPU devices")
    table = R.md_table(
        ["source", "kind", "group size", "groups", "count", "operands (per device)",
         "bytes in / device", "wire bytes / device", "x count"],
        [[r["source"], r["kind"], _s(r["group_size"], 0), _s(r["num_groups"], 0), r["count"],
          r["operands"], _s(r["operand_bytes"], 0), _s(r["wire_bytes"], 0),
          _s(r["total_wire_bytes"], 0)] for r in rs])
    sections.append("\n".join([
        f"## Collectives of the {sched} step at 2048 devices ({how})", "",
        "`hlo` rows: the compiled XLA:CPU program (what the emulation runs; XLA:CPU splits "
        "an all-to-all into one operand per peer and would widen bf16 payloads to f32 — this "
        "program is float32 throughout, so both sources agree on bytes). `stablehlo` rows: the "
        "lowered program before XLA. Wire bytes per device per call: all-to-all B(S-1)/S, "
        "all-reduce 2B(S-1)/S (ring); `dsv3_jax.cluster.hlo`.", "", table]))
  table_rows = []
  for r in runs:
    how = (f"{r['processes']} x {r['local_devices']}" if r["executed"] == "yes"
           else "compile only")
    table_rows.append([_s(r["devices"], 0), r["schedule"], how, r["capacity"],
                       _s(r["compile_s"]), _s(r.get("first_step_s")), _s(r.get("step_s")),
                       _gb(r["peak_rss_sum_bytes"]), _s(r.get("wall_s"), 0),
                       r["group_sizes"] or "—", r["reason"] or ""])
  if table_rows:
    sections.append("\n".join([
        "## Compile time, step time and memory vs device count", "",
        R.md_table(["devices", "schedule", "processes x devices", "capacity",
                    "compile (s)", "first step (s)", "step (s)", "peak RSS sum (GiB)",
                    "job wall (s)", "collective groups", "not executed because"],
                   table_rows), "",
        "Compile: process 0's `lower().compile()` (in multi-process runs the other processes "
        "load process 0's executable through the coordinator instead of compiling). First "
        "step: includes gloo's connection setup (one socket per device and peer of each "
        "communicator). Step: median of the later steps. Peak RSS: the sum of every process's "
        "peak resident set (an upper bound on the concurrent total). Up to 256 devices: one "
        "process, in-process collectives; above: jax.distributed + gloo on this 2-core "
        "machine, so step times measure the emulation (gloo message rate), not a network.",
        "", "Regenerate the table: `flock /tmp/dsv3_heavy.lock .venv/bin/python "
        f"experiments/{script} --table`."]))
  if layout_runs:
    sections.append(_scale_layout.render_section(
        layout_runs, [r for r in rows if r["table"] == "axes"], script))
  sections.append(shapes)
  sections.append(
      "Faithfulness: the mesh keeps explicit `node` = 256 and `gpu` = 8 axes and every "
      "collective keeps its real group (the two_hop all-to-alls over 256 and 8 members; "
      "statistics and replicated-parameter gradients are summed over `gpu`, then over `node`, "
      "so no 2048-member group exists in the two_hop program). No hierarchical (two-stage) "
      "node exchange is used.")
  R.write_markdown(NAME, "DeepSeekMoE on up to 2048 emulated devices", sections,
                   script)

  fig, axs = plt.subplots(1, 3, figsize=(12, 3.6))
  for sched, marker in (("two_hop", "o"), ("flat", "x")):
    ex = [r for r in runs if r["schedule"] == sched and r["executed"] == "yes"]
    al = [r for r in runs if r["schedule"] == sched]
    if al:
      axs[0].plot([int(r["devices"]) for r in al], [float(r["compile_s"]) for r in al],
                  marker=marker, label=sched)
    if ex:
      axs[1].plot([int(r["devices"]) for r in ex], [float(r["step_s"]) for r in ex],
                  marker=marker, label=sched)
      axs[2].plot([int(r["devices"]) for r in ex],
                  [float(r["peak_rss_sum_bytes"]) / 2**30 for r in ex], marker=marker,
                  label=sched)
  for ax, yl in zip(axs, ("compile (s)", "step (s)", "peak RSS sum (GiB)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("emulated devices")
    ax.set_ylabel(yl)
    ax.legend(fontsize=8)
  axs[1].set_yscale("log")
  fig.tight_layout()
  fig.savefig(R.path(NAME, "png"), dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--table", action="store_true",
                  help="measure every device count in --devices for both schedules")
  ap.add_argument("--devices", default=None,
                  help="comma-separated device counts (default: 2048, or all with --table)")
  ap.add_argument("--schedules", default=None,
                  help="comma-separated schedules (default: two_hop; both with --table)")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--max-processes", type=int, default=16,
                  help="largest process count to execute (more are compiled only); the "
                  "2048-device two_hop run needs 32 (~30 min and ~25 GiB here)")
  ap.add_argument("--timeout", type=float, default=840.0, help="seconds per configuration")
  ap.add_argument("--spare-devices", type=int, default=64,
                  help="unused devices per process of a multi-process run (thread headroom)")
  ap.add_argument("--compile-only", default="", metavar="REASON",
                  help="compile without executing (one process), recording REASON")
  ap.add_argument("--no-write", action="store_true", help="print only")
  ap.add_argument("--ep-nodes", type=int, default=None,
                  help="nodes per expert-parallel group (DeepSeek-V3: 8, EP64), data parallel "
                  "across groups, one group per process (default: one group over every node)")
  ap.add_argument("--zero1", action="store_true",
                  help="Adam with ZeRO-1 partitioned moments instead of SGD")
  ap.add_argument("--from-launch", default="", metavar="DIR",
                  help="build the row of the one --devices/--schedules configuration from a "
                  "finished launch's log directory instead of running it again")
  ap.add_argument("--render", action="store_true",
                  help="only rewrite results/scale_2048.md and .png from the csv (and the "
                       "pipelined rows from results/pipeline_2048.csv)")
  a = ap.parse_args(argv)
  if a.render:
    from experiments import _report as R
    render(_read_csv(R.path(NAME, "csv")))
    print(f"wrote results/{NAME}.md, .png")
    return
  devices = (tuple(int(v) for v in a.devices.split(",")) if a.devices else
             DEVICE_COUNTS if a.table else (2048,))
  schedules = (tuple(a.schedules.split(",")) if a.schedules else
               SCHEDULES if a.table else ("two_hop",))
  for s in schedules:
    if s not in SCHEDULES:
      raise ValueError(f"--schedules: {s!r}; allowed: {SCHEDULES}")
  for n in devices:
    if n % GPUS_PER_NODE or n < GPUS_PER_NODE:
      raise ValueError(f"--devices: {n} is not a positive multiple of {GPUS_PER_NODE} "
                       "(gpus per node)")
    if a.ep_nodes is not None and (a.ep_nodes < 1 or (n // GPUS_PER_NODE) % a.ep_nodes):
      raise ValueError(f"--ep-nodes={a.ep_nodes} must be a positive divisor of the "
                       f"{n // GPUS_PER_NODE} nodes of --devices {n}")
  if a.from_launch and (len(devices) != 1 or len(schedules) != 1 or a.table):
    raise ValueError("--from-launch reads back one configuration: give one --devices and one "
                     "--schedules value (and no --table)")
  from dsv3_jax.cluster import launch
  from experiments import _report as R

  def save(row, hlo_rows):
    # Each configuration is written as soon as it is measured, so a later one failing (or a
    # timeout) never loses an earlier, expensive row.
    if a.no_write:
      return
    rows = _merge(_read_csv(R.path(NAME, "csv")), [row], hlo_rows)
    R.write_csv(NAME, rows)
    render(rows)
    print(f"wrote results/{NAME}.md, .csv, .png")

  t0 = time.time()
  for n in devices:
    for s in schedules:
      save(*measure(n, s, steps=a.steps, max_processes=a.max_processes, timeout_s=a.timeout,
                    spare_devices=a.spare_devices, compile_only=a.compile_only,
                    ep_nodes=a.ep_nodes, zero1=a.zero1, from_launch=a.from_launch))
  if (not a.table and devices == (2048,) and "flat" not in schedules and a.ep_nodes is None
      and not a.from_launch):
    # The flat program's collectives at 2048 (it cannot execute here): compile only. Its
    # compile takes 330 s on an idle machine, several times that under load: a failure here is
    # reported and the rows already written stay.
    nproc = launch.min_processes(2048, _group_sizes("flat", 2048))
    layout = launch.Layout(2048, nproc, _group_sizes("flat", 2048))
    why = (f"needs >= {nproc} processes of {layout.local_devices} devices (gloo: "
           f"{layout.open_files} open files each, limit {launch.open_file_limit()})")
    try:
      save(*measure(2048, "flat", steps=a.steps, max_processes=a.max_processes,
                    timeout_s=a.timeout, compile_only=why))
    except launch.LaunchError as e:
      print(f"[2048 flat] compile-only run failed, its earlier row is kept: {e}")
  print(f"total wall clock: {time.time() - t0:.1f} s")


if __name__ == "__main__":
  main()
