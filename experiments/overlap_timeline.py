"""Dual micro-batch overlap vs sequential execution of one DeepSeek-V3 layer on H800 (Gantt).

Insights §2.3.1 / V3 report §3.2.1: the attention and MoE compute of one micro-batch overlap the
dispatch and combine all-to-alls of the other. Event-driven simulation of the compute and the
network stream. Writes results/overlap_timeline.{md,csv,png}.
Run: .venv/bin/python experiments/overlap_timeline.py
"""

import _report as R  # first: it selects the Agg backend before pyplot loads

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from dsv3_jax.analysis import hardware, moe_layer_costs, simulate_layers

NAME = "overlap_timeline"
TOKENS, CONTEXT, EFFICIENCY, REMOTE_NODES = 4096, 4096, 0.5, 3.5
COLORS = {"attention": "#4C72B0", "moe": "#55A868", "dispatch": "#DD8452", "combine": "#C44E52"}


def describe(costs, label, csv_rows):
  seq = simulate_layers(costs, 1, overlap=False)
  ovl = simulate_layers(costs, 1, overlap=True)
  ovl_many = simulate_layers(costs, 8, overlap=True)
  csv_rows.append(dict(case=label, attention_ms=costs.attention * 1e3,
                       dispatch_ms=costs.dispatch * 1e3, moe_ms=costs.moe * 1e3,
                       combine_ms=costs.combine * 1e3, sequential_layer_ms=seq.layer_time * 1e3,
                       overlap_one_layer_ms=ovl.layer_time * 1e3,
                       overlap_steady_layer_ms=ovl_many.steady_layer_time * 1e3,
                       sequential_compute_util=seq.compute_utilisation,
                       overlap_compute_util=ovl_many.compute_utilisation))
  return [label, R.fmt(costs.attention * 1e3, 2), R.fmt(costs.dispatch * 1e3, 2),
          R.fmt(costs.moe * 1e3, 2), R.fmt(costs.combine * 1e3, 2),
          R.fmt(seq.layer_time * 1e3, 2), R.fmt(ovl.layer_time * 1e3, 2),
          R.fmt(ovl_many.steady_layer_time * 1e3, 2),
          R.fmt(seq.layer_time / ovl_many.steady_layer_time, 2) + "x",
          R.fmt(seq.compute_utilisation, 2), R.fmt(ovl_many.compute_utilisation, 2)], seq, ovl


def draw(ax, result, title):
  rows = {"compute": 1, "comm": 0}
  for iv in result.timeline.intervals.values():
    t = iv.task
    ax.barh(rows[t.stream], (iv.end - iv.start) * 1e3, left=iv.start * 1e3, height=0.6,
            color=COLORS[t.kind], edgecolor="black", linewidth=0.5,
            hatch="//" if t.group == "mb1" else None)
    ax.text((iv.start + iv.end) / 2 * 1e3, rows[t.stream], t.group, ha="center", va="center",
            fontsize=7, color="white")
  ax.set_yticks([0, 1], ["network (IB)", "compute (SMs)"], fontsize=8)
  ax.set_title(title, fontsize=9)


def main():
  csv_rows = []
  base = moe_layer_costs("deepseek_v3_671b", hardware.H800, TOKENS, CONTEXT, EFFICIENCY,
                         REMOTE_NODES)
  row, seq, ovl = describe(base, "H800, 40 GB/s IB, 50% of BF16 peak", csv_rows)
  rows = [row]
  knobs = [
      ("IB at 50 GB/s (nominal)", dict(network_bandwidth=hardware.H800.scale_out_bandwidth)),
      ("IB at 25 GB/s", dict(network_bandwidth=25e9)),
      ("35% of BF16 peak", dict(compute_efficiency=0.35)),
      ("70% of BF16 peak", dict(compute_efficiency=0.7)),
      ("all 4 nodes remote", dict(remote_nodes_per_token=4.0)),
  ]
  for label, kw in knobs:
    args = dict(model="deepseek_v3_671b", accelerator=hardware.H800, tokens=TOKENS,
                context_len=CONTEXT, compute_efficiency=EFFICIENCY,
                remote_nodes_per_token=REMOTE_NODES)
    args.update(kw)
    rows.append(describe(moe_layer_costs(**args), label, csv_rows)[0])
  table = R.md_table(["Case", "Attention (ms)", "Dispatch (ms)", "MoE (ms)", "Combine (ms)",
                      "Sequential layer (ms)", "Overlapped, one layer (ms)",
                      "Overlapped, steady state (ms/layer)", "Speedup", "Compute util. seq.",
                      "Compute util. overlapped"], rows)
  intro = f"""One DeepSeek-V3 MoE layer for two micro-batches of {TOKENS:,} tokens on one H800
(context {CONTEXT:,}, prefill / forward). Compute: attention projections + causal MLA core, and
router + 8 routed + 1 shared expert, at {EFFICIENCY:.0%} of 989 TFLOP/s. Network: node-limited
routing sends each token over IB to {REMOTE_NODES} remote nodes on average (at most 4; 4 x 7/8 when
the own node is as likely as any other), 7168 bytes per copy in FP8 for dispatch and 2 x 7168 in
BF16 for combine, at 40 GB/s effective IB per GPU. Sequential: each micro-batch's four phases run
back to back. Overlapped: the streams interleave the micro-batches, so one micro-batch's
attention / MoE runs while the other's dispatch / combine is on the wire. "Steady state" is the
time one more layer adds in an 8-layer run (the first attention and last combine are no longer
exposed). There is no numeric value to compare with in the papers (V3 report Fig. 4 is
qualitative)."""
  R.write_markdown(NAME, "Dual micro-batch overlap vs sequential, one DeepSeek-V3 layer on H800",
                   [intro, table], "overlap_timeline.py")
  R.write_csv(NAME, csv_rows)

  fig, axes = plt.subplots(2, 1, figsize=(10, 4.6), sharex=True)
  draw(axes[0], seq, f"sequential: {seq.layer_time * 1e3:.1f} ms, compute utilisation "
       f"{seq.compute_utilisation:.0%}")
  draw(axes[1], ovl, f"dual micro-batch overlap: {ovl.layer_time * 1e3:.1f} ms for this layer, "
       f"compute utilisation {ovl.compute_utilisation:.0%}")
  axes[1].set_xlabel("time (ms)")
  fig.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()] +
             [Patch(facecolor="white", edgecolor="black", hatch="//", label="micro-batch 1")],
             fontsize=8, ncol=5, loc="lower center")
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(R.path(NAME, "png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
