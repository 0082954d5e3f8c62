"""FP8 GEMM accumulation error vs K, with and without FP32 promotion (DeepSeek-V3 report §3.3.2).

The report: "Taking GEMM operations of two random matrices with K = 4096 for example, in our
preliminary test, the limited accumulation precision in Tensor Cores results in a maximum
relative error of nearly 2%"; the fix promotes partial sums to FP32 every N_C = 128 products.

Here: E4M3 inputs with the report's scaling (A in 1x128 tiles along K, B in 128x128 blocks),
multiplied three ways and compared with the float64 product of the *dequantized* inputs (so only
the accumulation error is measured):

* `no_promotion`: the whole K in the emulated FP22 tensor-core accumulator
  (`dsv3_jax.quant.fp8.accumulate_dot`, 13 mantissa bits, groups of 32, truncation);
* `promotion_128`: the same accumulator, promoted to FP32 every N_C = 128 products;
* `fp32`: exact float32 accumulation (the floor).

Two input families: `normal` (A, B ~ N(0, 1): products of random sign, as for activations times
zero-mean weights) and `uniform` (A, B ~ U[0, 1): every product positive, the worst case for a
truncating accumulator). For each K, `SEEDS` products of [64, K] x [K, 64].

Writes results/fp8_accumulation.{csv,md,png}. Run: .venv/bin/python experiments/fp8_accumulation.py
"""

import csv
import os
import time

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.quant import fp8  # noqa: E402

KS = [2 ** p for p in range(7, 15)]  # 128 ... 16384
SEEDS = 4
M = N = 64
MANTISSA_BITS = 13  # FP22 (arXiv 2505.09343 §3.1); "about 14 retained bits" with the leading 1
N_C = 128
DISTS = ("normal", "uniform")
MODES = {
    "no_promotion": dict(mantissa_bits=MANTISSA_BITS, promotion_interval=None),
    "promotion_128": dict(mantissa_bits=MANTISSA_BITS, promotion_interval=N_C),
    "fp32": dict(mantissa_bits=None, promotion_interval=None),
}
# Sensitivity of the K = 4096, no-promotion error to the accumulator model.
VARIANTS = {
    "13 bits, truncate, groups of 32 (default)": dict(mantissa_bits=13),
    "13 bits, round-to-nearest, groups of 32": dict(mantissa_bits=13, rounding="nearest"),
    "13 bits, truncate, after every product": dict(mantissa_bits=13, group=1),
    "14 bits, truncate, groups of 32": dict(mantissa_bits=14),
}
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def inputs(dist, k, seed):
  rng = np.random.default_rng(1000 * seed + k)
  if dist == "normal":
    a, b = rng.standard_normal((M, k)), rng.standard_normal((k, N))
  else:
    a, b = rng.random((M, k)), rng.random((k, N))
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  aq, bq = fp8.qdq_tiles(a), fp8.qdq_blocks(b)  # E4M3, 1x128 tiles / 128x128 blocks
  return (a, b), (aq, bq)


def errors(y, ref):
  """(normwise relative error, elementwise relative errors of well-conditioned entries)."""
  y = np.asarray(y, np.float64)
  norm = np.linalg.norm(y - ref) / np.linalg.norm(ref)
  keep = np.abs(ref) >= 0.1 * np.sqrt(np.mean(ref ** 2))  # skip near-cancellations
  return norm, np.abs(y - ref)[keep] / np.abs(ref)[keep]


def main():
  t0 = time.time()
  rows, input_err = [], {}
  for dist in DISTS:
    for k in KS:
      acc = {mode: ([], []) for mode in MODES}
      q_err = []
      for seed in range(SEEDS):
        (a, b), (aq, bq) = inputs(dist, k, seed)
        ref = np.asarray(aq, np.float64) @ np.asarray(bq, np.float64)
        for mode, kw in MODES.items():
          norm, elem = errors(fp8.accumulate_dot(aq, bq, **kw), ref)
          acc[mode][0].append(norm)
          acc[mode][1].append(elem)
        true = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
        q_err.append(errors(ref, true)[0])
      input_err[(dist, k)] = float(np.mean(q_err))
      for mode, (norms, elems) in acc.items():
        elems = np.concatenate(elems)
        rows.append(dict(dist=dist, K=k, mode=mode, seeds=SEEDS,
                         norm_rel_err_mean=float(np.mean(norms)),
                         norm_rel_err_max=float(np.max(norms)),
                         elem_rel_err_mean=float(np.mean(elems)),
                         elem_rel_err_max=float(np.max(elems))))
      print(f"{dist:8s} K={k:6d} " + "  ".join(
          f"{r['mode']}={r['norm_rel_err_mean']:.2e}" for r in rows[-len(MODES):]),
            f"({time.time() - t0:.1f}s)", flush=True)

  variants = []
  for dist in DISTS:
    for name, kw in VARIANTS.items():
      norms, elems = [], []
      for seed in range(SEEDS):
        _, (aq, bq) = inputs(dist, 4096, seed)
        ref = np.asarray(aq, np.float64) @ np.asarray(bq, np.float64)
        norm, elem = errors(fp8.accumulate_dot(aq, bq, promotion_interval=None, **kw), ref)
        norms.append(norm)
        elems.append(elem)
      elems = np.concatenate(elems)
      variants.append(dict(dist=dist, variant=name, norm=float(np.mean(norms)),
                           elem_mean=float(np.mean(elems)), elem_max=float(np.max(elems))))
  runtime = time.time() - t0
  write(rows, input_err, variants, runtime)
  print(f"done in {runtime:.1f}s")


def write(rows, input_err, variants, runtime):
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, "fp8_accumulation.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)

  get = {(r["dist"], r["K"], r["mode"]): r for r in rows}
  fig, axes = plt.subplots(1, 2, figsize=(11, 5.0), sharey=True)
  styles = {"no_promotion": ("C3", "o", "FP22 accumulator, no promotion"),
            "promotion_128": ("C0", "s", f"FP22 + FP32 promotion every N_C={N_C}"),
            "fp32": ("C2", "^", "FP32 accumulation")}
  for ax, dist in zip(axes, DISTS):
    for mode, (color, marker, label) in styles.items():
      mean = [get[(dist, k, mode)]["elem_rel_err_mean"] for k in KS]
      mx = [get[(dist, k, mode)]["elem_rel_err_max"] for k in KS]
      ax.plot(KS, mean, color=color, marker=marker, label=label + " (mean)")
      ax.plot(KS, mx, color=color, marker=marker, ls="--", alpha=0.6, label=label + " (max)")
    ax.axhline(0.02, color="k", lw=0.8, ls=":")
    ax.text(KS[0], 0.022, "report: ~2% at K=4096", fontsize=8)
    ax.axvline(4096, color="gray", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K (contraction length)")
    ax.set_title(f"{dist} inputs, E4M3 (1x128 tiles / 128x128 blocks)")
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel("relative error vs FP64 of dequantized inputs")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
  fig.tight_layout(rect=(0, 0.13, 1, 1))
  fig.savefig(os.path.join(OUT, "fp8_accumulation.png"), dpi=120)

  def table(dist):
    lines = ["| K | no promotion: mean / max | promotion N_C=128: mean / max | "
             "FP32 accumulation: mean / max | normwise (no promo / promo / FP32) | "
             "FP8 input error (normwise) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for k in KS:
      cells = [f"{get[(dist, k, m)]['elem_rel_err_mean']:.2e} / "
               f"{get[(dist, k, m)]['elem_rel_err_max']:.2e}" for m in MODES]
      norms = " / ".join(f"{get[(dist, k, m)]['norm_rel_err_mean']:.1e}" for m in MODES)
      lines.append(f"| {k} | " + " | ".join(cells) + f" | {norms} | "
                   f"{input_err[(dist, k)]:.1e} |")
    return "\n".join(lines)

  n4 = {d: get[(d, 4096, "no_promotion")] for d in DISTS}
  p4 = {d: get[(d, 4096, "promotion_128")] for d in DISTS}
  f4 = {d: get[(d, 4096, "fp32")] for d in DISTS}
  slope = {d: float(np.polyfit(np.log(KS), np.log(
      [get[(d, k, "no_promotion")]["elem_rel_err_mean"] for k in KS]), 1)[0]) for d in DISTS}
  ratio = {d: n4[d]["norm_rel_err_mean"] / p4[d]["norm_rel_err_mean"] for d in DISTS}
  inratio = {d: input_err[(d, 4096)] / p4[d]["norm_rel_err_mean"] for d in DISTS}
  vbase = {v["dist"]: v["norm"] for v in variants if "(default)" in v["variant"]}
  vr = {(v["dist"], key): vbase[v["dist"]] / v["norm"] for v in variants
        for key in ("nearest", "14") if key in v["variant"]}
  vt = ["| inputs | accumulator model (K = 4096, no promotion) | normwise | elementwise mean | "
        "elementwise max |", "|---|---|---:|---:|---:|"]
  vt += [f"| {v['dist']} | {v['variant']} | {v['norm']:.2e} | {v['elem_mean']:.2e} | "
         f"{v['elem_max']:.2e} |" for v in variants]
  md = f"""# FP8 GEMM accumulation error and FP32 promotion

Reproduces DeepSeek-V3 technical report §3.3.2 ("Increasing Accumulation Precision"):
"Taking GEMM operations of two random matrices with K = 4096 for example, ... the limited
accumulation precision in Tensor Cores results in a maximum relative error of nearly 2%", and
the fix of promoting partial results to FP32 every N_C = 128 products.
Script: `experiments/fp8_accumulation.py` (runtime {runtime:.0f} s on a 2-core CPU).

## Setup

- Inputs: A [{M}, K] and B [K, {N}], quantized to E4M3 as in the report (A: one scale per 1x128
  tile along K, B: one per 128x128 block). {SEEDS} seeds per K. `normal`: A, B ~ N(0, 1)
  (products of random sign, like activations times zero-mean weights); `uniform`: A, B ~ U[0, 1)
  (every product positive: the worst case for a truncating accumulator).
- Reference: the float64 product of the *dequantized* inputs, so the error shown is the
  accumulation error alone. The last column gives, for scale, the error of the FP32-accumulated
  FP8 product against the float64 product of the original (unquantized) inputs.
- Accumulator (`dsv3_jax.quant.fp8.accumulate_dot`): products exact; consumed 32 at a time (one
  Hopper FP8 WGMMA k-step); the 32 products and the running accumulator are aligned to their
  largest exponent E and cut to multiples of 2^(E-13) (truncation toward zero), summed exactly,
  and the sum truncated to 13 fraction bits (FP22: 1 sign, 8 exponent, 13 mantissa bits;
  arXiv 2505.09343 §3.1). Promotion adds the accumulator to a float32 sum every 128 products
  and resets it.
- Elementwise relative error |y - y_ref| / |y_ref| is taken over entries with
  |y_ref| >= 0.1 RMS(y_ref) (this drops near-cancellations, ~8% of `normal` entries and none of
  `uniform`); "mean / max" are over those entries of all seeds. "Normwise" is
  ||Y - Y_ref||_F / ||Y_ref||_F, averaged over seeds.

![error vs K](fp8_accumulation.png)

## normal inputs (elementwise relative error)

{table("normal")}

## uniform inputs (elementwise relative error)

{table("uniform")}

## Sensitivity to the accumulator model at K = 4096 (no promotion)

{chr(10).join(vt)}

## Reading

- Without promotion the error grows with K: the fitted slope of log(mean error) against log K
  is {slope['normal']:.2f} for `normal` inputs (random-sign products: the dropped low bits
  partly cancel, a random walk) and {slope['uniform']:.2f} for `uniform` ones (same-sign
  products: truncation toward zero loses about half a unit in the last place per 32-product
  group, always in the same direction, so the losses add up). In the sensitivity table,
  round-to-nearest instead of truncation divides the K = 4096 error by
  {vr['normal', 'nearest']:.1f}x (`normal`) and {vr['uniform', 'nearest']:.0f}x (`uniform`), a
  14th mantissa bit by {vr['normal', '14']:.1f}x and {vr['uniform', '14']:.1f}x; aligning after
  every product instead of per 32 changes little.
- At K = 4096 without promotion: `normal` inputs, mean {n4['normal']['elem_rel_err_mean']:.2%},
  max {n4['normal']['elem_rel_err_max']:.1%} (the max comes from the smallest kept entries,
  |y_ref| near 0.1 RMS); `uniform` inputs, mean {n4['uniform']['elem_rel_err_mean']:.1%}, max
  {n4['uniform']['elem_rel_err_max']:.1%}. The report's "maximum relative error of nearly 2%"
  lies within this range; its input distribution and exact accumulator behaviour are not
  published, so we reproduce the mechanism and its order of magnitude, not the figure itself.
- Promotion every N_C = 128 stops the growth: the error stays at the level of a single
  128-product chunk for every K (`normal` mean {p4['normal']['elem_rel_err_mean']:.2%}, max
  {p4['normal']['elem_rel_err_max']:.2%}; `uniform` mean {p4['uniform']['elem_rel_err_mean']:.2%},
  max {p4['uniform']['elem_rel_err_max']:.2%} at K = 4096), i.e. {ratio['normal']:.0f}x
  (`normal`) and {ratio['uniform']:.0f}x (`uniform`) below the unpromoted error at K = 4096
  and more at larger K. It does *not* reach the FP32-accumulation floor (mean
  {f4['normal']['elem_rel_err_mean']:.0e}): within each chunk the FP22 accumulator still
  rounds. Against the FP8 input quantization itself (last column) the promoted residual is
  {inratio['normal']:.0f}x smaller for `normal` inputs, so there a promoted FP8 GEMM is as good
  as an FP32-accumulated one, the report's point; for all-positive `uniform` inputs the input
  rounding errors average out in the sum ({input_err[('uniform', 4096)]:.1e} normwise at K =
  4096) while the chunk's truncation bias does not, and the promoted residual is
  {1 / inratio['uniform']:.1f}x *larger* than the input error.
"""
  with open(os.path.join(OUT, "fp8_accumulation.md"), "w") as f:
    f.write(md)


if __name__ == "__main__":
  main()
