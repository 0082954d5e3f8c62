"""SLO benchmark: a Poisson request stream through the serving engine, colocated vs
disaggregated, with and without two-batch overlap and MTP speculative decoding.

The serving setups of the Insights paper (§2.3, §2.3.1) and the V3 report (§3.4, §5.4.3), on
the emulated cluster with the main job's model (runs/orion_4x8; `make train` first):

- colocated: prefill and decode on one (`node`, `gpu`) mesh (`--mesh`, default 1 x 4);
- disaggregated: prefill on one mesh, decode on a second, disjoint one of the same shape, the
  latent cache moved between them (`infer.disaggregated`);
- + overlap: two micro-batches per step (`micro_batches=2`, `infer.overlap`);
- + MTP: speculative decoding with the trained MTP module (`speculative_depth=1`).

Requests: prompts of mixed lengths (`--prompt-lengths`) cut from the run's held-out text, each
asking for `--new-tokens` greedy tokens; arrivals Poisson at several rates, given as fractions
of the colocated engine's saturated throughput (measured first: every request at t = 0). Each
stream is replayed with `infer.load.run_stream`: the engine steps back to back and a virtual
clock advances by each step's measured (wall-clock) duration, so TTFT / TPOT are what a server
doing this work on this machine would see, and the run takes only the compute time (no idle
waiting for arrivals; a loaded machine still inflates every step). For the disaggregated setups the prefill and decode phases of a step are measured one
after the other (one process) and composed as concurrent (separate machines in the deployment
emulated): that composition is modelled, the phase durations are measured. Every engine first
runs every stream once untimed (compiling each shape bucket the streams use); the
recompiles column counts compilations during the measured streams (0 expected).

    python experiments/serving_load.py [--requests 24] [--rates 0.25 0.5 1.0 1.5] [--setups ...]

Writes results/serving_load.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import _report as R

WORKDIR = os.path.join(R.REPO_ROOT, "runs", "orion_4x8")
PAGE_SIZE = 16


def _devices_needed(mesh):
  return 2 * mesh[0] * mesh[1]


def _prompts(workdir, lengths, n, seed):
  """n prompts cut at random offsets from the run's held-out text, lengths drawn from `lengths`."""
  import numpy as np

  from dsv3_jax.train.data import load_corpus
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  data = cfg["data"]
  corpus = load_corpus(data.get("paths"), data["heldout_fraction"])
  held = corpus.heldout
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.choice(lengths))
    start = int(rng.integers(0, len(held) - length))
    out.append(held[start:start + length].tolist())
  return out


def _setups(model, mesh_shape, args):
  """name -> a function building that engine."""
  from dsv3_jax.infer import Engine
  from dsv3_jax.infer.disaggregated import DisaggregatedEngine, disaggregated_meshes
  from dsv3_jax.parallel.mesh import make_mesh

  import jax
  devices = jax.devices()
  n = mesh_shape[0] * mesh_shape[1]
  colocated_mesh = make_mesh(*mesh_shape, devices=devices[:n])
  pre_mesh, dec_mesh = disaggregated_meshes(mesh_shape, mesh_shape)
  # Few static shapes (one batch size per device, two prompt lengths, one page count): every
  # step shape is compiled by the warm-up, and a measured stream never compiles.
  longest = max(args.prompt_lengths)
  common = dict(max_batch=args.max_batch, page_size=PAGE_SIZE,
                batch_buckets=(args.max_batch // n,),
                prompt_buckets=tuple(sorted({min(32, longest), longest})),
                page_buckets=(-(-(longest + args.new_tokens) // PAGE_SIZE),))

  def colocated(**kw):
    return lambda: Engine(model, mesh=colocated_mesh, **common, **kw)

  def disaggregated(**kw):
    return lambda: DisaggregatedEngine(model, prefill_mesh=pre_mesh, mesh=dec_mesh, **common,
                                       prefill_batch_buckets=common["batch_buckets"], **kw)

  return {
      "colocated": colocated(),
      "colocated + overlap": colocated(micro_batches=2),
      "colocated + MTP": colocated(speculative_depth=1),
      "disaggregated": disaggregated(),
      "disaggregated + overlap": disaggregated(micro_batches=2),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default=WORKDIR)
  p.add_argument("--mesh", type=int, nargs=2, default=(1, 4), metavar=("NODES", "GPUS"))
  p.add_argument("--requests", type=int, default=24)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--prompt-lengths", type=int, nargs="+", default=(16, 32, 64, 128))
  p.add_argument("--rates", type=float, nargs="+", default=(0.25, 0.5, 1.0, 1.5),
                 help="arrival rates as fractions of the colocated saturated throughput")
  p.add_argument("--max-batch", type=int, default=16)
  p.add_argument("--setups", nargs="+", default=None, help="a subset of the setups, by name")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  if not os.path.isfile(os.path.join(args.workdir, "summary.json")):
    raise SystemExit(f"{args.workdir} holds no finished training run: run `make train` first "
                     "(or pass --workdir)")
  if any(r <= 0 for r in args.rates):
    raise SystemExit(f"--rates must be > 0, got {args.rates}")
  from dsv3_jax.parallel.mesh import set_host_device_count
  set_host_device_count(_devices_needed(args.mesh))

  from dsv3_jax.infer.load import Request, poisson_requests, run_stream
  from dsv3_jax.train.trainer import load_trained

  _, model, step = load_trained(args.workdir)
  prompts = _prompts(args.workdir, args.prompt_lengths, args.requests, args.seed)
  setups = _setups(model, tuple(args.mesh), args)
  if args.setups:
    unknown = sorted(set(args.setups) - set(setups))
    if unknown:
      raise SystemExit(f"--setups: unknown {unknown}; allowed: {sorted(setups)}")
    setups = {k: v for k, v in setups.items() if k in args.setups}
  burst = [Request(0.0, tuple(pr), args.new_tokens) for pr in prompts]

  rows, started = [], time.time()
  capacity_rps = None
  for name, build in setups.items():
    t0 = time.perf_counter()
    engine = build()
    concurrent = name.startswith("disaggregated")
    run_stream(engine, burst)  # compiles the burst's shape buckets
    run_stream(engine, [r for r in burst if len(r.prompt) <= 32])  # and the short prompts'
    if capacity_rps is None:  # the first (colocated) engine sets the load scale
      capacity_rps = args.requests / run_stream(engine, burst).duration_s
    streams = [("saturated", None, burst)] + [
        (f"{frac:g}", frac * capacity_rps,
         poisson_requests(frac * capacity_rps, args.requests, prompts, args.new_tokens,
                          seed=args.seed + 1)) for frac in args.rates]
    for _, _, reqs in streams[1:]:  # warm-up: every shape bucket any stream uses
      run_stream(engine, reqs, concurrent_phases=concurrent)
    warm = sum(engine.compiles.values())
    for load, rps, reqs in streams:
      res = run_stream(engine, reqs, concurrent_phases=concurrent)
      counts = res.counts
      drafted, accepted = counts.get("spec_drafted", 0), counts.get("spec_accepted", 0)
      rows.append(dict(
          setup=name, load=load, rate_rps=rps, **res.summary(),
          acceptance=(accepted / drafted) if drafted else None,
          moved_bytes_per_prompt_token=(counts["transfer_bytes"] / counts["transfer_tokens"]
                                        if counts.get("transfer_tokens") else None),
          recompiles=sum(engine.compiles.values()) - warm))
    sat = rows[-len(streams)]
    print(f"{name}: {time.perf_counter() - t0:.0f} s; saturated {sat['throughput_tok_s']:.0f} "
          f"tok/s, p99 TPOT {sat['tpot_p99_ms']:.1f} ms", flush=True)
  _write(rows, args, step, capacity_rps, time.time() - started)


def _write(rows, args, step, capacity_rps, wall_s):
  import matplotlib.pyplot as plt

  R.write_csv("serving_load", rows)
  head = ["setup", "load", "arrivals/s", "TTFT p50 (ms)", "TTFT p99 (ms)", "TPOT p50 (ms)",
          "TPOT p99 (ms)", "output tok/s", "cache occupancy mean / max", "MTP acceptance",
          "moved B / prompt token", "recompiles"]
  table = [[r["setup"], r["load"], R.fmt(r["rate_rps"], 1), R.fmt(r["ttft_p50_ms"], 1),
            R.fmt(r["ttft_p99_ms"], 1), R.fmt(r["tpot_p50_ms"], 2), R.fmt(r["tpot_p99_ms"], 2),
            R.fmt(r["throughput_tok_s"], 0),
            f"{r['occupancy_mean']:.2f} / {r['occupancy_max']:.2f}",
            "—" if r["acceptance"] is None else f"{100 * r['acceptance']:.1f} %",
            R.fmt(r["moved_bytes_per_prompt_token"], 0), r["recompiles"]] for r in rows]
  nodes, gpus = args.mesh
  intro = (
      f"Generated by `experiments/serving_load.py` on {platform.machine()}, "
      f"{os.cpu_count()} CPU cores, in {wall_s:.0f} s. Model: the main job's checkpoint "
      f"(runs/orion_4x8, step {step}), float32. {args.requests} requests per stream, prompts "
      f"of {', '.join(map(str, args.prompt_lengths))} bytes cut from the run's held-out text, "
      f"{args.new_tokens} greedy tokens each; colocated on a {nodes} x {gpus} mesh, "
      f"disaggregated on two disjoint {nodes} x {gpus} meshes (prefill, decode); max batch "
      f"{args.max_batch}, 16-token pages. Load = arrival rate as a fraction of the colocated "
      f"engine's saturated throughput ({capacity_rps:.2f} requests/s: every request at t = 0); "
      "'saturated' = that burst.\n\n"
      "What is measured and what is modelled: every engine step is timed on this machine and "
      "a virtual clock advances by it (infer/load.py): no idle time is spent waiting for "
      "arrivals, but the step durations are wall-clock, so they grow with other jobs' load "
      f"(1-minute load average {os.getloadavg()[0]:.1f} at the end), and they reflect the CPU "
      "emulation (all emulated devices share 2 cores, collectives execute synchronously). "
      "Static shapes: one batch size per device, two prompt lengths and one page count are "
      "compiled, so short prompts and small batches are padded (TTFT and TPOT at low load "
      "are those of a full bucket). For the disaggregated setups the step's prefill "
      "(+ cache transfer) and decode phases are measured one after the other and composed as "
      "concurrent, as on separate machines (modelled). Two-batch overlap cannot hide "
      "communication on this machine (the emulated all-to-alls are synchronous copies on the "
      "same cores), so here it shows its cost (two half-size micro-batches); its modelled "
      "effect with H800 constants is in results/two_batch_overlap.md. MTP acceptance is the "
      "share of drafted tokens the main model accepted.")
  R.write_markdown("serving_load", "Serving under load: TTFT / TPOT at p50 and p99",
                   [intro, R.md_table(head, table)], "serving_load.py")
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  for setup in dict.fromkeys(r["setup"] for r in rows):
    pts = [r for r in rows if r["setup"] == setup and r["rate_rps"] is not None]
    x = [r["rate_rps"] for r in pts]
    ax[0].plot(x, [r["tpot_p99_ms"] for r in pts], "o-", label=setup)
    ax[1].plot(x, [r["ttft_p99_ms"] for r in pts], "o-", label=setup)
  ax[0].set(xlabel="arrivals per second", ylabel="p99 TPOT (ms)", title="p99 time per output token")
  ax[1].set(xlabel="arrivals per second", ylabel="p99 TTFT (ms)", title="p99 time to first token",
            yscale="log")
  ax[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(R.path("serving_load", "png"), dpi=120)


if __name__ == "__main__":
  main()
