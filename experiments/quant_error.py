"""Quantization error on real activations and gradients of the trained main job.

Tensors come from the checkpoint of `make train` (runs/orion_4x8, the tiny DeepSeek-V3 trained
120 steps on the 4 x 8 mesh), restored on one device (`train.trainer.load_trained`) and run on
held-out windows with the training loss (CE + MTP + balance, as trained). Captured per tensor
role, over every layer (MTP block included):

* activations: the MLA projections' inputs (normed hidden; the normed q / kv latents), the
  o_proj input (attention output), the MoE input (= the dispatch payload), the routed experts'
  SwiGLU output h (their down-projection input) and output rows (= the combine payload), the
  dense / shared MLPs' SwiGLU output;
* gradients: the MLA projections' output gradients, the routed experts' down-projection output
  gradient (= the combine backward payload, g_k = w_k dL/dy), their gate / up output gradients,
  the rows' input gradient (= the dispatch backward payload), the dense / shared MLPs' output
  gradients.

Linear inputs and output gradients come from the model's capture points (`dsv3_jax.model.capture`:
`nnx.sow` of every Linear input, a zero `nnx.Perturbation` on every Linear output, read with
`nnx.capture`). The MoE input is its shared expert's input and the MoE output gradient its shared
expert's output gradient (the shared expert sees the same x, and its output is added to the
routed experts'); the routing is the layer's own router applied to that input. The routed
experts, which run inside the grouped kernel, are recomputed per expert from the MoE input,
routing and output gradient.

Formats, each applied per 1 x 128 tile along the last (feature) axis: BF16 (round to nearest
even), E4M3 and E5M2 (max-abs scaling, power-of-two scales as in configs/orion_4x8_fp8.py),
LogFMT-8 and LogFMT-10 (arXiv 2505.09343 §3.2, linear-space nearest rounding); plus E4M3 with
one scale per tensor (per-tensor scaling, as in MaxText / Transformer Engine) for reference.
Errors: relative RMS error ||q(x) - x|| / ||x||; mean signed error mean(q(x) - x) / RMS(x);
magnitude bias sum(sign(x) (q(x) - x)) / sum |x| (< 0: magnitudes shrink); the fraction of
nonzero values flushed to zero; and the mean element-wise relative error |q(x) - x| / |x|.

Writes results/quant_error.{md,csv,png}.

    .venv/bin/python experiments/quant_error.py [--workdir runs/orion_4x8] [--windows 16]
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (role, kind, description)
ROLES = OrderedDict([
    ("mla_input", ("activation", "MLA input (normed hidden; q_a / kv_a input)")),
    ("mla_latent", ("activation", "MLA latents (normed; q_b / kv_b input)")),
    ("o_proj_input", ("activation", "o_proj input (attention output)")),
    ("moe_input", ("activation", "MoE input = dispatch payload")),
    ("routed_swiglu", ("activation", "routed experts: SwiGLU output h (down-proj input)")),
    ("routed_output", ("activation", "routed experts: output rows = combine payload")),
    ("mlp_swiglu", ("activation", "dense / shared MLP: SwiGLU output (down-proj input)")),
    ("mla_grad", ("gradient", "MLA projections: output gradients")),
    ("routed_out_grad", ("gradient", "routed experts: output gradient = combine backward")),
    ("routed_gate_up_grad", ("gradient", "routed experts: gate / up output gradients")),
    ("routed_input_grad", ("gradient", "routed experts: input gradient = dispatch backward")),
    ("mlp_grad", ("gradient", "dense / shared MLP: output gradients (down, gate, up)")),
])
FORMATS = ("BF16", "E4M3", "E5M2", "LogFMT-8", "LogFMT-10", "E4M3, per-tensor scale")


def _linear_role(path: tuple) -> tuple:
  """(input role, output-gradient role) of the Linear at `path`, None when not captured."""
  name, parent = path[-1], path[-2] if len(path) > 1 else ""
  if parent == "self_attn":
    inp = {"q_a_proj": "mla_input", "kv_a_proj_with_mqa": "mla_input", "q_proj": "mla_input",
           "q_b_proj": "mla_latent", "kv_b_proj": "mla_latent",
           "o_proj": "o_proj_input"}[name]
    return inp, "mla_grad"
  if name in ("gate_proj", "up_proj", "down_proj") and parent in ("mlp", "shared_experts"):
    return ("mlp_swiglu" if name == "down_proj" else None), "mlp_grad"
  return None, None  # lm_head, MTP eh_proj: not FP8 layers


def _name(path: tuple) -> str:
  return "/".join(map(str, path))


def _key(kind: str, path: tuple) -> str:
  return kind + ":" + _name(path)


def capture(workdir: str, n_windows: int, batch: int):
  """Runs the trained model on held-out windows; returns {role: [float32 arrays [N, C]]}."""
  from flax import nnx

  from dsv3_jax.model.layers import Linear
  from dsv3_jax.model.moe import DeepSeekMoE
  from dsv3_jax.train import data as data_lib
  from dsv3_jax.train import trainer

  cfg, model, step = trainer.load_trained(workdir)
  mc = model.config
  corpus = data_lib.load_corpus(cfg.data.paths, cfg.data.heldout_fraction)
  windows = data_lib.eval_windows(corpus.heldout, seq_len=cfg.data.seq_len, extra=mc.mtp_depth,
                                  n=n_windows)
  mtp_w, alpha = float(cfg.train.mtp_loss_weight), float(cfg.train.balance_loss_alpha)
  modules = {tuple(p): m for p, m in nnx.iter_modules(model)}
  linears = [p for p, m in modules.items() if isinstance(m, Linear)]
  moes = [p for p, m in modules.items() if isinstance(m, DeepSeekMoE)]
  graphdef, state = nnx.split(model)

  def loss_fn(m, window):
    b = trainer.make_batch(window, cfg.data.seq_len, mc.mtp_depth)
    out = m.forward(b.inputs, mtp_tokens=b.mtp_tokens if mc.mtp_depth else None, mask=b.mask,
                    with_mtp=mc.mtp_depth > 0)
    return trainer.compute_losses(out, b, mtp_weight=mtp_w, balance_alpha=alpha).total

  def flat(st) -> dict:
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(st)}

  def loss_and_acts(perturbations, window):
    """The training loss and the captured activations: "lin_in:<path>" = a Linear's input,
    "moe:<path>" = (MoE input [B, S, D], topk_idx [B S, k], topk_weight [B S, k])."""
    m = nnx.merge(graphdef, state)  # made inside the trace, so that nnx.capture may annotate it
    loss, sown = nnx.capture(loss_fn, nnx.Intermediate, init=perturbations)(m, window)
    sown = flat(sown)
    acts = {}
    for path in linears:
      if _linear_role(path)[0]:
        (acts[_key("lin_in", path)],) = sown[path + ("input",)]  # each runs once per forward
    for path in moes:
      (acts[_key("moe", path)],) = sown[path + ("routing",)]  # (x, topk_idx, topk_weight)
    return loss, acts

  def output_grads(grads) -> dict:
    """"lin_out:<path>" = dL/d(Linear output), "moe_out:<path>" = dL/d(MoE output)."""
    g = flat(grads)
    out = {_key("lin_out", p): g[p + ("output",)] for p in linears}
    out.update({_key("moe_out", p): g[p + ("output",)] for p in moes})
    return out

  @jax.jit
  def grads_and_acts(perturbations, window):
    grads, acts = jax.grad(loss_and_acts, has_aux=True)(perturbations, window)
    return output_grads(grads), acts

  w0 = jnp.asarray(windows[:batch])
  _, shapes = jax.eval_shape(  # the perturbations: one zero per Linear output
      lambda w: nnx.capture(loss_fn, nnx.Perturbation)(nnx.merge(graphdef, state), w), w0)
  probes = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  out = {r: [] for r in ROLES}
  paths = {_name(p): p for p in linears}
  moe_modules = {_name(p): modules[p] for p in moes}
  to_2d = lambda a: np.asarray(a, np.float32).reshape(-1, a.shape[-1])
  for i in range(0, len(windows) - batch + 1, batch):
    grads, acts = grads_and_acts(probes, jnp.asarray(windows[i:i + batch]))
    for key, val in acts.items():  # sorted by key: the Linear inputs, then the MoE layers
      kind, name = key.split(":", 1)
      if kind == "lin_in":
        out[_linear_role(paths[name])[0]].append(to_2d(val))
      else:  # MoE: recompute the routed experts per expert
        x, idx, w = val
        k = idx.shape[-1]
        routed = _routed_tensors(moe_modules[name], to_2d(x), np.asarray(idx).reshape(-1, k),
                                 np.asarray(w).reshape(-1, k), to_2d(grads["moe_out:" + name]))
        out["moe_input"].append(to_2d(x))
        for role, arr in routed.items():
          out[role].append(arr)
    for key, g in grads.items():
      if key.startswith("lin_out:"):
        role = _linear_role(paths[key.split(":", 1)[1]])[1]
        if role:
          out[role].append(to_2d(g))
  return out, dict(workdir=workdir, step=step, windows=len(windows), seq_len=cfg.data.seq_len)


def _routed_tensors(moe, x, idx, weight, gy) -> dict:
  """Per (token, expert) pair: h, output rows, their gradients, per expert in float32."""
  wg, wu, wd = (np.asarray(p[...], np.float32) for p in
                (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj))
  silu = lambda a: a / (1.0 + np.exp(-a))
  res = {k: [] for k in ("routed_swiglu", "routed_output", "routed_out_grad",
                         "routed_gate_up_grad", "routed_input_grad")}
  for e in range(wg.shape[0]):
    tok, slot = np.nonzero(idx == e)
    if not len(tok):
      continue
    xe = x[tok]
    pre, up = xe @ wg[e], xe @ wu[e]
    act = silu(pre)
    h = act * up
    g_out = weight[tok, slot][:, None] * gy[tok]  # combine backward: w_k dL/dy
    dh = g_out @ wd[e].T
    sig = 1.0 / (1.0 + np.exp(-pre))
    d_pre = dh * up * sig * (1.0 + pre * (1.0 - sig))
    d_up = dh * act
    res["routed_swiglu"].append(h)
    res["routed_output"].append(h @ wd[e])
    res["routed_out_grad"].append(g_out)
    res["routed_gate_up_grad"] += [d_pre, d_up]
    res["routed_input_grad"].append(d_pre @ wg[e].T + d_up @ wu[e].T)
  return {k: np.concatenate(v) for k, v in res.items()}


def _qdq(fmt: str):
  from dsv3_jax.quant import fp8, logfmt

  if fmt == "BF16":
    return jax.jit(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32))
  if fmt in ("E4M3", "E5M2"):
    return jax.jit(lambda a: fp8.qdq_tiles(a, tile=128, fmt=fmt.lower(), pow2_scale=True))
  if fmt.startswith("LogFMT"):
    bits = int(fmt.split("-")[1])
    return jax.jit(lambda a: logfmt.logfmt_qdq(a, bits, 128))
  # One scale for the whole tensor (max-abs over everything), as per-tensor scaling does.
  return jax.jit(lambda a: fp8.qdq_tiles(a.reshape(1, -1), tile=a.size, fmt="e4m3",
                                         pow2_scale=True).reshape(a.shape))


def errors(arrays: list, fmt: str, q) -> dict:
  """Error statistics of `fmt` over the tensors in `arrays` (each quantized on its own)."""
  se = s2 = sd = sa = sb = srel = 0.0
  n = nz = flushed = 0
  for a in arrays:
    x = a.astype(np.float64)
    d = np.asarray(q(jnp.asarray(a)), np.float64) - x
    se += float(np.sum(d * d))
    s2 += float(np.sum(x * x))
    sd += float(np.sum(d))
    sb += float(np.sum(np.sign(x) * d))
    sa += float(np.sum(np.abs(x)))
    n += x.size
    nonzero = x != 0
    nz += int(nonzero.sum())
    srel += float(np.sum(np.abs(d[nonzero] / x[nonzero])))
    flushed += int(np.sum(nonzero & (x + d == 0)))
  rms = np.sqrt(s2 / n)
  return dict(rel_rms_error=np.sqrt(se / s2), mean_signed_error=sd / n / rms,
              magnitude_bias=sb / sa, flushed_to_zero=flushed / max(nz, 1),
              mean_elementwise_rel_error=srel / max(nz, 1), elements=n,
              rms=rms)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "orion_4x8"))
  ap.add_argument("--windows", type=int, default=16, help="held-out windows (256 bytes each)")
  ap.add_argument("--batch", type=int, default=8)
  args = ap.parse_args()
  import _report as R

  tensors, info = capture(args.workdir, args.windows, args.batch)
  rows = []
  qs = {f: _qdq(f) for f in FORMATS}
  for role, (kind, desc) in ROLES.items():
    for fmt in FORMATS:
      r = errors(tensors[role], fmt, qs[fmt])
      rows.append(dict(role=role, kind=kind, tensor=desc, format=fmt, **r))
      print(f"{desc:60s} {fmt:24s} rel RMS {r['rel_rms_error']:.3e} mean signed "
            f"{r['mean_signed_error']:+.2e} bias {r['magnitude_bias']:+.2e} flushed "
            f"{r['flushed_to_zero']:.1e}", flush=True)
  R.write_csv("quant_error", rows)

  by = {(r["role"], r["format"]): r for r in rows}
  main_formats = FORMATS[:5]
  t_rms = R.md_table(
      ["tensor", "kind", "elements"] + list(FORMATS),
      [[desc, kind, R.fmt(by[(role, "BF16")]["elements"])] +
       [f"{100 * by[(role, f)]['rel_rms_error']:.3f} %" for f in FORMATS]
       for role, (kind, desc) in ROLES.items()])
  t_mean = R.md_table(
      ["tensor"] + [f"{f}: mean signed / bias" for f in main_formats],
      [[desc] + [f"{by[(role, f)]['mean_signed_error']:+.1e} / "
                 f"{by[(role, f)]['magnitude_bias']:+.1e}" for f in main_formats]
       for role, (kind, desc) in ROLES.items()])
  t_flush = R.md_table(
      ["tensor"] + [f for f in FORMATS if f != "BF16"],
      [[desc] + [f"{100 * by[(role, f)]['flushed_to_zero']:.3f} %" for f in FORMATS
                 if f != "BF16"] for role, (kind, desc) in ROLES.items()])
  t_elem = R.md_table(
      ["tensor"] + list(FORMATS),
      [[desc] + [f"{100 * by[(role, f)]['mean_elementwise_rel_error']:.2f} %" for f in FORMATS]
       for role, (kind, desc) in ROLES.items()])
  mean_rel = {f: float(np.mean([by[(r, f)]["rel_rms_error"] for r in ROLES])) for f in FORMATS}
  pt = "E4M3, per-tensor scale"
  worst_flush = max(ROLES, key=lambda r: by[(r, pt)]["flushed_to_zero"])
  rms_gap = max(abs(by[(r, pt)]["rel_rms_error"] / by[(r, "E4M3")]["rel_rms_error"] - 1)
                for r in ROLES)
  bias_max = {f: max(abs(by[(r, f)]["magnitude_bias"]) for r in ROLES) for f in FORMATS}
  mean_max = {f: max(abs(by[(r, f)]["mean_signed_error"]) for r in ROLES) for f in FORMATS}
  sections = [
      f"Tensors of `{os.path.relpath(info['workdir'], ROOT)}` (step {info['step']}) on "
      f"{info['windows']} held-out windows of {info['seq_len']} bytes, with the training loss; "
      "every layer (MTP block included) pooled per tensor role. Quantization per 1 x 128 tile "
      "along the feature axis; E4M3 / E5M2 with max-abs, power-of-two scales (the FP8 "
      "config's); LogFMT with linear-space nearest rounding. The last column uses one scale "
      "per captured tensor (per layer and batch) instead of per tile.",
      "## Relative RMS error ||q(x) - x|| / ||x||",
      t_rms,
      "Mean over the tensor roles: " + ", ".join(
          f"{f} {100 * mean_rel[f]:.3f} %" for f in FORMATS) + ".",
      f"Per-tile and per-tensor E4M3 scaling give the same RMS error here (largest relative "
      f"difference {100 * rms_gap:.2f} %): the RMS error comes from the large values, whose "
      "relative rounding error does not depend on the scale. The difference is in the small "
      f"values, too small to move the RMS: per-tensor scaling flushes up to "
      f"{100 * by[(worst_flush, pt)]['flushed_to_zero']:.2f} % of the nonzero values to zero "
      f"({ROLES[worst_flush][1]}), per-tile scaling "
      f"{100 * by[(worst_flush, 'E4M3')]['flushed_to_zero']:.3f} % (tables below).",
      "## Mean signed error mean(q(x) - x) / RMS(x) and magnitude bias "
      "sum(sign(x)(q(x) - x)) / sum|x|",
      "The signed error averages out (largest |mean signed error| per format: " + ", ".join(
          f"{f} {mean_max[f]:.1e}" for f in main_formats) + "); the magnitude bias does not: "
      "round-to-nearest on values whose density falls off within each quantization step "
      "shrinks magnitudes on average (largest |bias|: " + ", ".join(
          f"{f} {bias_max[f]:.1e}" for f in main_formats) + "), always well below the RMS "
      "error.",
      t_mean,
      "## Nonzero values flushed to zero",
      t_flush,
      "## Mean element-wise relative error mean(|q(x) - x| / |x|) over nonzero x",
      "Unlike the RMS error (dominated by the large elements, whose relative rounding error "
      "does not depend on the scale), this weighs every element alike, so it also shows what "
      "a coarse scale does to the small ones (a flushed element counts 100 %).",
      t_elem,
  ]
  R.write_markdown("quant_error", "Quantization error on real activations and gradients "
                   "(trained main job)", sections, "quant_error.py")

  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(10, 4.8))
  roles = list(ROLES)
  width = 0.8 / len(FORMATS)
  for j, f in enumerate(FORMATS):
    ax.bar(np.arange(len(roles)) + (j - len(FORMATS) / 2 + 0.5) * width,
           [by[(r, f)]["rel_rms_error"] for r in roles], width, label=f)
  ax.set_yscale("log")
  ax.set_xticks(np.arange(len(roles)), [r.replace("_", "\n") for r in roles], fontsize=7)
  ax.set_ylabel("relative RMS error")
  ax.set_title("Quantization error on the trained main job's tensors (1 x 128 tiles)")
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(R.path("quant_error", "png"), dpi=120)
  print("wrote results/quant_error.md, .csv, .png")


if __name__ == "__main__":
  main()
