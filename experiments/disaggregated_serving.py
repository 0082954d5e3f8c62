"""Prefill/decode disaggregation on the emulated cluster: bytes moved and time per call.

DeepSeek-V3 serves prefill and decode on separate GPU groups with different expert-parallel
sizes (V3 report §3.4: prefill EP32, decode EP320 with redundant experts; Insights §2.3); what
moves between them is the KV cache, for MLA the latent c_KV | k_rope of every prompt token.
Here, in one process on 48 emulated CPU devices:

  prefill mesh 4 x 4 = devices 0..15  (EP16: 2 routed experts per device)
  decode  mesh 4 x 8 = devices 16..47 (EP32: 1 routed expert per device)

(`infer.disaggregated.DisaggregatedEngine`; node counts are 4 on both because the tiny model's
router groups are nodes, n_group = 4, so the issue's 2 x 8 prefill mesh is refused). The model
is the main job's checkpoint (runs/orion_4x8) when that run has finished, else configs/tiny.py
at random initialisation; float32; a mixed set of prompts (byte windows of this Python's
standard library) generates greedily, once disaggregated and once colocated on the decode mesh
(`Engine(model, mesh=decode_mesh)`): the tokens must be equal.

Bytes: the engine's transfer counters (bytes of the page arrays actually `device_put` from
prefill to decode devices) per prompt token, next to `analysis.memory.kv_cache_bytes_per_token`
(the exact latent cache of the prompt tokens; the moved bytes are whole pages, so slightly more)
and what a materialised per-head K/V cache would move. For DeepSeek-V3 671B the pools are built
abstractly (`jax.eval_shape`, never allocated) and the page gather the engine runs is evaluated
abstractly on them for the same prompt lengths (page size 64, BF16).

Time: prefill and decode seconds per call on each mesh, after a warm-up generation (which
compiles every shape), the minimum over `--repeats` timed generations; measured on a shared
2-core machine that emulates 48 devices, under load (the 1-minute load average is printed):
only the relative figures mean anything, and no figure is an H800 time.

    python experiments/disaggregated_serving.py [--repeats 2] [--prompts 32] [--new-tokens 32]

Writes results/disaggregated_serving.{md,csv,png}.
"""

from __future__ import annotations

import argparse
import os
import time

N_DEVICES = 48
PREFILL, DECODE = (4, 4), (4, 8)

from dsv3_jax.parallel.mesh import set_host_device_count  # noqa: E402  (no jax import)

set_host_device_count(N_DEVICES)

import _report as R  # noqa: E402

PAGE = 16
LENGTHS = (7, 16, 33, 64, 100, 128, 50, 90)  # cycled; 16, 64, 128 end on a page boundary


def _model(workdir):
  from flax import nnx

  from configs import tiny
  from dsv3_jax.model.config import ModelConfig
  from dsv3_jax.model.transformer import Transformer

  if workdir and os.path.isfile(os.path.join(workdir, "summary.json")):  # a finished run
    from dsv3_jax.train.trainer import load_trained
    _, model, step = load_trained(workdir)
    return model, f"{os.path.relpath(workdir, R.REPO_ROOT)} (step {step})"
  cfg = ModelConfig.from_dict(tiny.get_config().model.to_dict())
  return Transformer(cfg, rngs=nnx.Rngs(0)), "tiny dims, random initialisation"


def _prompts(n, seed=0):
  import argparse as src_a
  import collections as src_c
  import inspect as src_i

  import numpy as np

  rng = np.random.default_rng(seed)
  text = b"".join(open(m.__file__, "rb").read() for m in (src_a, src_c, src_i))
  lens = [LENGTHS[i % len(LENGTHS)] for i in range(n)]
  return [list(text[s:s + k]) for s, k in zip(rng.integers(0, len(text) - 200, n), lens)]


def _timed(engine, prompts, new_tokens, repeats):
  """Warm-up, then `repeats` timed generations: (tokens, per-call seconds, counts deltas)."""
  t0 = time.perf_counter()
  engine.generate(prompts, max_new_tokens=new_tokens)
  warmup_s = time.perf_counter() - t0
  warm = sum(engine.compiles.values())
  best = None
  for _ in range(repeats):
    t_before, c_before = dict(engine.timings), dict(engine.counts)
    outs = engine.generate(prompts, max_new_tokens=new_tokens)
    dt = {k: v - t_before.get(k, 0.0) for k, v in engine.timings.items()}
    dc = {k: v - c_before.get(k, 0) for k, v in engine.counts.items()}
    run = dict(
        prefill_s_per_call=dt["prefill_s"] / dc["prefill_calls"],
        decode_s_per_call=dt["decode_s"] / dc["decode_calls"],
        transfer_s_per_prefill_call=dt.get("transfer_s", 0.0) / dc["prefill_calls"],
        prefill_calls=dc["prefill_calls"], decode_calls=dc["decode_calls"],
        transfer_bytes=dc.get("transfer_bytes", 0), transfer_tokens=dc.get("transfer_tokens", 0),
        transfer_pages=dc.get("transfer_pages", 0), transfer_copies=dc.get("transfer_copies", 0),
        total_s=sum(dt.values()))
    if best is None or run["total_s"] < best["total_s"]:
      best = run
  best.update(warmup_s=warmup_s, recompiles_after_warmup=sum(engine.compiles.values()) - warm)
  return [o.tokens for o in outs], best


def bytes_671b(lengths, page_size):
  """DeepSeek-V3 671B: bytes/token from abstract pools and the abstract page gather."""
  import jax

  from configs import deepseek_v3_671b
  from dsv3_jax.analysis.memory import kv_cache_bytes_per_token
  from dsv3_jax.infer import cache as cache_lib
  from dsv3_jax.infer.disaggregated import materialised_kv_bytes_per_token
  from dsv3_jax.model.config import ModelConfig

  cfg = ModelConfig.from_dict(deepseek_v3_671b.get_config().model.to_dict())
  spec = cache_lib.CacheSpec.for_model(cfg, pages_per_shard=4096, page_size=page_size)
  pools = jax.eval_shape(lambda: cache_lib.init_pools(spec))
  moved = 0
  for n in lengths:
    ids = jax.ShapeDtypeStruct((spec.pages_for(n),), jax.numpy.int32)
    out = jax.eval_shape(cache_lib.gather_pages, pools, ids)
    moved += sum(x.size * x.dtype.itemsize for x in out)
  return dict(model="DeepSeek-V3 671B (bfloat16, abstract)", page_size=page_size,
              pool_bytes_per_token=cache_lib.bytes_per_token(pools),
              formula_bytes_per_token=kv_cache_bytes_per_token(cfg.to_dict(), cache_bits=16),
              moved_bytes_per_prompt_token=moved / sum(lengths),
              materialised_bytes_per_token=materialised_kv_bytes_per_token(cfg, 2),
              prompt_tokens=sum(lengths), moved_bytes=moved)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--prompts", type=int, default=32)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--workdir", default=os.path.join(R.REPO_ROOT, "runs", "orion_4x8"))
  args = ap.parse_args()

  import numpy as np

  from dsv3_jax.analysis.memory import kv_cache_bytes_per_token
  from dsv3_jax.infer import Engine
  from dsv3_jax.infer.disaggregated import (DisaggregatedEngine, disaggregated_meshes,
                                            materialised_kv_bytes_per_token)

  model, source = _model(args.workdir)
  cfg = model.config
  prefill_mesh, decode_mesh = disaggregated_meshes(PREFILL, DECODE)
  prompts = _prompts(args.prompts)
  lengths = [len(p) for p in prompts]
  max_cached = max(lengths) + args.new_tokens
  kw = dict(max_batch=decode_mesh.size, page_size=PAGE, decode_steps=8, batch_buckets=(1,),
            page_buckets=(-(-max_cached // PAGE),), prompt_buckets=(max(lengths),))
  dis = DisaggregatedEngine(model, prefill_mesh=prefill_mesh, mesh=decode_mesh,
                            prefill_max_batch=2 * prefill_mesh.size, prefill_batch_buckets=(2,),
                            **kw)
  col = Engine(model, mesh=decode_mesh, **kw)
  dis_tokens, dis_t = _timed(dis, prompts, args.new_tokens, args.repeats)
  col_tokens, col_t = _timed(col, prompts, args.new_tokens, args.repeats)
  same = sum(a == b for a, b in zip(dis_tokens, col_tokens))
  load = os.getloadavg()[0]

  # bytes per prompt token, tiny (measured) and 671B (abstract)
  itemsize = np.dtype(dis.pools[0].dtype).itemsize
  tiny = dict(model=f"tiny (float32, {source})", page_size=PAGE,
              pool_bytes_per_token=dis.cache_bytes_per_token(),
              formula_bytes_per_token=kv_cache_bytes_per_token(cfg.to_dict(),
                                                               cache_bits=8 * itemsize),
              moved_bytes_per_prompt_token=dis_t["transfer_bytes"] / dis_t["transfer_tokens"],
              materialised_bytes_per_token=materialised_kv_bytes_per_token(cfg, itemsize),
              prompt_tokens=dis_t["transfer_tokens"], moved_bytes=dis_t["transfer_bytes"])
  assert dis_t["transfer_tokens"] == sum(lengths)
  assert dis_t["transfer_bytes"] == dis_t["transfer_pages"] * PAGE * tiny["formula_bytes_per_token"]
  byte_rows = [tiny] + [bytes_671b(lengths, ps) for ps in (PAGE, 64)]
  for r in byte_rows:
    r["materialised_over_latent"] = r["materialised_bytes_per_token"] / r["formula_bytes_per_token"]
    r["page_padding"] = r["moved_bytes_per_prompt_token"] / r["formula_bytes_per_token"] - 1

  ep = lambda m: dict(m.shape)["node"] * dict(m.shape)["gpu"]
  time_rows = [
      dict(engine="disaggregated", phase="prefill", mesh=f"{PREFILL[0]} x {PREFILL[1]}",
           devices="0-15", ep=ep(prefill_mesh), s_per_call=dis_t["prefill_s_per_call"],
           calls=dis_t["prefill_calls"]),
      dict(engine="disaggregated", phase="cache transfer (per prefill call)",
           mesh="prefill -> decode", devices="0-15 -> 16-47", ep="",
           s_per_call=dis_t["transfer_s_per_prefill_call"], calls=dis_t["prefill_calls"]),
      dict(engine="disaggregated", phase="decode (8 steps)", mesh=f"{DECODE[0]} x {DECODE[1]}",
           devices="16-47", ep=ep(decode_mesh), s_per_call=dis_t["decode_s_per_call"],
           calls=dis_t["decode_calls"]),
      dict(engine="colocated", phase="prefill", mesh=f"{DECODE[0]} x {DECODE[1]}",
           devices="16-47", ep=ep(decode_mesh), s_per_call=col_t["prefill_s_per_call"],
           calls=col_t["prefill_calls"]),
      dict(engine="colocated", phase="decode (8 steps)", mesh=f"{DECODE[0]} x {DECODE[1]}",
           devices="16-47", ep=ep(decode_mesh), s_per_call=col_t["decode_s_per_call"],
           calls=col_t["decode_calls"]),
  ]
  R.write_csv("disaggregated_serving",
              [dict(table="bytes", **r) for r in byte_rows]
              + [dict(table="time", load_average_1min=load, **r) for r in time_rows]
              + [dict(table="tokens", prompts=len(prompts), same_tokens_as_colocated=same,
                      new_tokens=args.new_tokens,
                      recompiles_after_warmup=dis_t["recompiles_after_warmup"]
                      + col_t["recompiles_after_warmup"])])

  bytes_md = R.md_table(
      ["model", "page size", "cache B/token (pools)", "formula B/token",
       "moved B / prompt token (whole pages)", "page padding", "materialised K/V B/token",
       "materialised / latent"],
      [[r["model"], r["page_size"], f"{r['pool_bytes_per_token']:,.0f}",
        f"{r['formula_bytes_per_token']:,.0f}", f"{r['moved_bytes_per_prompt_token']:,.1f}",
        f"{100 * r['page_padding']:.1f} %", f"{r['materialised_bytes_per_token']:,.0f}",
        f"{r['materialised_over_latent']:.1f}x"] for r in byte_rows])
  time_md = R.md_table(
      ["engine", "phase", "mesh", "devices", "EP", "s per call", "calls"],
      [[r["engine"], r["phase"], r["mesh"], r["devices"], str(r["ep"]),
        f"{r['s_per_call']:.3f}", str(r["calls"])] for r in time_rows])
  sections = [
      f"Prefill on a {PREFILL[0]} x {PREFILL[1]} mesh (devices 0-15, EP{ep(prefill_mesh)}), "
      f"decode on a {DECODE[0]} x {DECODE[1]} mesh (devices 16-47, EP{ep(decode_mesh)}), one "
      f"process, {N_DEVICES} emulated CPU devices (`infer.disaggregated.DisaggregatedEngine`). "
      f"Model: {source}. {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens "
      f"({sum(lengths):,} in all), {args.new_tokens} new tokens each, greedy.",
      f"Tokens equal to the colocated engine (`Engine(model, mesh=decode_mesh)`): {same} of "
      f"{len(prompts)} prompts. Recompiles after warm-up: "
      f"{dis_t['recompiles_after_warmup'] + col_t['recompiles_after_warmup']}.",
      "## Bytes moved prefill -> decode per prompt token\n\n"
      "The latent cache moves in whole pages (pages x page_size x bytes/token); the formula "
      "column is `analysis.memory.kv_cache_bytes_per_token` = the exact bytes of the prompt "
      "tokens, the padding column the share the last, partly filled page of each prompt adds. "
      "Tiny: the engine's counters over one generation "
      f"({tiny['moved_bytes']:,} B moved for {tiny['prompt_tokens']:,} prompt tokens in "
      f"{dis_t['transfer_pages']} pages, {dis_t['transfer_copies']} device-to-device copies). "
      "671B: the same prompt lengths, the page gather evaluated on pools built with "
      "jax.eval_shape (never allocated), at page sizes 16 and 64; the padding is at most "
      "(page_size - 1) / prompt tokens per prompt, large for these short prompts and small for "
      "prompts of thousands of tokens. A materialised cache would move per-head keys and "
      "values: layers x heads x (qk_nope + qk_rope + v) x bytes.\n\n" + bytes_md,
      "## Time per call on each mesh (measured under load)\n\n"
      f"Seconds per jitted call, the fastest of {args.repeats} timed generations after a "
      f"warm-up, on a shared 2-core machine emulating {N_DEVICES} devices (1-minute load "
      f"average {load:.1f}): the emulated devices share the cores, so a mesh's time grows with "
      "its device count and the load, and none of this is an H800 time. The transfer row is "
      "the host-driven gather / device_put / scatter of one prefill call's pages. The two decode "
      "rows run the same program on the same mesh and shapes (the disaggregated engine's "
      "decode is the colocated one's), so their gap is the load's noise.\n\n" + time_md,
  ]
  R.write_markdown("disaggregated_serving", "Prefill/decode disaggregation", sections,
                   "disaggregated_serving.py")

  import matplotlib.pyplot as plt
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
  x = np.arange(len(byte_rows))
  ax0.bar(x - 0.2, [r["moved_bytes_per_prompt_token"] for r in byte_rows], 0.4,
          label="MLA latent (moved, whole pages)", color="#3571b8")
  ax0.bar(x + 0.2, [r["materialised_bytes_per_token"] for r in byte_rows], 0.4,
          label="materialised per-head K/V", color="#999")
  ax0.set_yscale("log")
  ax0.set_xticks(x, [("tiny (fp32)" if r["model"].startswith("tiny") else "V3 671B (bf16)")
                     + f"\npage {r['page_size']}" for r in byte_rows])
  ax0.set_ylabel("bytes moved per prompt token")
  ax0.legend(fontsize=8)
  ax0.set_title("prefill -> decode cache transfer")
  names = [f"{r['engine'][:6]}.\n{r['phase'].split(' (')[0]}" for r in time_rows]
  ax1.bar(names, [r["s_per_call"] for r in time_rows],
          color=["#3571b8", "#8fb3e0", "#3571b8", "#999", "#999"])
  ax1.set_ylabel("seconds per call")
  ax1.set_title(f"per call, {N_DEVICES} emulated devices, under load ({load:.1f})")
  ax1.tick_params(axis="x", labelsize=7)
  fig.tight_layout()
  fig.savefig(R.path("disaggregated_serving", "png"), dpi=120)
  print(open(R.path("disaggregated_serving", "md")).read())


if __name__ == "__main__":
  main()
