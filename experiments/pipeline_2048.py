"""DeepSeek-V3's full training layout, PP16 x DP2 x EP64 on 2048 emulated devices: the pipelined
train step built and compiled in one process (not executed), and its compiled collectives by
mesh axis.

V3 report §3.2: 16-way pipeline parallelism, 64-way expert parallelism over 8 nodes, ZeRO-1
data parallelism. Mesh (`stage`, `replica`, `node`, `gpu`) = (16, 2, 8, 8)
(`make_pipeline_mesh(16, 16, 8, ep_nodes=8)`): per stage 16 nodes of 8 devices, EP groups of
8 nodes (64 routed experts, one per device), 2 replicas. Tiny dims as configs/tiny.py except:
17 layers (the first dense, one MoE layer per stage), 64 experts, n_group 8, topk_group 4,
two_hop dispatch, 1F1B with 16 micro-batches, the `all_gather` stage transfer (groups of the
stage axis only, the one XLA:CPU + gloo can open at this size), SGD.

Each compiled collective is read from the HLO and put on the mesh axes its first group spans
(`_scale_layout.collectives_by_axis`). Inside shard_map the groups are the layout's; the
collectives XLA adds outside it (where the GSPMD partitioner moves the stage-stacked layers
and the optimizer update between layouts) are listed too: they are why the step is compiled
and not executed here (a group spanning `stage` and the data axes is a communicator of
hundreds to 2048 gloo members, past the limits in ../shared/NOTES-2048.md).

    python experiments/pipeline_2048.py [--stages 16 --nodes 16 --gpus 8 --ep-nodes 8
                                         --micro-batches 16 --schedule 1F1B]

Writes results/pipeline_2048.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
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
  a = ap.parse_args(argv)
  for name in ("stages", "nodes", "gpus", "ep_nodes", "micro_batches", "seq_len"):
    if getattr(a, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
  if a.nodes % a.ep_nodes:
    ap.error(f"--ep-nodes={a.ep_nodes} must divide --nodes={a.nodes}")
  return a


def build_and_compile(a) -> dict:
  """Builds the model and the pipelined step for the layout of `a`, compiles it; returns the
  timings, the memory analysis and the collectives by axis."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from configs import tiny
  from dsv3_jax.cluster import hlo
  from dsv3_jax.model.config import ModelConfig
  from dsv3_jax.model.transformer import Transformer
  from dsv3_jax.parallel.mesh import make_mesh, make_pipeline_mesh, shard_model, state_shardings
  from dsv3_jax.train import pipeline_step
  from experiments._scale_layout import collectives_by_axis

  ep = a.ep_nodes * a.gpus
  c = tiny.get_config()
  c.model.update(dict(num_hidden_layers=a.stages + 1, first_k_dense_replace=1,
                      n_routed_experts=ep, n_group=a.ep_nodes, topk_group=min(4, a.ep_nodes),
                      max_position_embeddings=max(64, a.seq_len + 8), dispatch="two_hop"))
  data_devices = a.nodes * a.gpus  # per stage: replica x node x gpu
  batch = data_devices * a.micro_batches  # one sequence per device per micro-batch
  c.train.update(dict(batch_size=batch, warmup_steps=0))
  mc = ModelConfig.from_dict(c.model.to_dict())
  t0 = time.perf_counter()
  stage_mesh = make_mesh(a.nodes, a.gpus, ep_nodes=a.ep_nodes)
  model = Transformer(mc, mesh=stage_mesh, rngs=nnx.Rngs(0))
  shard_model(model, stage_mesh)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  mesh = make_pipeline_mesh(a.stages, a.nodes, a.gpus, ep_nodes=a.ep_nodes)
  psh, osh = state_shardings(params, mesh), state_shardings(other, mesh)
  opt = optax.sgd(0.1)
  abstract = lambda tree, sh: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  opt_state = jax.eval_shape(opt.init, params)
  osh_opt = jax.tree.map(lambda _: NamedSharding(mesh, P()), opt_state)
  fns = pipeline_step.make_pipeline_step_fns(
      graphdef, opt, mc, c.train, a.seq_len, mesh, psh, osh, osh_opt, schedule=a.schedule,
      micro_batches=a.micro_batches, transfer="all_gather")
  window = jax.ShapeDtypeStruct((batch, a.seq_len + 1 + mc.mtp_depth), jnp.int32,
                                sharding=NamedSharding(mesh, P(mesh.axis_names[1:])))
  cap = model.layers[1].mlp.worst_case_capacity(batch * a.seq_len // a.micro_batches)
  lowered = fns.train_step.lower(abstract(params, psh), abstract(other, osh),
                                 abstract(opt_state, osh_opt), window, cap)
  build_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  colls = hlo.parse_hlo(compiled.as_text(), n_devices=mesh.size)
  axes = collectives_by_axis(colls, mesh)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  return dict(devices=mesh.size, mesh=dict(mesh.shape), schedule=a.schedule,
              micro_batches=a.micro_batches, layers=mc.num_hidden_layers, experts=ep,
              batch=batch, seq_len=a.seq_len, params=n_params, build_s=build_s,
              compile_s=compile_s, peak_rss_bytes=peak_rss, temp_bytes_per_device=int(mem.temp_size_in_bytes),
              argument_bytes_per_device=int(mem.argument_size_in_bytes), axes=axes)


def render(res: dict) -> None:
  from experiments import _report as R

  rows = res["axes"]
  fields = ["kind", "axes", "link", "group_size", "count", "operands", "operand_bytes",
            "wire_bytes"]
  R.write_csv("pipeline_2048", [
      {**{k: r[k] for k in fields}, "devices": res["devices"], "compile_s": res["compile_s"]}
      for r in rows])
  layout = " x ".join(f"{k} {v}" for k, v in res["mesh"].items())
  wide = [r for r in rows if "+" in r["axes"]]  # groups spanning several mesh axes
  permutes = sum(r["count"] for r in rows if r["kind"] == "collective-permute")
  per_dev = res["temp_bytes_per_device"] + res["argument_bytes_per_device"]
  table = [[r["kind"], r["axes"] or "(none)", r["link"], f"{r['group_size']:,}",
            f"{r['count']:,}", r["operands"][:60], f"{r['operand_bytes']:,.0f}",
            f"{r['wire_bytes']:,.0f}"] for r in rows]
  md = [
      "# DeepSeek-V3's layout PP16 x DP2 x EP64 at 2048 devices: compiled, not executed", "",
      f"Generated by `experiments/pipeline_2048.py` on {platform.machine()}, "
      f"{os.cpu_count()} CPU cores, in one process with {res['devices']} emulated devices. "
      f"Mesh {layout}; {res['layers']} layers (one MoE layer per stage), {res['experts']} "
      f"routed experts (one per device of an EP group), {res['params']:,} parameters; "
      f"{res['schedule']} with {res['micro_batches']} micro-batches, the all_gather stage "
      f"transfer, two_hop dispatch, SGD; batch {res['batch']} x {res['seq_len']} tokens.", "",
      R.md_table(["build + lower (s)", "compile (s)", "peak RSS of the process (GiB)",
                  "temp bytes / device", "argument bytes / device"],
                 [[f"{res['build_s']:.1f}", f"{res['compile_s']:.1f}",
                   f"{res['peak_rss_bytes'] / 2**30:.2f}", f"{res['temp_bytes_per_device']:,}",
                   f"{res['argument_bytes_per_device']:,}"]]), "",
      "Compiled collectives by the mesh axes their groups span (per device per call):", "",
      R.md_table(["kind", "axes", "link", "group size", "count", "operands",
                  "bytes in / device", "wire bytes / device"], table), "",
      f"Why it is compiled and not executed here: (1) {permutes} collective-permutes "
      "(pairs along `stage`, over 2 stages each) that the GSPMD partitioner adds outside "
      "shard_map, where the stage-stacked layers change layout; XLA:CPU runs a "
      "collective-permute on one gloo communicator of every participating device, i.e. of all "
      f"{res['devices']} here, past the limits in ../shared/NOTES-2048.md (the stage transfer "
      "inside shard_map is the all_gather over `stage`, 16 members); "
      f"(2) {len(wide)} collective kinds whose groups span several axes "
      f"({', '.join(sorted({r['kind'] + ' over ' + r['axes'] for r in wide})) or 'none'}); "
      f"(3) memory: XLA's buffers come to {per_dev / 2**20:,.0f} MiB per device (temp + "
      f"arguments), {per_dev * res['devices'] / 2**30:,.0f} GiB over {res['devices']} devices "
      "in one host, against 24 GiB here (the training state is replicated over `stage`, so "
      "every device holds the whole model's gradients). Executing it needs the parameters and "
      "optimizer state kept in the stacked pipeline layout and sharded over `stage` (or "
      "unstacked inside shard_map with one-axis collectives).", "",
      "Regenerate: `python experiments/pipeline_2048.py` (build and compile times and the "
      "process's peak memory above)."]
  with open(R.path("pipeline_2048", "md"), "w") as f:
    f.write("\n".join(md) + "\n")
  import matplotlib.pyplot as plt  # (the Agg backend: set by _report)
  by = {}
  for r in rows:  # one bar per (kind, axes): bytes per device per step
    key = (r["kind"], r["axes"] or "-", r["group_size"])
    by[key] = by.get(key, 0) + r["count"] * r["wire_bytes"]
  keys = sorted(by, key=lambda k: -by[k])
  fig, ax = plt.subplots(figsize=(8, 4))
  ax.bar(range(len(keys)), [by[k] for k in keys],
         color=["tab:red" if ("+" in k[1] or k[0] == "collective-permute") else "tab:blue"
                for k in keys])
  ax.set_yscale("log")
  ax.set_xticks(range(len(keys)), [f"{k[0]}\n{k[1]} ({k[2]})" for k in keys], rotation=45,
                ha="right", fontsize=7)
  ax.set_ylabel("wire bytes per device per step")
  ax.set_title(f"PP16 x DP2 x EP64 ({res['devices']} devices): compiled collectives "
               "(red: outside the layout's one-axis groups)", fontsize=9)
  fig.tight_layout()
  fig.savefig(R.path("pipeline_2048", "png"), dpi=120)


def main(argv=None) -> None:
  a = _args(argv)
  n = a.stages * a.nodes * a.gpus
  flag = "--xla_force_host_platform_device_count"
  if "jax" in sys.modules:
    raise SystemExit("run experiments/pipeline_2048.py as a script (it sets the device count)")
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
      + [f"{flag}={n}"])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  res = build_and_compile(a)
  render(res)
  print(f"{res['devices']} devices: build {res['build_s']:.1f} s, compile {res['compile_s']:.1f} s, "
        f"peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB, "
        f"temp {res['temp_bytes_per_device'] / 2**20:.1f} MiB / device")
  for r in res["axes"]:
    print(f"  {r['kind']:20s} {r['axes'] or '-':28s} group {r['group_size']:5d} "
          f"x{r['count']:4d} {r['wire_bytes']:12,.0f} B")


if __name__ == "__main__":
  main()
