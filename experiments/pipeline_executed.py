"""Executed pipeline schedules (1F1B, ZB1P, DualPipe) against the simulator and V3 Table 2.

Runs the pipelined training step (dsv3_jax/train/pipeline_step.py) of a tiny DeepSeek-V3
(hidden 32, 1 dense + 4 MoE layers, 8 experts, MTP depth 1) on stage x node x gpu = PP x 2 x 2
emulated devices, and records per stage what the executor measured (idle slots, peak stored
activations, tag mismatches) beside the simulator (analysis/timeline) and Table 2's formulas,
and the step time (median of 3 after a compiled warm-up; wall time of the whole step on a shared
CPU, so a ratio between schedules, not a speed of any hardware).
Writes results/pipeline_executed.{md,csv,png}.
Run: .venv/bin/python experiments/pipeline_executed.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=16")

import _report as R  # noqa: E402  (first: it selects the Agg backend before pyplot loads)

import time  # noqa: E402

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from configs import tiny  # noqa: E402
from dsv3_jax.model.config import ModelConfig  # noqa: E402
from dsv3_jax.model.transformer import Transformer  # noqa: E402
from dsv3_jax.parallel import pipeline_schedule as ps  # noqa: E402
from dsv3_jax.parallel.mesh import make_mesh, make_pipeline_mesh, state_shardings  # noqa: E402
from dsv3_jax.train import pipeline_step  # noqa: E402

NAME = "pipeline_executed"
SEQ, BATCH = 16, 32
CASES = [("1F1B", 2, 4), ("ZB1P", 2, 4), ("DualPipe", 2, 4),
         ("1F1B", 4, 8), ("ZB1P", 4, 8), ("DualPipe", 4, 8)]


def _run(schedule, pp, micro_batches):
  c = tiny.get_config()
  c.model.update(dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      n_routed_experts=8, num_hidden_layers=5, first_k_dense_replace=1,
                      max_position_embeddings=32, n_group=2, topk_group=1, dispatch="two_hop"))
  c.train.update(dict(batch_size=BATCH, warmup_steps=0))
  mc = ModelConfig.from_dict(c.model.to_dict())
  model = Transformer(mc, mesh=make_mesh(2, 2), rngs=nnx.Rngs(0))
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  mesh = make_pipeline_mesh(pp, 2, 2)
  psh, osh = state_shardings(params, mesh), state_shardings(other, mesh)
  params, other = jax.device_put(params, psh), jax.device_put(other, osh)
  opt = optax.sgd(1e-3)
  opt_state = jax.device_put(opt.init(params), NamedSharding(mesh, P()))
  fns = pipeline_step.make_pipeline_step_fns(
      graphdef, opt, mc, c.train, SEQ, mesh, psh, osh,
      jax.tree.map(lambda x: x.sharding, opt_state), schedule=schedule,
      micro_batches=micro_batches)
  cap = model.layers[1].mlp.worst_case_capacity(BATCH * SEQ // micro_batches)
  window = jax.device_put(
      np.asarray(jax.random.randint(jax.random.PRNGKey(1), (BATCH, SEQ + 2), 0, 256)),
      NamedSharding(mesh, P(mesh.axis_names[1:])))
  step = fns.train_step
  t0 = time.perf_counter()
  out = jax.block_until_ready(step(params, other, opt_state, window, cap))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    out = jax.block_until_ready(step(params, other, opt_state, window, cap))
    times.append(time.perf_counter() - t0)
  m = jax.device_get(out[3])
  return m, compile_s, float(np.median(times))


def main():
  rows, csv_rows, plot = [], [], []
  load = os.getloadavg()[0]
  for schedule, pp, mb in CASES:
    table = ps.build_slot_table(schedule, pp, mb)
    m, compile_s, step_s = _run(schedule, pp, mb)
    sim_idle = [int(v) for v in table.simulated.bubble_per_rank]
    copies, acts = table.formula_memory()
    for r in range(pp):
      csv_rows.append(dict(schedule=schedule, pp=pp, micro_batches=mb, stage=r,
                           slots=table.slots, idle_executed=int(m["idle_slots"][r]),
                           idle_simulated=sim_idle[r], bubble_formula=table.formula_bubble(),
                           peak_activations_executed=int(m["peak_activations"][r]),
                           activations_formula=acts, parameter_copies=copies,
                           mismatches=int(m["schedule_mismatches"][r]), step_s=step_s,
                           compile_s=compile_s, loss=float(m["total_loss"])))
    rows.append([schedule, pp, mb, table.slots,
                 " / ".join(str(int(v)) for v in m["idle_slots"]),
                 " / ".join(map(str, sim_idle)), R.fmt(table.formula_bubble(), 2),
                 " / ".join(str(int(v)) for v in m["peak_activations"]), acts, f"{copies}x",
                 int(np.sum(m["schedule_mismatches"])), R.fmt(step_s, 3), R.fmt(compile_s, 1)])
    plot.append((f"{schedule}\nPP{pp}", max(int(v) for v in m["idle_slots"]),
                 table.formula_bubble(), max(int(v) for v in m["peak_activations"]), acts))
  intro = (f"Tiny model (hidden 32, 1 dense + 4 MoE layers, 8 experts on each stage's 2 x 2 EP "
           f"group, MTP 1), {BATCH} sequences of {SEQ} tokens per step, stage x node x gpu = "
           "PP x 2 x 2 emulated CPU devices. Slots: F, input-gradient B and weight-gradient W one "
           "slot each (full backward 2, DualPipe's F&B 3: Table 2's first regime). Idle slots and "
           "peak stored activations (stage inputs alive from F to W) are counted by the executing "
           "program on each stage (stages 0 / 1 / ...); the simulator is analysis/timeline's, "
           f"the formulas Table 2's. Step time: median of 3 after compilation, load {load:.1f} on "
           "a shared 2-core machine (a ratio between schedules at most).")
  table_md = R.md_table(["Schedule", "PP", "Micro-batches", "Slots", "Idle executed",
                         "Idle simulated", "Bubble formula", "Peak activations executed",
                         "Table 2 activations", "Parameters", "Tag mismatches", "Step (s)",
                         "Compile (s)"], rows)
  R.write_markdown(NAME, "Executed pipeline schedules vs simulator and Table 2",
                   [intro, table_md], "pipeline_executed.py")
  R.write_csv(NAME, csv_rows)
  fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
  x = np.arange(len(plot))
  for i, (title, ex, fo) in enumerate((("max idle slots", 1, 2), ("peak activations", 3, 4))):
    ax[i].bar(x - 0.2, [p[ex] for p in plot], 0.4, label="executed")
    ax[i].bar(x + 0.2, [p[fo] for p in plot], 0.4, label="Table 2 formula")
    ax[i].set_xticks(x, [p[0] for p in plot], fontsize=7)
    ax[i].set_title(title, fontsize=9)
    ax[i].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(R.path(NAME, "png"), dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
