"""Two micro-batch overlap of serving's prefill and decode (Insights §2.3.1, V3 report §3.4).

Each device's rows split into two micro-batches A (the first half) and B (the second half), and
every layer is written in the overlapped order: one micro-batch's dispatch / combine all-to-alls
sit between the other's attention and expert compute,

    A.attention | A.dispatch, B.attention | B.dispatch, A.experts | A.combine, B.experts |
    B.combine, (next layer) A.attention ...

i.e. every collective is issued right before the other micro-batch's compute that would hide it
on hardware with asynchronous collectives (the DualPipe-free "two micro-batch" pattern; compare
`analysis.timeline.layer_tasks(overlap=True)`: compute runs attention(A), attention(B), moe(A),
moe(B), the network dispatch(A), dispatch(B), combine(A), combine(B)).

"attention" is MLA with its cache write and the post-attention norm; "dispatch" the router,
the schedule's packing and its all-to-all(s) (both hops for `two_hop`); "experts" the routed
experts on the received rows plus the shared experts; "combine" the all-to-all(s) back and the
weighted sum.

The order is pinned in the compiled program by data dependencies: each stage's first input
reads one element of the previous stage's output (`_after`, an exact identity), so XLA cannot
move one micro-batch's compute out from between the other's dispatch and combine (XLA:CPU
drops `optimization_barrier`s before scheduling, and its memory-minimising scheduler otherwise
groups the two micro-batches' all-to-alls together). On the CPU emulation collectives are
synchronous, so this only fixes the order; no time is hidden here
(`experiments/two_batch_overlap.py` models what the order buys with `analysis.timeline`).
`stage_order` reads the order back from the compiled HLO. On hardware with asynchronous
collectives these ties would wait for each all-to-all to finish; there a real deployment ties
the compute to the collective's start instead and lets the collective finish under it.

Results equal the single-batch path (tokens; float32 logits and cache within 1e-5 relative:
XLA:CPU may pick another dot kernel for a half-size batch, e.g. one-row decode micro-batches,
which changes the summation order): every op is row-wise (attention per sequence, routing per
token, the experts per row), cache pages are per sequence, and the dispatch of a micro-batch is
dropless on its own (worst-case capacity of its rows). An odd per-device batch is padded with
one empty row (masked: not cached, not routed, dropped from the output).

Public API: `MICRO_BATCHES`, `check_micro_batches`, `prefill_layers`, `decode_layers`,
`moe_dispatch` / `moe_experts` / `moe_combine` (DeepSeekMoE in three stages), `stage_order` /
`interleaving` (the compiled schedule, read back).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from dsv3_jax.infer import cache as cache_lib
from dsv3_jax.infer.attention import mla_decode
from dsv3_jax.model.experts import bind_experts
from dsv3_jax.model.moe import DeepSeekMoE
from dsv3_jax.parallel import dispatch as dispatch_lib

MICRO_BATCHES = (1, 2)
SCOPE = "two_batch"  # named-scope prefix of every stage: "two_batch/mb{0,1}.{stage}"
STAGES = ("attention", "dispatch", "experts", "combine", "mlp")


def check_micro_batches(micro_batches: Any, mesh=None) -> int:
  """The setting as an int, checked before any work.

  Args:
    micro_batches: 1 or 2.
    mesh: the steps' mesh (None: one device, where only 1 is allowed: no dispatch / combine
      to overlap).

  Raises:
    ValueError: not one of `MICRO_BATCHES`, or 2 without a mesh (names the setting and the
      allowed values).
  """
  if isinstance(micro_batches, bool) or micro_batches not in MICRO_BATCHES:
    raise ValueError(f"micro_batches={micro_batches!r}; allowed: {MICRO_BATCHES}")
  if micro_batches == 2 and mesh is None:
    raise ValueError("micro_batches=2 needs a mesh (allowed without one: 1): on one device "
                     "there is no dispatch / combine to overlap")
  return int(micro_batches)


# ---------------------------------------------------------------------------- MoE in stages


class InFlight(NamedTuple):
  """One micro-batch's MoE layer between `moe_dispatch` and `moe_combine`.

  x: [B, S, D] the normed hidden states (input of the shared experts).
  dispatched: `dispatch.Dispatched` (rows at this device's experts and the schedule's state).
  """

  x: jax.Array
  dispatched: dispatch_lib.Dispatched


def _schedule_kw(moe: DeepSeekMoE, capacity):
  return dict(capacity=tuple(capacity), topo=moe.topology, n_experts=moe.config.n_routed_experts)


def moe_dispatch(moe: DeepSeekMoE, x: jax.Array, mask: jax.Array, capacity) -> InFlight:
  """Router and the schedule's dispatch (per device, inside shard_map over the EP axes).

  Args:
    moe: the layer; x: [B, S, D] normed hidden states; mask: [B, S] bool (False: not routed);
    capacity: static per-hop buffer rows (`moe.worst_case_capacity` of all devices' rows:
      dropless).

  Returns:
    `InFlight`.
  """
  b, s, d = x.shape
  tokens = x.reshape(b * s, d)
  routing = moe.gate(tokens)
  sent = moe.schedule.dispatch(tokens, routing.topk_idx, routing.topk_weight, mask.reshape(-1),
                               **_schedule_kw(moe, capacity))
  return InFlight(x, sent)


def moe_experts(moe: DeepSeekMoE, flight: InFlight) -> tuple[jax.Array, Optional[jax.Array]]:
  """This device's routed experts on the rows that arrived, and the shared experts.

  Returns:
    (out [N, D] per received row, shared [B, S, D] or None without shared experts).
  """
  w = moe.experts
  experts = bind_experts(w.gate_proj[...], w.up_proj[...], w.down_proj[...],
                         fp8_recipe=moe.expert_recipe)
  out = experts(flight.dispatched.rows, flight.dispatched.expert_ids)
  shared = moe.shared_experts(flight.x) if moe.shared_experts is not None else None
  return out, shared


def moe_combine(moe: DeepSeekMoE, out: jax.Array, shared: Optional[jax.Array],
                flight: InFlight, capacity) -> jax.Array:
  """The schedule's combine: [B, S, D] = routed output (+ shared experts), what
  `DeepSeekMoE.__call__` returns (report eq. 12 without the residual)."""
  y, _ = moe.schedule.combine(out, flight.dispatched.state, **_schedule_kw(moe, capacity))
  y = y.reshape(flight.x.shape)
  return y if shared is None else y + shared


# ---------------------------------------------------------------------------- the layer loop


def _after(dep: Optional[jax.Array], x: jax.Array) -> jax.Array:
  """x, as an op that reads `dep`: what uses the result is scheduled after `dep` is computed.

  An exact identity on finite values that XLA cannot fold away: x where dep's first element is
  not NaN (an integer `dep` never is: its flag compares with the int minimum, which expert ids
  and slots never reach), NaN otherwise (a NaN is passed on, never hidden). XLA:CPU removes
  `optimization_barrier`s before scheduling (`OptimizationBarrierExpander`), so only a data
  dependency pins the order.
  """
  if dep is None:
    return x
  d = dep.reshape(-1)[0]
  if jnp.issubdtype(d.dtype, jnp.integer):
    flag = d == jnp.iinfo(d.dtype).min
  else:
    flag = jnp.isnan(d)
  return jnp.where(flag, jnp.asarray(jnp.nan, x.dtype), x)


Attend = Callable[[int, Any, int, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _micro_batch(steps, model, m: int, h: jax.Array, mask: jax.Array, attend: Attend,
                 pools: list) -> Iterator:
  """One micro-batch's layers as a coroutine: yields one array of each stage's output and
  receives that of the stage run just before its next one, which the next stage's inputs then
  read (`_after`), so the stages run in the driver's order. `pools` is shared by both
  micro-batches (each writes only its own sequences' pages)."""
  n_rows = h.shape[0] * h.shape[1] * steps.n_shards
  dep = yield None
  for i, layer in enumerate(model.layers):
    with jax.named_scope(f"{SCOPE}/mb{m}.attention"):
      h, pools[i] = attend(i, layer, m, _after(dep, h), pools[i])
      x = layer.post_attention_layernorm(h)
    if not layer.is_moe:
      dep = yield h
      with jax.named_scope(f"{SCOPE}/mb{m}.mlp"):
        h = h + layer.mlp(_after(dep, x))
      dep = yield h
      continue
    capacity = layer.mlp.worst_case_capacity(n_rows)  # dropless for this micro-batch
    dep = yield h
    with jax.named_scope(f"{SCOPE}/mb{m}.dispatch"):
      # the router runs with the dispatch's packing, right before the tokens leave
      flight = moe_dispatch(layer.mlp, _after(dep, x), mask, capacity)
    dep = yield flight.dispatched.expert_ids
    with jax.named_scope(f"{SCOPE}/mb{m}.experts"):
      sent = flight.dispatched
      flight = InFlight(_after(dep, flight.x), sent._replace(rows=_after(dep, sent.rows)))
      out, shared = moe_experts(layer.mlp, flight)
    dep = yield out
    with jax.named_scope(f"{SCOPE}/mb{m}.combine"):
      h = h + moe_combine(layer.mlp, _after(dep, out), shared, flight, capacity)
    dep = yield h
  return h


def _run_overlapped(steps, model, hs, masks, attend: Attend, pools) -> tuple[list, tuple]:
  """Drives the two micro-batch coroutines in the pattern A, A, B, B, ... (per MoE layer:
  A.attention, A.dispatch, B.attention, B.dispatch, A.experts, A.combine, B.experts,
  B.combine; per dense layer: A.attention, A.mlp, B.attention, B.mlp).

  Returns:
    ([h_A, h_B] final hidden states, pools).
  """
  pools = list(pools)
  gens = [_micro_batch(steps, model, m, hs[m], masks[m], attend, pools) for m in (0, 1)]
  for g in gens:
    next(g)
  out: list = [None, None]
  last = None
  done = [False, False]
  while not all(done):
    for m in (0, 1):
      for _ in range(2):
        if done[m]:
          break
        try:
          last = gens[m].send(last)
        except StopIteration as stop:
          out[m] = stop.value
          done[m] = True
  return out, tuple(pools)


def _padded(a: jax.Array, pad: int, fill=None) -> jax.Array:
  """[b, ...] with `pad` (0 or 1) rows appended: a copy of the last row, or `fill`."""
  if not pad:
    return a
  last = a[-1:] if fill is None else jnp.full_like(a[-1:], fill)
  return jnp.concatenate([a, last], axis=0)


def _halves(a: jax.Array, pad: int, fill=None) -> list[jax.Array]:
  """[b, ...] -> the two micro-batches [ceil(b / 2), ...] (A: first half, B: second half)."""
  a = _padded(a, pad, fill)
  half = a.shape[0] // 2
  return [a[:half], a[half:]]


def prefill_layers(steps, model, h: jax.Array, pools, mask: jax.Array, cos: jax.Array,
                   sin: jax.Array, slots: jax.Array) -> tuple[jax.Array, tuple]:
  """The decoder layers of `StepFunctions._prefill_local` with two micro-batches.

  Args:
    steps: the `StepFunctions` (mesh size, page size).
    model: the merged Transformer.
    h: [b, S, D] embedded prompts; pools: per-layer pools; mask: [b, S] bool;
    cos, sin: [S, r/2] float32 rotary tables; slots: [b, S] int32 cache rows (-1: none).

  Returns:
    (h [b, S, D] after the last layer, pools).
  """
  b = h.shape[0]
  pad = b % 2
  slot_halves = _halves(slots, pad, -1)

  def attend(i, layer, m, x_h, pool):
    attn = layer.self_attn
    x = layer.input_layernorm(x_h)
    q_nope, q_rope = attn.queries(x, cos, sin)
    c_kv, k_rope = attn.latent_kv(x, cos, sin)
    pool = cache_lib.write_latents(pool, slot_halves[m], jnp.concatenate([c_kv, k_rope], -1))
    return x_h + attn.attend(q_nope, q_rope, c_kv, k_rope), pool

  hs, pools = _run_overlapped(steps, model, _halves(h, pad), _halves(mask, pad, False), attend,
                              pools)
  return jnp.concatenate(hs, axis=0)[:b], pools


def decode_layers(steps, model, h: jax.Array, pools, cos: jax.Array, sin: jax.Array,
                  page_table: jax.Array, positions: jax.Array,
                  valid: jax.Array) -> tuple[jax.Array, tuple]:
  """The decoder layers of `StepFunctions._decode_layers` with two micro-batches.

  Args:
    steps: the `StepFunctions`; model: the merged Transformer.
    h: [b, T, D] embedded new tokens; pools: per-layer pools;
    cos, sin: [b, T, r/2] float32 rotary tables at `positions`;
    page_table: [b, P] int32; positions: [b, T] int32; valid: [b, T] bool.

  Returns:
    (h [b, T, D] after the last layer, pools).
  """
  b = h.shape[0]
  pad = b % 2
  cs, ss, tables, poss = (_halves(a, pad) for a in (cos, sin, page_table, positions))
  valids = _halves(valid, pad, False)  # the padding row writes and routes nothing

  def attend(i, layer, m, x_h, pool):
    out, pool = mla_decode(layer.self_attn, layer.input_layernorm(x_h), cs[m], ss[m], pool,
                           tables[m], poss[m], valids[m], steps.spec.page_size)
    return x_h + out, pool

  hs, pools = _run_overlapped(steps, model, _halves(h, pad), valids, attend, pools)
  return jnp.concatenate(hs, axis=0)[:b], pools


# ---------------------------------------------------------------------------- the schedule


class ScheduledOp(NamedTuple):
  """One instruction of a scheduled HLO computation.

  position: index in the computation's schedule; computation: its name; name: the
  instruction's name; opcode; kind: the collective kind (`cluster.hlo.KINDS`) or "";
  stage: "mb{0,1}.{stage}" from the two-batch named scopes, or "" (no such scope).
  """

  position: int
  computation: str
  name: str
  opcode: str
  kind: str
  stage: str


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*[({]")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_STAGE = re.compile(SCOPE + r"/(mb[01])\.(" + "|".join(STAGES) + r")")


def stage_order(hlo_text: str) -> list[ScheduledOp]:
  """The instructions of a compiled (scheduled) HLO module in schedule order, each with its
  two-batch stage and, for collectives, its kind (`cluster.hlo.parse_hlo`).

  `Compiled.as_text()` of a scheduled module prints each computation's instructions in the
  order XLA runs them (`is_scheduled=true` in the header), so positions are the schedule.

  Args:
    hlo_text: `jax.jit(f).lower(...).compile().as_text()`.

  Returns:
    `ScheduledOp`s, computation by computation, in schedule order.

  Raises:
    ValueError: the text is not a scheduled HLO module.
  """
  from dsv3_jax.cluster.hlo import parse_hlo

  if "is_scheduled=true" not in hlo_text.split("\n", 1)[0]:
    raise ValueError("stage_order: hlo_text is not a scheduled HLO module (use the compiled "
                     "program's as_text())")
  kinds = {(c.computation, c.name.lstrip("%")): c.kind for c in parse_hlo(hlo_text)}
  ops: list[ScheduledOp] = []
  computation, pos = "", 0
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m or line.startswith(("HloModule", "ENTRY")):
      c = _COMPUTATION.match(line)
      if c and not line.startswith("HloModule"):
        computation, pos = c.group(1), 0
      continue
    name, rest = m.group(1), m.group(2)
    op = _OPCODE.search(" " + rest.split(", metadata=")[0])
    st = _STAGE.search(rest)
    ops.append(ScheduledOp(pos, computation, name, op.group(1) if op else "",
                           kinds.get((computation, name), ""),
                           f"{st.group(1)}.{st.group(2)}" if st else ""))
    pos += 1
  return ops


def interleaving(ops: Sequence[ScheduledOp]) -> list[dict]:
  """Per micro-batch and MoE layer: the stages scheduled between its dispatch all-to-all(s)
  and its combine all-to-all(s).

  Args:
    ops: `stage_order` of a compiled two-batch program.

  Returns:
    One dict per (computation, micro-batch, layer) in schedule order: computation, mb ("mb0" /
    "mb1"), dispatch (position of the first dispatch all-to-all), combine (position of the last
    combine all-to-all), between (sorted stage names of the ops strictly between them).
  """
  out = []
  by_comp: dict[str, list[ScheduledOp]] = {}
  for o in ops:
    by_comp.setdefault(o.computation, []).append(o)
  for comp, seq in by_comp.items():
    for mb in ("mb0", "mb1"):
      layers: list[dict] = []
      for o in seq:
        if o.kind != "all-to-all" or not o.stage.startswith(mb + "."):
          continue
        phase = o.stage.split(".", 1)[1]
        if phase == "dispatch" and (not layers or layers[-1]["combine"] is not None):
          layers.append(dict(computation=comp, mb=mb, dispatch=o.position, combine=None))
        elif phase == "combine" and layers:
          layers[-1]["combine"] = o.position
      for lay in layers:
        if lay["combine"] is None:
          continue
        lay["between"] = sorted({p.stage for p in seq
                                 if lay["dispatch"] < p.position < lay["combine"] and p.stage})
        out.append(lay)
  out.sort(key=lambda d: (d["computation"], d["dispatch"]))
  return out
