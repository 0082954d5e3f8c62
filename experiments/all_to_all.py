"""All-to-all on multi-rail vs multi-plane fat-trees (Insights §5.1), simulated.

Writes results/all_to_all.{md,csv,png}. Run: .venv/bin/python experiments/all_to_all.py
"""

import _report as R  # first: it selects the Agg backend before pyplot loads

import matplotlib.pyplot as plt

from dsv3_jax.analysis import all_to_all, hardware

NAME = "all_to_all"
NODES = (2, 4, 8, 16, 32, 64)  # x 8 GPUs: 16 .. 512 GPUs (64 nodes span two leaves per plane)
SIZES = (64 * 1024, 4 * 1024 * 1024)  # bytes per (source, destination) pair


def main():
  rows, csv_rows = [], []
  curves = {}
  for size in SIZES:
    for n in NODES:
      res = {f: all_to_all(f, n, size) for f in ("multi_rail", "multi_plane")}
      mr, mp = res["multi_rail"], res["multi_plane"]
      rows.append([R.fmt(n * 8), f"{size // 1024:,} KiB", R.fmt(mr.time_s * 1e3, 3),
                   R.fmt(mp.time_s * 1e3, 3), R.pct(mp.time_s / mr.time_s - 1),
                   R.fmt(mr.busbw / 1e9, 1), R.fmt(mp.busbw / 1e9, 1), mp.bottleneck,
                   R.fmt(mp.forwarded_bytes / (n * 8) / 1e6, 1)])
      for f, r in res.items():
        curves.setdefault((f, size), []).append((r.gpus, r.busbw / 1e9))
        csv_rows.append(dict(table="default", fabric=f, gpus=r.gpus, bytes_per_peer=size,
                             time_ms=r.time_s * 1e3, busbw_GBps=r.busbw / 1e9,
                             bottleneck=r.bottleneck, forwarded_MB=r.forwarded_bytes / 1e6))
  table = R.md_table(["GPUs", "Bytes per peer", "MRFT time (ms)", "MPFT time (ms)",
                      "MPFT vs MRFT", "MRFT busbw (GB/s)", "MPFT busbw (GB/s)", "Bottleneck",
                      "NVLink-forwarded per GPU (MB)"], rows)

  # Knob: NVLink bandwidth. MPFT relays 7/8 of inter-node traffic over NVLink.
  knob_rows = []
  for nvl in (160e9, 80e9, 40e9, 20e9):
    mr = all_to_all("multi_rail", 16, SIZES[1], nvlink_bandwidth=nvl)
    mp = all_to_all("multi_plane", 16, SIZES[1], nvlink_bandwidth=nvl)
    knob_rows.append([R.fmt(nvl / 1e9, 0), R.fmt(mr.time_s * 1e3, 2), R.fmt(mp.time_s * 1e3, 2),
                      R.pct(mp.time_s / mr.time_s - 1), mp.bottleneck])
    csv_rows.append(dict(table="nvlink_knob", fabric="both", gpus=128, bytes_per_peer=SIZES[1],
                         nvlink_GBps=nvl / 1e9, mrft_ms=mr.time_s * 1e3, mpft_ms=mp.time_s * 1e3))
  knob = R.md_table(["NVLink GB/s per GPU", "MRFT (ms)", "MPFT (ms)", "MPFT vs MRFT",
                     "MPFT bottleneck"], knob_rows)
  notes = f"""Flow-level simulation: every (source GPU, destination GPU) flow is routed hop by hop
and its bytes are added to each resource it crosses (NVLink out/in per GPU at
{hardware.H800.scale_up_bandwidth_achieved / 1e9:.0f} GB/s, NIC up/down at
{hardware.H800.scale_out_bandwidth_effective / 1e9:.0f} GB/s effective IB, leaf up/down links);
the all-to-all ends when the busiest resource drains, plus the longest path's latency (Table 5
model: 2.8 us through one IB switch, +0.45 us per extra switch, 3.33 us per NVLink hop). In the
multi-plane fat-tree a GPU reaches another plane only through its node: plane-aware routing
relays cross-plane flows over NVLink to the GPU of the destination's plane (PXN-style).

Both fabrics are bound by the same NIC load (each NIC carries 8 x (nodes - 1) x bytes in each
direction), so MPFT matches MRFT to within the extra NVLink hop's latency, as Insights §5.1
reports for NCCL on 32-128 GPUs. Busbw above the 40 GB/s NIC rate is the intra-node share moving
over NVLink. MPFT depends on spare NVLink bandwidth: the knob below lowers it until the relay
becomes the bottleneck."""
  R.write_markdown(NAME, "All-to-all: multi-rail vs multi-plane fat-tree (Insights §5.1)",
                   [table, notes, "## Knob: NVLink bandwidth (128 GPUs, 4 MiB per peer)", knob],
                   "all_to_all.py")
  R.write_csv(NAME, csv_rows)

  fig, ax = plt.subplots(figsize=(6.5, 3.6))
  for (f, size), pts in curves.items():
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if f == "multi_rail" else "x",
            linestyle="-" if f == "multi_rail" else "--",
            label=f"{'MRFT' if f == 'multi_rail' else 'MPFT'}, {size // 1024} KiB/peer")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("GPUs")
  ax.set_ylabel("all-to-all busbw (GB/s)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(R.path(NAME, "png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
