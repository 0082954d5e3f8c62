"""`dsv3-generate`: sample text from a trained run or a Hugging Face checkpoint.

    dsv3-generate --workdir runs/orion_4x8 --prompt "def main(" --max-new-tokens 200
    dsv3-generate --hf path/to/checkpoint --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.9
    dsv3-generate --workdir runs/orion_4x8 --prompt "import " --nodes 4 --gpus-per-node 8

Tokens are printed as they are generated (bytes decoded as UTF-8 for byte-level models, ids
otherwise); a summary (tokens, tokens/s, compilations) goes to stderr. The emulated device
count (nodes x gpus-per-node) is set before jax is imported, so this module imports jax only
inside `main`. Bad settings stop before any work with a message naming the setting.
(`python -m dsv3_jax.infer.cli ...` is the same command.)
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="dsv3-generate", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training run directory (config.json + checkpoints/)")
  src.add_argument("--hf", help="Hugging Face DeepSeek-V3 checkpoint directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  prm = p.add_mutually_exclusive_group(required=True)
  prm.add_argument("--prompt", help="prompt text (byte-level models)")
  prm.add_argument("--prompt-ids", help="prompt token ids, comma separated")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
  p.add_argument("--stop-ids", default="", help="token ids that end generation, comma separated")
  p.add_argument("--nodes", type=int, default=1, help="mesh nodes (expert parallelism)")
  p.add_argument("--gpus-per-node", type=int, default=1, help="mesh devices per node")
  p.add_argument("--page-size", type=int, default=16, help="cache tokens per page")
  p.add_argument("--num-pages", type=int, default=None, help="cache pages per device")
  p.add_argument("--speculative-depth", type=int, default=0,
                 help="MTP speculative decoding with this many MTP modules (greedy only; "
                      "0 = off; at most the checkpoint's MTP depth)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="compute dtype (--hf only, default float32; a run keeps its trained "
                      "dtype)")
  return p


def _ids(text: str, name: str) -> list[int]:
  try:
    return [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None


def check_args(args) -> None:
  """Checks the settings that need no model (before anything is loaded).

  Raises:
    ValueError / FileNotFoundError: naming the option and the allowed values.
  """
  if args.max_new_tokens <= 0:
    raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
  if not 0 <= args.temperature < float("inf"):  # NaN fails too
    raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got "
                     f"{args.temperature}")
  if args.top_k < 0:
    raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
  if args.dtype is not None and args.workdir is not None:
    raise ValueError(f"--dtype {args.dtype} applies to --hf checkpoints only; a --workdir run "
                     "computes in the dtype it was trained with (model.dtype in its "
                     "config.json): drop --dtype")
  if not 0 < args.top_p <= 1:
    raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
  for name, v in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node),
                  ("--page-size", args.page_size)):
    if v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v}")
  if args.speculative_depth < 0:
    raise ValueError(f"--speculative-depth must be >= 0 (0 = off), got {args.speculative_depth}")
  if args.speculative_depth and args.temperature > 0:
    raise ValueError(f"--speculative-depth {args.speculative_depth} is greedy only; allowed: "
                     f"--temperature 0 (got {args.temperature}) or --speculative-depth 0")
  if args.num_pages is not None and args.num_pages < 1:
    raise ValueError(f"--num-pages must be a positive integer, got {args.num_pages}")
  if args.prompt is not None and not args.prompt:
    raise ValueError("--prompt is empty; give at least one character")
  if args.prompt is not None:
    try:
      args.prompt.encode("utf-8")
    except UnicodeEncodeError:
      raise ValueError("--prompt is not valid UTF-8 text (the shell passed undecodable bytes); "
                       "give the bytes as --prompt-ids instead") from None
  if args.step is not None and args.hf is not None:
    raise ValueError(f"--step {args.step} applies to --workdir runs only; a --hf checkpoint has "
                     "one set of weights: drop --step")
  if args.prompt_ids is not None and not _ids(args.prompt_ids, "--prompt-ids"):
    raise ValueError("--prompt-ids is empty; give at least one token id")
  _ids(args.stop_ids, "--stop-ids")
  if args.workdir is not None:
    if not os.path.isfile(os.path.join(args.workdir, "config.json")):
      raise FileNotFoundError(f"--workdir {args.workdir}: no config.json (not a training run "
                              "directory; train one with dsv3-train)")
    ckpt = os.path.join(args.workdir, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if os.path.isdir(ckpt) \
        else []
    if not steps:
      raise FileNotFoundError(f"--workdir {args.workdir}: no checkpoint under {ckpt}")
    if args.step is not None and args.step not in steps:
      raise FileNotFoundError(f"--step {args.step}: no checkpoint at that step under {ckpt}; "
                              f"allowed: {', '.join(map(str, steps))}")
  if args.hf is not None:
    for f in ("config.json", "model.safetensors"):
      if not os.path.isfile(os.path.join(args.hf, f)):
        raise FileNotFoundError(f"--hf {args.hf}: {f} not found")


def model_settings(args) -> dict:
  """The checkpoint's model settings (vocab_size, max_position_embeddings, n_routed_experts,
  n_group, ...) from its config.json, without reading any weights."""
  with open(os.path.join(args.workdir or args.hf, "config.json")) as f:
    cfg = json.load(f)
  return cfg.get("model", {}) if args.workdir is not None else cfg


def check_model_fit(args, m: dict) -> None:
  """Checks the request and the mesh against the checkpoint's settings `m` (before any weight
  is loaded), naming the command's options.

  Raises:
    ValueError: the devices do not divide the routed experts, more than one node for a model
      whose expert groups are not one per node, a prompt / stop id / length the model does
      not accept (`requests.check_request`), --top-k above the vocabulary, more speculative
      drafts than MTP modules, or --num-pages too small for the request.
  """
  from dsv3_jax.infer.requests import check_request

  n_dev = args.nodes * args.gpus_per_node
  experts, groups = m.get("n_routed_experts"), m.get("n_group")
  if experts and n_dev > 1 and experts % n_dev:
    allowed = [d for d in range(1, experts + 1) if experts % d == 0]
    raise ValueError(f"--nodes {args.nodes} x --gpus-per-node {args.gpus_per_node} = {n_dev} "
                     f"devices do not divide the model's {experts} routed experts "
                     f"(n_routed_experts); allowed device counts: {allowed}, with --nodes 1"
                     + (f" or --nodes {groups}" if groups and groups > 1 else ""))
  if experts and args.nodes > 1 and groups != args.nodes:
    raise ValueError(f"--nodes {args.nodes}: the model routes over n_group={groups} expert "
                     "groups, one per node (node-limited routing, report §2.1.2); allowed: "
                     f"--nodes 1 or --nodes {groups}")
  if args.prompt is not None:
    ids = list(args.prompt.encode("utf-8")) if m.get("vocab_size") == 256 else None
    name = "--prompt"
  else:
    ids, name = _ids(args.prompt_ids, "--prompt-ids"), "--prompt-ids"
  vocab, longest = m["vocab_size"], m["max_position_embeddings"]
  stops = _ids(args.stop_ids, "--stop-ids")
  for flag, prompt, stop in ((name, ids, ()), ("--stop-ids", None, stops)):
    if prompt is None and not stop:
      continue
    try:
      check_request(prompt or [0], args.max_new_tokens, stop, vocab, longest)
    except ValueError as e:
      raise ValueError(f"{flag}: {e}") from None
  if args.top_k > vocab:
    raise ValueError(f"--top-k {args.top_k} exceeds the model's vocabulary; allowed: 0..{vocab} "
                     "(0 = off)")
  mtp = m.get("num_nextn_predict_layers") or 0
  if args.speculative_depth > mtp:
    raise ValueError(f"--speculative-depth {args.speculative_depth}: the checkpoint has {mtp} MTP "
                     f"module(s) (num_nextn_predict_layers); allowed: "
                     + (f"0..{mtp}" if mtp else "0"))
  if args.num_pages is not None:
    n = len(ids) if ids is not None else 1
    need = -(-min(n + args.max_new_tokens - 1, longest) // args.page_size)
    if args.num_pages < need:
      raise ValueError(f"--num-pages {args.num_pages} holds {args.num_pages * args.page_size} "
                       f"tokens, too few for this request ({n} prompt + {args.max_new_tokens} new"
                       f" tokens in pages of {args.page_size}); allowed: --num-pages >= {need}")


def main(argv=None, out=None) -> int:
  """Runs the command; returns the exit status (2 on a bad setting)."""
  args = _parser().parse_args(argv)
  out = sys.stdout if out is None else out
  err = sys.stderr
  try:
    check_args(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"dsv3-generate: error: {e}", file=err)
    return 2
  from dsv3_jax.parallel.mesh import set_host_device_count

  n_dev = args.nodes * args.gpus_per_node
  if "jax" not in sys.modules:
    set_host_device_count(n_dev)
  import jax

  from dsv3_jax.infer.engine import Engine
  from dsv3_jax.parallel.mesh import make_mesh

  try:
    check_model_fit(args, model_settings(args))
    mesh = make_mesh(args.nodes, args.gpus_per_node) if n_dev > 1 else None
    prompt = args.prompt if args.prompt is not None else _ids(args.prompt_ids, "--prompt-ids")
    # One request of known size: one shape bucket each, so one prefill and one decode compile.
    n = len(prompt.encode("utf-8")) if isinstance(prompt, str) else len(prompt)
    pages = -(-(n + args.max_new_tokens - 1) // args.page_size)
    kw = dict(mesh=mesh, max_batch=n_dev, page_size=args.page_size, num_pages=args.num_pages,
              prompt_buckets=(n,), page_buckets=(pages,),
              speculative_depth=args.speculative_depth)
    if args.workdir is not None:
      engine = Engine.from_workdir(args.workdir, step=args.step, **kw)
    else:
      engine = Engine.from_hf(args.hf, dtype=args.dtype or "float32", **kw)
    rid = engine.submit(prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        stop_tokens=_ids(args.stop_ids, "--stop-ids"),
                        key=jax.random.key(args.seed))
  except (ValueError, FileNotFoundError) as e:
    print(f"dsv3-generate: error: {e}", file=err)
    return 2
  text = codecs.getincrementaldecoder("utf-8")(errors="replace") if engine.byte_level else None
  if args.prompt is not None:
    out.write(args.prompt)
  t0 = time.perf_counter()
  n = 0
  try:
    while engine.has_work():
      for ev in engine.step():
        n += 1
        out.write(text.decode(bytes([ev.token])) if text else f"{ev.token} ")
        out.flush()
    if text:
      out.write(text.decode(b"", final=True))
    out.write("\n")
    out.flush()
  except KeyboardInterrupt:
    print(f"\ndsv3-generate: interrupted after {n} tokens", file=err)
    return 130
  except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
    if out is sys.stdout:
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
  dt = time.perf_counter() - t0
  done = engine.completion(rid)
  spec = ""
  if args.speculative_depth:
    c = engine.counts
    spec = (f", MTP drafts accepted {c['spec_accepted']} of {c['spec_drafted']}, "
            f"{n / max(1, c['spec_forwards'] + c['prefill_calls']):.2f} tokens per forward")
  print(f"[{n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s incl. compilation), finish: "
        f"{done.finish_reason}, compilations: {engine.compiles}, cache "
        f"{engine.cache_bytes_per_token():.0f} B/token{spec}]", file=err)
  return 0


def run() -> None:
  try:
    sys.exit(main())
  except KeyboardInterrupt:  # while loading or compiling (generation handles its own)
    print("\ndsv3-generate: interrupted", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  run()
