"""Pipeline bubbles and memory of 1F1B, ZB1P and DualPipe: V3 report (arXiv 2412.19437) Table 2.

Each schedule is generated op by op per rank and simulated; the measured bubble is compared with
the closed form. Writes results/pipeline_bubbles.{md,csv,png}.
Run: .venv/bin/python experiments/pipeline_bubbles.py
"""

import _report as R  # first: it selects the Agg backend before pyplot loads

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from dsv3_jax.analysis.timeline import (PIPELINE_METHODS, memory_formula,
                                        simulate_pipeline)

NAME = "pipeline_bubbles"
FORMULA_TEXT = {"1F1B": "(PP-1)(F+B)", "ZB1P": "(PP-1)(F+B-2W)", "DualPipe": "(PP/2-1)(F&B+B-3W)"}
MEMORY_TEXT = {"1F1B": ("1x", "PP"), "ZB1P": ("1x", "PP"), "DualPipe": ("2x", "PP+1")}
PPS = (8, 16, 32)
# Chunk times in units of F. B = full backward = input gradient (= F) + weight gradient W (= F).
REGIMES = [
    ("F=1, B=2, W=1, F&B=F+B=3 (overlap hides only communication)", 1.0, 2.0, 1.0, 3.0),
    ("F=1, B=2, W=1, F&B=2.5 (overlap also saves compute)", 1.0, 2.0, 1.0, 2.5),
    ("F=1, B=2, W=0.5, F&B=2.4 (input-gradient B-W != F)", 1.0, 2.0, 0.5, 2.4),
]
COLORS = {"F": "#4C72B0", "B": "#55A868", "W": "#C44E52", "F&B": "#8172B2"}


def run_table(F, B, W, FB, csv_rows, regime):
  rows = []
  for pp in PPS:
    for method in PIPELINE_METHODS:
      r = simulate_pipeline(method, pp, 4 * pp, F, B, W, FB)
      params, acts = memory_formula(method, pp)
      diff = r.bubble - r.formula
      rows.append([R.fmt(pp), method, FORMULA_TEXT[method], R.fmt(r.formula, 2),
                   R.fmt(r.bubble, 2), R.fmt(diff, 2) if abs(diff) > 1e-9 else "0",
                   f"{MEMORY_TEXT[method][0]} / {r.parameter_copies}x",
                   f"{MEMORY_TEXT[method][1]} = {acts} / {r.peak_activations}",
                   R.fmt(r.makespan, 1)])
      csv_rows.append(dict(regime=regime, pp=pp, method=method, micro_batches=4 * pp, F=F, B=B,
                           W=W, FB=FB, formula_bubble=r.formula, simulated_bubble=r.bubble,
                           makespan=r.makespan, parameter_copies=r.parameter_copies,
                           paper_parameter_copies=params, peak_activations=r.peak_activations,
                           paper_activations=acts))
  return R.md_table(["PP", "Method", "Bubble (Table 2)", "Formula", "Simulated", "Diff",
                     "Parameters (Table 2 / simulated)", "Activation (Table 2 / simulated peak)",
                     "Step time"], rows)


def gantt(ax, result, title):
  pp = result.pp
  for r in range(pp):
    for iv in result.timeline.on(f"rank{r}"):
      kind = iv.task.kind
      ax.barh(r, iv.end - iv.start, left=iv.start, color=COLORS[kind], edgecolor="white",
              linewidth=0.3, height=0.8)
  ax.set_yticks(range(pp), [f"rank {r}" for r in range(pp)], fontsize=7)
  ax.invert_yaxis()
  ax.set_title(title, fontsize=9)
  ax.set_xlabel("time (units of F)", fontsize=8)


def main():
  csv_rows = []
  sections = []
  for label, F, B, W, FB in REGIMES:
    sections += [f"## {label}", run_table(F, B, W, FB, csv_rows, label)]
  intro = ("Micro-batches per step: 4 x PP (DualPipe: half from each end). Bubble = the largest "
           "per-rank idle time (step time - busy time), measured on the simulated schedule. "
           "Parameters: distinct model stages a rank holds, relative to one stage. Activation: "
           "peak "
           "micro-batch-stage activations alive on a rank (allocated when a forward starts, freed "
           "when its weight gradient is done).")
  notes = """The simulated bubbles equal the closed forms exactly in the first two regimes, for
every PP, and so do the memory columns (1x / PP, 1x / PP, 2x / PP+1; DualPipe's extra activation
is the forward chunk that starts together with a backward inside an F&B pair). The closed forms
are not universal. On the sweep of tests/analysis/test_timeline.py (PP = 8, F in 0.5..2, B in 1..4,
W in 0.25..2, F&B from max(F, B) to F+B), the ZB1P formula holds exactly iff W <= F and
W <= B-W (the deferred Ws fit in the gaps), and the DualPipe formula iff the input-gradient
backward B-W equals F and W <= F; in the third regime above (B-W = 1.5 F) DualPipe's simulated
bubble is smaller than the formula. Schedules: 1F1B as in Narayanan et al. 2021; ZB1P is ZB-H1
(Qi et al. 2023), the 1F1B order with each W deferred by the rank index; DualPipe follows the
eight phases of deepseek-ai/DualPipe, with the two middle ranks' first pair not overlapped."""
  R.write_markdown(NAME, "Pipeline bubbles and memory (DeepSeek-V3 report Table 2)",
                   [intro] + sections + [notes], "pipeline_bubbles.py")
  R.write_csv(NAME, csv_rows)

  fig, axes = plt.subplots(2, 1, figsize=(11, 6.5))
  dp = simulate_pipeline("DualPipe", 8, 20, 1.0, 2.0, 1.0, 3.0)
  gantt(axes[0], dp, f"DualPipe, PP=8, 20 micro-batches: bubble {dp.bubble:g} "
        f"(formula {dp.formula:g})")
  zb = simulate_pipeline("1F1B", 8, 20, 1.0, 2.0, 1.0)
  gantt(axes[1], zb, f"1F1B, PP=8, 20 micro-batches: bubble {zb.bubble:g} "
        f"(formula {zb.formula:g})")
  fig.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], fontsize=8,
             loc="lower center", ncol=4)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(R.path(NAME, "png"), dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
