"""Per-component time breakdown of the tiny DeepSeek-V3 training step on one device.

configs/tiny.py dims, 8 sequences of 256 bytes, float32, no MTP (the equal-size comparison of
experiments/benchmark_step.py). Each component is jitted on its own (with the training step's
XLA:CPU options, `train.step.TRAIN_CPU_OPTIONS`) at the shapes it sees in the
step and timed as the best of `--repeats` runs of `--iters` calls (the machine is shared; the
minimum is the least disturbed), forward and forward + backward (gradients w.r.t. inputs and
weights), and multiplied by the number of times the step runs it. The full step is timed the
same way; "rest" is the full step minus the listed components (embedding, norms, head and loss,
residual adds, the XLA ops around the modules, and the host's dispatch of the step).

The routed experts see a realistic, unbalanced load: row-to-expert assignment drawn with a
skewed distribution whose max/mean load matches the one `experiments/benchmark_step.py` reports
after its untimed training steps (~6.6; `--load-skew`).

    python experiments/profile_step.py [--iters 5] [--repeats 3] [--out results]

Writes results/profile_step.{md,csv}.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ = 8, 256


def _time(fn, args, iters, repeats):
  """(best wall-clock s, best process CPU s) per call over `repeats` runs of `iters` calls."""
  import jax
  out = fn(*args)
  jax.block_until_ready(out)  # compile + warm
  best, best_cpu = float("inf"), float("inf")
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / iters)
    best_cpu = min(best_cpu, (time.process_time() - c) / iters)
  return best, best_cpu


def skewed_experts(key, n_rows, n_experts, max_over_mean):
  """[n_rows] int32 expert ids whose most loaded expert holds ~max_over_mean x the mean."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  # Geometric weights; pick the ratio r so that p_0 * E = max_over_mean.
  lo, hi = 0.0, 1.0
  for _ in range(60):
    r = (lo + hi) / 2
    p = r ** np.arange(n_experts)
    p /= p.sum()
    if p[0] * n_experts > max_over_mean:
      lo = r
    else:
      hi = r
  perm = np.random.default_rng(0).permutation(n_experts)
  return jax.random.choice(key, n_experts, (n_rows,), p=jnp.asarray(p[perm])).astype(jnp.int32)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--load-skew", type=float, default=6.6)
  ap.add_argument("--out", default=os.path.join(ROOT, "results"))
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from configs import tiny
  from dsv3_jax.model import attention, experts as experts_lib
  from dsv3_jax.model.config import ModelConfig
  from dsv3_jax.model.layers import MLP
  from dsv3_jax.model.mla import MultiHeadLatentAttention
  from dsv3_jax.model.moe import Router
  from dsv3_jax.model.rope import rope_cos_sin
  from dsv3_jax.model.transformer import Transformer
  from dsv3_jax import xla_cpu
  from dsv3_jax.parallel import dispatch
  from dsv3_jax.train import data, step as step_lib, trainer

  # The components compile with the training step's XLA:CPU options, so the rows add up to it.
  jit = lambda fn: xla_cpu.cpu_jit(fn, step_lib.TRAIN_CPU_OPTIONS)
  cfg = tiny.get_config()
  cfg.train.steps = 1000
  mc = ModelConfig.from_dict(cfg.model.to_dict()).replace(num_nextn_predict_layers=0)
  n_layers, n_moe = mc.num_hidden_layers, mc.num_hidden_layers - mc.first_k_dense_replace
  t_tok, d, h = BATCH * SEQ, mc.hidden_size, mc.num_attention_heads
  k, e, f = mc.num_experts_per_tok, mc.n_routed_experts, mc.moe_intermediate_size
  key = jax.random.PRNGKey(0)
  ks = jax.random.split(key, 8)
  x = jax.random.normal(ks[0], (BATCH, SEQ, d), jnp.float32)
  it, rp = args.iters, args.repeats
  rows = []

  def add(name, count, fwd_fn, fwd_args, loss_fn, grad_args, argnums):
    fwd = jit(fwd_fn)
    g = jit(jax.grad(loss_fn, argnums=argnums))
    (w_f, t_f), (w_fb, t_fb) = _time(fwd, fwd_args, it, rp), _time(g, grad_args, it, rp)
    rows.append(dict(component=name, calls_per_step=count, fwd_ms=t_f * 1e3,
                     fwd_bwd_ms=t_fb * 1e3, per_step_ms=t_fb * count * 1e3,
                     wall_per_step_ms=w_fb * count * 1e3))
    print(f"{name}: CPU fwd {t_f * 1e3:.1f} ms, fwd+bwd {t_fb * 1e3:.1f} ms x {count} "
          f"(wall fwd+bwd {w_fb * 1e3:.1f} ms)", flush=True)

  # Attention core: q, k [B*H, S, 64], v [B*H, S, 32].
  dqk = mc.qk_nope_head_dim + mc.qk_rope_head_dim
  q = jax.random.normal(ks[1], (BATCH * h, SEQ, dqk)) * 0.3
  kk = jax.random.normal(ks[2], (BATCH * h, SEQ, dqk)) * 0.3
  v = jax.random.normal(ks[3], (BATCH * h, SEQ, mc.v_head_dim))
  core = lambda q, k, v: attention.dot_product_attention(q, k, v, scale=dqk ** -0.5)
  add("attention core softmax(qk^T)v", n_layers, core, (q, kk, v),
      lambda q, k, v: jnp.sum(core(q, k, v) * v), (q, kk, v), (0, 1, 2))

  # MLA projections (whole module minus the core).
  mla = MultiHeadLatentAttention(mc, rngs=nnx.Rngs(0))
  gd, mp = nnx.split(mla)
  cos, sin = rope_cos_sin(jnp.arange(SEQ), jnp.ones((mc.qk_rope_head_dim // 2,)) * 0.01)
  mla_f = lambda p, x: nnx.merge(gd, p)(x, cos, sin)
  add("MLA projections, norms, RoPE (module minus the core row)", n_layers, mla_f, (mp, x),
      lambda p, x: jnp.sum(mla_f(p, x) * x), (mp, x), (0, 1))
  for kk_ in ("fwd_ms", "fwd_bwd_ms", "per_step_ms", "wall_per_step_ms"):
    rows[-1][kk_] -= rows[-2][kk_]  # the module's time includes the core's

  # Routed experts: the grouped SwiGLU on T*k rows with a skewed load.
  n_rows = t_tok * k
  ids = skewed_experts(ks[4], n_rows, e, args.load_skew)
  counts = np.bincount(np.asarray(ids), minlength=e)
  rx = jax.random.normal(ks[5], (n_rows, d))
  wg = jax.random.normal(ks[6], (e, d, f)) * 0.02
  wu = jax.random.normal(ks[7], (e, d, f)) * 0.02
  wd = jax.random.normal(ks[0], (e, f, d)) * 0.02
  ex = lambda r, wg, wu, wd: experts_lib.expert_compute(r, ids, wg, wu, wd)
  add(f"routed experts grouped SwiGLU (load max/mean {counts.max() / counts.mean():.1f})",
      n_moe, ex, (rx, wg, wu, wd), lambda r, wg, wu, wd: jnp.sum(ex(r, wg, wu, wd) * r),
      (rx, wg, wu, wd), (0, 1, 2, 3))
  flops = 3 * (2 * 3 * n_rows * d * f)
  rows[-1]["gflops_fwd_bwd"] = flops / (rows[-1]["fwd_bwd_ms"] * 1e-3) / 1e9

  # Dispatch / combine on one device (repeat, sort, gather, scatter back, weighted sum),
  # with an expert that costs nothing.
  tokens = x.reshape(t_tok, d)
  tk_idx = ids.reshape(t_tok, k)
  tk_w = jax.random.uniform(ks[1], (t_tok, k))
  free = lambda rows, eid: rows * 1.5
  topo = dispatch.EPTopology()

  def disp(tokens, w):
    return dispatch._local_moe(tokens, tk_idx, w, free, e, 1, topo)[0]
  add("dispatch / combine (local: repeat, weighted sum)", n_moe, disp, (tokens, tk_w),
      lambda t, w: jnp.sum(disp(t, w) * t), (tokens, tk_w), (0, 1))

  # Router (logits, sigmoid, group-limited top-k, gates).
  router = Router(mc, rngs=nnx.Rngs(0))
  rgd, rpm = nnx.split(router)
  r_f = lambda p, t: nnx.merge(rgd, p)(t).topk_weight
  add("router + group-limited top-k", n_moe, r_f, (rpm, tokens),
      lambda p, t: jnp.sum(r_f(p, t)), (rpm, tokens), (0, 1))

  # Shared expert (width 128) and the dense MLP (width 512).
  for name, width, count in (("shared expert SwiGLU", f * mc.n_shared_experts, n_moe),
                             ("dense MLP SwiGLU (layer 0)", mc.intermediate_size,
                              mc.first_k_dense_replace)):
    mlp = MLP(d, width, rngs=nnx.Rngs(0))
    mgd, mpm = nnx.split(mlp)
    m_f = lambda p, x, mgd=mgd: nnx.merge(mgd, p)(x)
    add(name, count, m_f, (mpm, x), lambda p, x, m_f=m_f: jnp.sum(m_f(p, x) * x), (mpm, x),
        (0, 1))

  # Optimizer (AdamW + clipping) on the whole model's parameters, and the full step.
  model = Transformer(mc, rngs=nnx.Rngs(0))
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  opt = trainer.make_optimizer(cfg.train)
  opt_state = opt.init(params)
  import optax
  upd = jit(lambda g, s, p: optax.apply_updates(p, opt.update(g, s, p)[0]))
  w_opt, t_opt = _time(upd, (params, opt_state, params), it, rp)
  rows.append(dict(component="optimizer (AdamW, clipping, apply)", calls_per_step=1,
                   fwd_ms=float("nan"), fwd_bwd_ms=t_opt * 1e3, per_step_ms=t_opt * 1e3,
                   wall_per_step_ms=w_opt * 1e3))
  print(f"optimizer: {t_opt * 1e3:.1f} ms", flush=True)

  corpus = data.load_corpus(None, cfg.data.heldout_fraction)
  ds = data.train_dataset(corpus.train, seq_len=SEQ, extra=0, batch_size=BATCH, seed=0)
  fns = trainer.make_step_fns(graphdef, opt, mc, cfg.train, SEQ)
  w0 = jnp.asarray(ds[0])
  step = fns.train_step.lower(params, other, opt_state, w0, (1,)).compile()
  state = [params, other, opt_state]

  def full(w):
    out = step(state[0], state[1], state[2], w)
    return out
  w_step, t_step = _time(full, (w0,), it, rp)
  listed = sum(r["per_step_ms"] for r in rows)
  listed_w = sum(r["wall_per_step_ms"] for r in rows)
  rows.append(dict(component="rest (embedding, norms, head + loss, glue, host)",
                   calls_per_step=1, fwd_ms=float("nan"), fwd_bwd_ms=float("nan"),
                   per_step_ms=t_step * 1e3 - listed,
                   wall_per_step_ms=w_step * 1e3 - listed_w))
  rows.append(dict(component="full training step", calls_per_step=1, fwd_ms=float("nan"),
                   fwd_bwd_ms=t_step * 1e3, per_step_ms=t_step * 1e3,
                   wall_per_step_ms=w_step * 1e3))
  print(f"full step {t_step * 1e3:.1f} ms", flush=True)

  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, "profile_step")
  keys = ["component", "calls_per_step", "fwd_ms", "fwd_bwd_ms", "per_step_ms",
          "wall_per_step_ms", "gflops_fwd_bwd"]
  with open(base + ".csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=keys)
    w.writeheader()
    for r in rows:
      w.writerow({kk: r.get(kk, "") for kk in keys})
  fmt = lambda v: "" if v != v else f"{v:.1f}"
  machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}"
  lines = [
      "# Training-step profile, tiny config, one device", "",
      f"Generated by `experiments/profile_step.py --iters {it} --repeats {rp}` on {machine}. "
      f"{BATCH} x {SEQ} tokens, float32, no MTP. Each component jitted alone at its step "
      "shapes, with the training step's XLA:CPU options (`train.step.TRAIN_CPU_OPTIONS`: "
      f"{step_lib.TRAIN_CPU_OPTIONS or 'XLA defaults'}). Times are process CPU time (both "
      "cores' threads summed), the best of the repeats: the machine is shared by many jobs, so wall-clock time mostly measures the "
      "others' load; the last column is the best wall-clock time for comparison. Per step = "
      "fwd + bwd x calls per step; 'rest' is the full step minus the listed rows.", "",
      "| component | calls / step | CPU fwd (ms) | CPU fwd + bwd (ms) | CPU per step (ms) | "
      "share | wall per step (ms) |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    share = "" if r["component"] == "full training step" else \
        f"{100 * r['per_step_ms'] / (t_step * 1e3):.0f} %"
    lines.append(f"| {r['component']} | {r['calls_per_step']} | {fmt(r['fwd_ms'])} | "
                 f"{fmt(r['fwd_bwd_ms'])} | {fmt(r['per_step_ms'])} | {share} | "
                 f"{fmt(r['wall_per_step_ms'])} |")
  ge = [r for r in rows if "gflops_fwd_bwd" in r][0]
  lines += ["", f"Routed experts: {ge['gflops_fwd_bwd']:.0f} GFLOP per CPU-second over fwd + "
            f"bwd ({flops / 1e9:.2f} GFLOP of useful work per layer; a plain float32 matmul "
            "reaches ~135 per CPU-second, ~270 GFLOP/s on the 2 cores)."]
  with open(base + ".md", "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print(f"wrote {base}.md, .csv")


if __name__ == "__main__":
  main()
