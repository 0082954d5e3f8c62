"""Network topology sizes and costs (Insights Table 3) and link latency (Insights Table 5).

Writes results/network_cost.{md,csv,png}. Run: .venv/bin/python experiments/network_cost.py
"""

import _report as R  # first: it selects the Agg backend before pyplot loads

import matplotlib.pyplot as plt
import numpy as np

from dsv3_jax.analysis import hardware
from dsv3_jax.analysis.network import (dragonfly, end_to_end_latency, fat_tree_2,
                                       fit_prices, slim_fly, table3_topologies)

NAME = "network_cost"
# Insights Table 3, 64-port switches: endpoints, switches, links, cost (M$), cost/endpoint (k$).
PAPER = {
    "FT2": (2048, 96, 2048, 9, 4.39),
    "MPFT": (16384, 768, 16384, 72, 4.39),
    "FT3": (65536, 5120, 131072, 491, 7.5),
    "SF": (32928, 1568, 32928, 146, 4.4),
    "DF": (261632, 16352, 384272, 1522, 5.8),
}


def main():
  radix = hardware.IB_SWITCH_RADIX
  topo = table3_topologies(radix)
  rows, csv_rows = [], []
  for key in ("endpoints", "switches", "links"):
    i = ("endpoints", "switches", "links").index(key)
    cells = [key.capitalize()]
    for n, t in topo.items():
      ours, paper = getattr(t, key), PAPER[n][i]
      cells.append(f"{ours:,} / {paper:,}" + ("" if ours == paper else " ✗"))
    rows.append(cells)
  table = R.md_table(["Metric (computed / paper)"] + list(topo), rows)

  # Prices: the paper does not list them; fit one switch price and one link price to its costs.
  names = list(topo)
  s_price, l_price = fit_prices([topo[n] for n in names], [PAPER[n][3] * 1e6 for n in names])
  cost_rows, residuals = [], []
  for n in names:
    t = topo[n]
    cost = t.cost(s_price, l_price)
    per = t.cost_per_endpoint(s_price, l_price)
    residuals.append(abs(per / 1e3 / PAPER[n][4] - 1))
    cost_rows.append([n, R.fmt(cost / 1e6, 0), R.fmt(float(PAPER[n][3]), 0),
                      R.pct(R.rel_diff(cost / 1e6, PAPER[n][3])), R.fmt(per / 1e3, 2),
                      R.fmt(PAPER[n][4], 2), R.pct(R.rel_diff(per / 1e3, PAPER[n][4]))])
    csv_rows.append(dict(table="table3", topology=n, radix=radix, endpoints=t.endpoints,
                         switches=t.switches, links=t.links,
                         parameters=";".join(f"{k}={v}" for k, v in t.parameters),
                         paper_endpoints=PAPER[n][0], paper_switches=PAPER[n][1],
                         paper_links=PAPER[n][2], fitted_switch_price=s_price,
                         fitted_link_price=l_price, cost_musd=cost / 1e6,
                         paper_cost_musd=PAPER[n][3], cost_per_endpoint_kusd=per / 1e3,
                         paper_cost_per_endpoint_kusd=PAPER[n][4]))
  cost_table = R.md_table(["Topology", "Cost (M$, fitted prices)", "Paper", "Diff",
                           "Cost / endpoint (k$)", "Paper", "Diff"], cost_rows)

  # Knob: the same networks with 128-port RoCE switches, and price sensitivity.
  knob_rows = []
  for label, sp, lp in (("fitted", s_price, l_price), ("links x2", s_price, 2 * l_price),
                        ("switches x2", 2 * s_price, l_price)):
    knob_rows.append([label] + [R.fmt(topo[n].cost_per_endpoint(sp, lp) / 1e3, 2)
                                for n in names])
  roce = table3_topologies(hardware.ROCE_SWITCH_RADIX)
  knob_rows.append(["endpoints with 128-port RoCE switches"] +
                   [R.fmt(roce[n].endpoints) for n in names])
  knob_table = R.md_table(["Cost / endpoint (k$) under"] + names, knob_rows)

  sf_pp = slim_fly(radix, require_prime_power=True)
  df_max = dragonfly(radix, groups="max")
  sf_q = dict(topo["SF"].parameters)
  df_p = dict(topo["DF"].parameters)
  notes = f"""Counts come from the radix k = {radix} alone: FT2 k^2/2 endpoints, 3k/2 switches,
k^2/2 leaf-spine links; MPFT = 8 planes of FT2; FT3 k^3/4, 5k^2/4, k^3/2; Slim Fly 2q^2 routers with
network radix k' = (3q - delta)/2 and p = ceil(k'/2) endpoints each, the largest q that fits
(q = {sf_q['q']}, k' = {sf_q['network_radix']}, p = {sf_q['p']}); balanced Dragonfly p = h =
{df_p['p']}, a = {df_p['a']}. "Links" are switch-to-switch cables.

* **Slim Fly:** q = {sf_q['q']} is not a prime power, so no MMS graph exists for it; Table 3 uses
  the formulas regardless. The largest constructible Slim Fly at k = 64 has q = 27:
  {sf_pp.endpoints:,} endpoints, {sf_pp.switches:,} switches, {sf_pp.links:,} links.
* **Dragonfly:** Table 3 corresponds to g = a*h - 1 = {df_p['g']} groups (`groups="insights"`); the
  textbook maximum g = a*h + 1 = {dict(df_max.parameters)['g']} gives {df_max.endpoints:,}
  endpoints,
  {df_max.switches:,} switches, {df_max.links:,} links. The paper does not say which rule it used.
* **Costs:** the paper gives no prices. A least-squares fit of one switch price and one link price
  to its five costs gives ${s_price:,.0f} per switch and ${l_price:,.0f} per link; the largest
  residual in cost per endpoint is {100 * max(residuals):.1f}%, so Table 3's costs are consistent
  with a switches + links model. Independent of prices, MPFT's cost per endpoint equals FT2's
  exactly (8 disjoint FT2s: 3/k switches and 1 link per endpoint), while FT3 needs 5/k switches
  and 2 links per endpoint."""

  # Latency (Table 5) and the linear switch-hop model extrapolated to a three-layer fat-tree.
  lat_rows = []
  for fabric, label in (("roce", "RoCE"), ("infiniband", "InfiniBand"), ("nvlink", "NVLink")):
    same = hardware.LATENCY_64B[(fabric, "same_leaf")]
    cross = hardware.LATENCY_64B.get((fabric, "cross_leaf"))
    model_same = end_to_end_latency(fabric, 1)
    model_cross = end_to_end_latency(fabric, 3) if cross else None
    ft3 = end_to_end_latency(fabric, 5) if cross else None
    lat_rows.append([label, R.fmt(model_same * 1e6, 2), R.fmt(same * 1e6, 2),
                     R.fmt(model_cross * 1e6, 2) if cross else "—",
                     R.fmt(cross * 1e6, 2) if cross else "—",
                     R.fmt(ft3 * 1e6, 2) if ft3 else "—",
                     R.fmt((cross - same) / 2 * 1e6, 2) if cross else "—"])
    csv_rows.append(dict(table="latency", topology=label, same_leaf_us=same * 1e6,
                         cross_leaf_us=cross * 1e6 if cross else None,
                         ft3_5_switches_us=ft3 * 1e6 if ft3 else None))
  lat_table = R.md_table(["Link layer", "Same leaf (us), model", "Paper", "Cross leaf (us), model",
                          "Paper", "5 switches (FT3 cross-pod), extrapolated",
                          "Per extra switch (us)"], lat_rows)
  lat_notes = ("CPU-side end-to-end latency of a 64-byte transfer. The model is latency = base + "
               "per-switch x switches, through Table 5's same-leaf (1 switch) and cross-leaf "
               "(3 switches) points; it reproduces them by construction and extrapolates the cost "
               "of the extra layer an FT3 adds, which MPFT avoids up to 16,384 GPUs.")

  R.write_markdown(NAME, "Network topologies: size, cost and latency (Insights Tables 3 and 5)",
                   [f"64-port switches (InfiniBand NDR). ✗ marks a mismatch.", table, notes,
                    "## Cost", cost_table, "## Knobs", knob_table,
                    "## Latency (Insights Table 5)", lat_table, lat_notes], "network_cost.py")
  R.write_csv(NAME, csv_rows)

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  x = np.arange(len(names))
  ours = [topo[n].cost_per_endpoint(s_price, l_price) / 1e3 for n in names]
  axes[0].bar(x - 0.2, ours, 0.4, label="fitted prices")
  axes[0].bar(x + 0.2, [PAPER[n][4] for n in names], 0.4, label="Table 3", color="0.6")
  axes[0].set_xticks(x, names)
  axes[0].set_ylabel("cost per endpoint (k$)")
  axes[0].legend(fontsize=8)
  ks = np.arange(16, 130, 8)
  for label, fn in (("FT2", fat_tree_2),
                    ("MPFT (8 planes)", lambda k: table3_topologies(k)["MPFT"]),
                    ("FT3", lambda k: table3_topologies(k)["FT3"]),
                    ("SF", lambda k: slim_fly(int(k))),
                    ("DF", lambda k: dragonfly(int(k), "insights"))):
    axes[1].plot(ks, [fn(int(k)).endpoints for k in ks], label=label)
  axes[1].set_yscale("log")
  axes[1].set_xlabel("switch radix k")
  axes[1].set_ylabel("endpoints")
  axes[1].axvline(64, color="0.7", lw=0.8)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(R.path(NAME, "png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
