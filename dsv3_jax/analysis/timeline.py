"""Event-driven timelines: dual micro-batch overlap, the EP decode bound, pipeline schedules.

`simulate` runs tasks on streams (a compute stream, a communication stream, a pipeline rank...).
Each stream executes its tasks in submission order, one at a time, like a CUDA stream; a task starts
when it is at the head of its stream and all its dependencies have finished. Time advances from
completion event to completion event (a heap), so overlaps, stalls and bubbles come out of the
dependencies, not from formulas.

On top of it:
  * `layer_tasks` / `simulate_layers`: one or more MoE layers for two micro-batches, sequential or
    with dual micro-batch overlap (Insights §2.3.1, V3 report §3.2.1 / §3.4): attention and MoE
    compute of one micro-batch run while the other's dispatch / combine is on the network.
  * `ep_comm_time`, `ep_tpot_bound`, `simulate_decode`: the expert-parallel decode bound of
    Insights §2.3.2 (dispatch in FP8, combine in BF16, 8 routed + 1 shared expert, 61 layers).
  * `pipeline_tasks` / `simulate_pipeline`: 1F1B, ZB1P (ZB-H1, Qi et al. 2023) and DualPipe
    (V3 report §3.2.1, Fig. 5, Table 2) generated op by op per rank, with the dependencies between
    stages, whose measured bubbles are compared with `bubble_formula`.
Times are in seconds unless a function says otherwise (pipeline times are in any unit).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from dsv3_jax.analysis import hardware
from dsv3_jax.analysis._spec import ModelSpec
from dsv3_jax.analysis.memory import attention_params_per_layer, expert_params


# --------------------------------------------------------------------------- engine
@dataclasses.dataclass(frozen=True)
class Task:
  """A unit of work on one stream.

  Attributes:
    name: unique name.
    stream: the stream (resource) that executes it.
    duration: time units (>= 0).
    deps: names of tasks that must finish before it starts.
    kind: label for plots ("attention", "dispatch", "F", "B", "W", "F&B"...).
    group: label of the micro-batch or chunk it belongs to.
  """

  name: str
  stream: str
  duration: float
  deps: Tuple[str, ...] = ()
  kind: str = ""
  group: str = ""


@dataclasses.dataclass(frozen=True)
class Interval:
  """A task as executed: [start, end) on its stream."""

  task: Task
  start: float
  end: float


@dataclasses.dataclass(frozen=True)
class Timeline:
  """Result of `simulate`.

  Attributes:
    intervals: name -> `Interval`, in start order.
    streams: stream names in first-appearance order.
  """

  intervals: Dict[str, Interval]
  streams: Tuple[str, ...]

  @property
  def makespan(self) -> float:
    """End of the last task (time units)."""
    return max((iv.end for iv in self.intervals.values()), default=0.0)

  def busy(self, stream: str) -> float:
    """Total duration of the tasks of `stream`.

    Raises:
      ValueError: for an unknown stream.
    """
    if stream not in self.streams:
      raise ValueError(f"stream={stream!r}; allowed: {self.streams}")
    return sum(iv.end - iv.start for iv in self.intervals.values() if iv.task.stream == stream)

  def idle(self, stream: str) -> float:
    """makespan - busy(stream): the stream's bubble."""
    return self.makespan - self.busy(stream)

  def utilisation(self, stream: str) -> float:
    """busy(stream) / makespan, in [0, 1]."""
    m = self.makespan
    return self.busy(stream) / m if m > 0 else 0.0

  def on(self, stream: str) -> List[Interval]:
    """The intervals of one stream, in execution order."""
    return [iv for iv in self.intervals.values() if iv.task.stream == stream]


def simulate(tasks: Iterable[Task]) -> Timeline:
  """Runs tasks on their streams, event by event.

  Args:
    tasks: the tasks; each stream executes its tasks in the order given here.

  Returns:
    The `Timeline`.

  Raises:
    ValueError: on duplicate names, unknown dependencies, negative durations, or a deadlock (a
      dependency cycle, or a task waiting on one queued behind it in the same stream).
  """
  tasks = list(tasks)
  by_name: Dict[str, Task] = {}
  queues: Dict[str, collections.deque] = {}
  for t in tasks:
    if t.name in by_name:
      raise ValueError(f"duplicate task name {t.name!r}")
    if not t.duration >= 0:
      raise ValueError(f"task {t.name!r}: duration must be >= 0, got {t.duration!r}")
    by_name[t.name] = t
    queues.setdefault(t.stream, collections.deque()).append(t)
  for t in tasks:
    for d in t.deps:
      if d not in by_name:
        raise ValueError(f"task {t.name!r} depends on unknown task {d!r}")
  finished: Dict[str, float] = {}
  started: Dict[str, Tuple[float, float]] = {}
  busy_until = {s: 0.0 for s in queues}
  running = {s: False for s in queues}
  events: List[Tuple[float, int, str]] = []
  seq = 0
  now = 0.0
  while True:
    for s, q in queues.items():  # start every head task whose inputs are ready
      if running[s] or not q:
        continue
      head = q[0]
      if all(d in finished for d in head.deps):
        q.popleft()
        start = max(now, busy_until[s])
        end = start + head.duration
        started[head.name] = (start, end)
        running[s] = True
        heapq.heappush(events, (end, seq, head.name))
        seq += 1
    if not events:
      break
    now, _, name = heapq.heappop(events)
    batch = [name]
    while events and events[0][0] == now:
      batch.append(heapq.heappop(events)[2])
    for n in batch:
      finished[n] = now
      s = by_name[n].stream
      running[s] = False
      busy_until[s] = now
  if len(finished) != len(tasks):
    stuck = [q[0].name for q in queues.values() if q]
    raise ValueError(f"deadlock: {len(tasks) - len(finished)} tasks never ran; blocked stream "
                     f"heads: {stuck[:8]}")
  order = sorted(started, key=lambda n: (started[n][0], started[n][1]))
  intervals = {n: Interval(by_name[n], *started[n]) for n in order}
  return Timeline(intervals=intervals, streams=tuple(queues))


# --------------------------------------------------------------------------- one MoE layer
@dataclasses.dataclass(frozen=True)
class LayerCosts:
  """Per-micro-batch durations of one MoE layer's four phases, in seconds.

  Attributes:
    attention: attention (MLA) compute.
    dispatch: all-to-all sending tokens to their experts.
    moe: expert (routed + shared) compute.
    combine: all-to-all returning expert outputs.
  """

  attention: float
  dispatch: float
  moe: float
  combine: float

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"LayerCosts.{f.name} must be >= 0 seconds, got {v!r}")

  @property
  def compute(self) -> float:
    return self.attention + self.moe

  @property
  def communication(self) -> float:
    return self.dispatch + self.combine


def moe_layer_costs(model: Any = "deepseek_v3_671b",
                    accelerator: hardware.Accelerator = hardware.H800,
                    tokens: int = 4096, context_len: int = 4096,
                    compute_efficiency: float = 0.5, remote_nodes_per_token: float = 3.5,
                    dispatch_bytes: float = 1.0, combine_bytes: float = 2.0,
                    network_bandwidth: Optional[float] = None) -> LayerCosts:
  """Durations of one MoE layer for a micro-batch of `tokens` tokens on one GPU (prefill).

  Compute: forward FLOPs (attention projections + causal attention core over (context+1)/2 keys;
  router + activated routed and shared experts) at `compute_efficiency` x the accelerator's dense
  BF16 peak. Communication (V3 report §3.2.2): with node-limited routing each token crosses IB
  once per remote node it is sent to (then fans out over NVLink); dispatch carries `hidden_size`
  FP8 bytes per copy, combine BF16 bytes, at the GPU's effective IB bandwidth.

  Args:
    model: a MoE `ModelSpec`, config name or config.
    accelerator: the GPU (default H800).
    tokens: tokens in the micro-batch on this GPU.
    context_len: sequence length for the attention core.
    compute_efficiency: achieved / peak FLOP/s, in (0, 1].
    remote_nodes_per_token: IB copies per token (<= topk_group = 4; 3.5 = 4 x 7/8 when the
      token's own node is one of the 8 equally likely).
    dispatch_bytes, combine_bytes: bytes per element on the wire.
    network_bandwidth: B/s per GPU; default `accelerator.scale_out_bandwidth_effective`.

  Returns:
    `LayerCosts` in seconds.

  Raises:
    ValueError: for a dense model or out-of-range arguments.
  """
  s = ModelSpec.from_config(model)
  if not s.is_moe:
    raise ValueError(f"model {s.name!r} has no MoE layers; moe_layer_costs needs n_routed_experts")
  for name, v in (("tokens", tokens), ("context_len", context_len)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  if not 0 < compute_efficiency <= 1:
    raise ValueError(f"compute_efficiency must be in (0, 1], got {compute_efficiency!r}")
  if remote_nodes_per_token < 0:
    raise ValueError(f"remote_nodes_per_token must be >= 0, got {remote_nodes_per_token!r}")
  bw = network_bandwidth or accelerator.scale_out_bandwidth_effective
  if bw <= 0:
    raise ValueError(f"network_bandwidth must be > 0 B/s, got {bw!r}")
  rate = accelerator.bf16_dense_flops * compute_efficiency
  keys = (context_len + 1) / 2
  attn_flops = 2 * attention_params_per_layer(s) + \
      2 * s.num_attention_heads * (s.qk_head_dim + s.value_head_dim) * keys
  moe_flops = 2 * ((s.num_experts_per_tok + s.n_shared_experts) * expert_params(s) +
                   s.n_routed_experts * s.hidden_size)
  wire = tokens * remote_nodes_per_token * s.hidden_size
  return LayerCosts(attention=tokens * attn_flops / rate, dispatch=wire * dispatch_bytes / bw,
                    moe=tokens * moe_flops / rate, combine=wire * combine_bytes / bw)


COMPUTE, COMM = "compute", "comm"
PHASES = ("attention", "dispatch", "moe", "combine")


def layer_tasks(costs: LayerCosts, num_layers: int = 1, micro_batches: int = 2,
                overlap: bool = True) -> List[Task]:
  """Tasks of `num_layers` MoE layers for `micro_batches` micro-batches on one GPU.

  Each micro-batch runs attention -> dispatch -> moe -> combine per layer (compute on the
  "compute" stream, all-to-alls on the "comm" stream), and its next layer's attention waits for
  its combine.
  * overlap=False: one micro-batch after the other, every task waits for the previous one.
  * overlap=True (dual micro-batch overlap): streams interleave the micro-batches — compute
    runs attention(0), attention(1), moe(0), moe(1), ...; the network runs dispatch(0),
    dispatch(1), combine(0), combine(1), ... so one micro-batch computes while the other
    communicates.

  Raises:
    ValueError: for non-positive counts.
  """
  for name, v in (("num_layers", num_layers), ("micro_batches", micro_batches)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  dur = dict(attention=costs.attention, dispatch=costs.dispatch, moe=costs.moe,
             combine=costs.combine)
  stream = dict(attention=COMPUTE, dispatch=COMM, moe=COMPUTE, combine=COMM)
  name = lambda l, m, ph: f"L{l}.mb{m}.{ph}"
  tasks: List[Task] = []
  if not overlap:
    prev: Tuple[str, ...] = ()
    for l in range(num_layers):
      for m in range(micro_batches):
        for ph in PHASES:
          n = name(l, m, ph)
          tasks.append(Task(n, stream[ph], dur[ph], prev, ph, f"mb{m}"))
          prev = (n,)
    return tasks

  def deps(l: int, m: int, ph: str) -> Tuple[str, ...]:
    i = PHASES.index(ph)
    if i > 0:
      return (name(l, m, PHASES[i - 1]),)
    return (name(l - 1, m, "combine"),) if l > 0 else ()

  for l in range(num_layers):
    # submission order per stream = the interleaving of the two micro-batches
    for ph in PHASES:
      for m in range(micro_batches):
        tasks.append(Task(name(l, m, ph), stream[ph], dur[ph], deps(l, m, ph), ph, f"mb{m}"))
  return tasks


@dataclasses.dataclass(frozen=True)
class LayerResult:
  """Per-layer time and utilisation of simulated MoE layers.

  Attributes:
    timeline: the simulated `Timeline`.
    num_layers: layers simulated.
    layer_time: makespan / num_layers, seconds.
    steady_layer_time: makespan(num_layers + 1) - makespan(num_layers): the time one more layer
      adds once the overlap is in steady state, seconds.
    compute_utilisation: compute-stream busy time / makespan.
    comm_utilisation: comm-stream busy time / makespan.
  """

  timeline: Timeline
  num_layers: int
  layer_time: float
  steady_layer_time: float
  compute_utilisation: float
  comm_utilisation: float


def simulate_layers(costs: LayerCosts, num_layers: int = 1, micro_batches: int = 2,
                    overlap: bool = True) -> LayerResult:
  """Simulates `layer_tasks` and reports per-layer time and stream utilisation.

  Raises:
    ValueError: for non-positive counts.
  """
  tl = simulate(layer_tasks(costs, num_layers, micro_batches, overlap))
  more = simulate(layer_tasks(costs, num_layers + 1, micro_batches, overlap))
  return LayerResult(timeline=tl, num_layers=num_layers, layer_time=tl.makespan / num_layers,
                     steady_layer_time=more.makespan - tl.makespan,
                     compute_utilisation=tl.utilisation(COMPUTE),
                     comm_utilisation=tl.utilisation(COMM))


# --------------------------------------------------------------------------- EP decode bound
def ep_comm_time(tokens: int = 32, experts_per_token: int = 9, hidden_size: int = 7000,
                 dispatch_bytes: float = 1.0, combine_bytes: float = 2.0,
                 bandwidth: float = hardware.CX7_400G.bandwidth) -> Tuple[float, float]:
  """Dispatch and combine time of one micro-batch in one layer (Insights §2.3.2).

  (1 byte + 2 bytes) x 32 tokens x 9 experts x 7K / 50 GB/s = 120.96 us on 400 Gb/s IB: each
  token's hidden state goes to 8 routed + 1 shared expert in FP8 and comes back in BF16.

  Args:
    tokens: tokens per micro-batch on one device.
    experts_per_token: destinations per token (num_experts_per_tok + n_shared_experts).
    hidden_size: elements per token (the paper rounds V3's 7168 to 7K = 7000).
    dispatch_bytes: bytes per element sent (1: FP8).
    combine_bytes: bytes per element returned (2: BF16).
    bandwidth: B/s of the device's link (50e9 for a 400 Gb/s NIC, 900e9 for GB200 NVL72).

  Returns:
    (dispatch_seconds, combine_seconds).

  Raises:
    ValueError: for non-positive sizes or bandwidth, or negative byte widths.
  """
  for name, v in (("tokens", tokens), ("experts_per_token", experts_per_token),
                  ("hidden_size", hidden_size)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  if not bandwidth > 0:
    raise ValueError(f"bandwidth must be > 0 B/s, got {bandwidth!r}")
  if dispatch_bytes < 0 or combine_bytes < 0:
    raise ValueError(f"dispatch_bytes / combine_bytes must be >= 0, got "
                     f"{dispatch_bytes!r} / {combine_bytes!r}")
  elements = tokens * experts_per_token * hidden_size
  return elements * dispatch_bytes / bandwidth, elements * combine_bytes / bandwidth


def ep_tpot_bound(comm_seconds: float, num_layers: int = 61, micro_batches: int = 2) -> float:
  """Time per output token when communication bounds decoding (Insights §2.3.2).

  With dual micro-batch overlap the compute hides behind communication, and the network carries
  both micro-batches' dispatch + combine in every layer: TPOT = layers x micro_batches x comm.
  61 x 2 x 120.96 us = 14.76 ms (~67 tokens/s).

  Args:
    comm_seconds: dispatch + combine of one micro-batch in one layer.
    num_layers: MoE layers traversed per token (61 for V3).
    micro_batches: micro-batches sharing the network (2 for dual micro-batch overlap).

  Raises:
    ValueError: for non-positive arguments.
  """
  if not comm_seconds > 0:
    raise ValueError(f"comm_seconds must be > 0, got {comm_seconds!r}")
  for name, v in (("num_layers", num_layers), ("micro_batches", micro_batches)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  return num_layers * micro_batches * comm_seconds


def simulate_decode(dispatch_s: float, combine_s: float, attention_s: float = 0.0,
                    moe_s: float = 0.0, num_layers: int = 61, micro_batches: int = 2,
                    overlap: bool = True) -> Timeline:
  """Event-driven decode step: every layer of every micro-batch; makespan = TPOT.

  With compute no longer than communication the overlapped makespan equals `ep_tpot_bound`
  (plus the first attention and last MoE that cannot be hidden).

  Raises:
    ValueError: for negative durations or non-positive counts.
  """
  costs = LayerCosts(attention=attention_s, dispatch=dispatch_s, moe=moe_s, combine=combine_s)
  return simulate(layer_tasks(costs, num_layers, micro_batches, overlap))


# --------------------------------------------------------------------------- pipeline schedules
PIPELINE_METHODS = ("1F1B", "ZB1P", "DualPipe")


def bubble_formula(method: str, pp: int, F: float, B: float, W: float,
                   FB: Optional[float] = None) -> float:
  """Pipeline bubble of V3 report Table 2 (arXiv 2412.19437 §3.2.1).

  1F1B: (PP-1)(F+B); ZB1P: (PP-1)(F+B-2W); DualPipe: (PP/2-1)(F&B+B-3W). F: forward chunk, B: full
  backward chunk, W: backward-for-weights chunk, F&B: two mutually overlapped forward and backward
  chunks.

  Raises:
    ValueError: for an unknown method, PP < 2, an odd PP for DualPipe, or F&B missing.
  """
  if method not in PIPELINE_METHODS:
    raise ValueError(f"method={method!r}; allowed: {PIPELINE_METHODS}")
  if not isinstance(pp, int) or pp < 2:
    raise ValueError(f"pp must be an integer >= 2, got {pp!r}")
  if method == "1F1B":
    return (pp - 1) * (F + B)
  if method == "ZB1P":
    return (pp - 1) * (F + B - 2 * W)
  if pp % 2:
    raise ValueError(f"DualPipe needs an even pp, got {pp}")
  if FB is None:
    raise ValueError("DualPipe's bubble needs FB (the F&B time)")
  return (pp // 2 - 1) * (FB + B - 3 * W)


def memory_formula(method: str, pp: int) -> Tuple[int, int]:
  """(parameter copies, peak activations in micro-batch-stage units) of V3 report Table 2.

  Raises:
    ValueError: for an unknown method.
  """
  if method not in PIPELINE_METHODS:
    raise ValueError(f"method={method!r}; allowed: {PIPELINE_METHODS}")
  return (2, pp + 1) if method == "DualPipe" else (1, pp)


class _Builder:
  """Collects pipeline ops per rank; maps logical ops (kind, dir, mb, stage) to task names."""

  def __init__(self, pp: int):
    self.pp = pp
    self.ranks: List[List[Tuple[str, str, float, List[Tuple]]]] = [[] for _ in range(pp)]
    self.alias: Dict[Tuple, str] = {}
    self.memory: Dict[str, Tuple[List[Tuple], List[Tuple]]] = {}

  def add(self, rank: int, kind: str, duration: float, parts: Sequence[Tuple],
          deps: Sequence[Tuple], allocs: Sequence[Tuple] = (), frees: Sequence[Tuple] = ()):
    name = f"r{rank}.{len(self.ranks[rank])}.{kind}"
    group = "|".join(f"{p[0]}d{p[1]}m{p[2]}" for p in parts)
    self.ranks[rank].append((name, kind, duration, list(deps), group))
    for p in parts:
      self.alias[p] = name
    self.memory[name] = (list(allocs), list(frees))

  def tasks(self) -> List[Task]:
    out = []
    for r, ops in enumerate(self.ranks):
      for name, kind, dur, deps, group in ops:
        resolved = []
        for d in deps:
          if d not in self.alias:
            raise ValueError(f"schedule bug: {name} depends on {d}, which no rank runs")
          if self.alias[d] != name:
            resolved.append(self.alias[d])
        out.append(Task(name, f"rank{r}", dur, tuple(resolved), kind, group))
    return out


def _check_times(F: float, B: float, W: float, FB: Optional[float]) -> None:
  for name, v in (("F", F), ("B", B)):
    if not isinstance(v, (int, float)) or v <= 0:
      raise ValueError(f"{name} must be > 0, got {v!r}")
  if not isinstance(W, (int, float)) or not 0 <= W < B:
    raise ValueError(f"W must satisfy 0 <= W < B (W is part of the full backward B), got {W!r}")
  if FB is not None and not 0 < FB:
    raise ValueError(f"FB must be > 0, got {FB!r}")


def _one_f_one_b_order(pp: int, stage: int, micro_batches: int) -> List[Tuple[str, int]]:
  warmup = min(pp - stage - 1, micro_batches)
  order = [("F", m) for m in range(warmup)]
  nf, nb = warmup, 0
  while nf < micro_batches:
    order += [("F", nf), ("B", nb)]
    nf += 1
    nb += 1
  order += [("B", m) for m in range(nb, micro_batches)]
  return order


def _fwd_deps(d: int, m: int, s: int) -> List[Tuple]:
  return [("F", d, m, s - 1)] if s > 0 else []


def _bwd_deps(d: int, m: int, s: int, pp: int) -> List[Tuple]:
  return [("B", d, m, s + 1)] if s < pp - 1 else [("F", d, m, s)]


def pipeline_tasks(method: str, pp: int, micro_batches: int, F: float = 1.0, B: float = 2.0,
                   W: float = 1.0, FB: Optional[float] = None) -> Tuple[List[Task], _Builder]:
  """Generates a pipeline schedule op by op for every rank, with inter-stage dependencies.

  * 1F1B: rank s runs PP-s-1 warm-up forwards, then alternates forward / full backward (B), then
    drains the backwards.
  * ZB1P (ZB-H1): the 1F1B order with B split into input-gradient B-W and weight-gradient W; rank
    s defers each W by s backward passes (the last s Ws run at the end), which fills the cooldown
    bubble while in-flight activations stay at 1F1B's PP.
  * DualPipe: micro-batches enter from both ends (M/2 per direction); rank r holds stage r of the
    forward direction and stage PP-1-r of the reverse one. Per rank, the eight phases of
    deepseek-ai/DualPipe: nF0, nF0F1, nB1W1F1 (zero-bubble), nF0B1F1B0 (main, forward and backward
    chunks of two micro-batches overlapped as one F&B op), nB1F1B0, nB1B0 (second half
    zero-bubble), nWB0, nW. Phase 0/1 means forward/reverse direction on the first half of the
    ranks and the opposite on the second half, so the schedule is mirror-symmetric.

  Args:
    method: "1F1B", "ZB1P" or "DualPipe".
    pp: pipeline ranks (>= 2; even for DualPipe).
    micro_batches: micro-batches per step (>= 1; DualPipe: even and >= 2 * pp).
    F, B, W: forward, full backward and weight-backward chunk times (0 <= W < B).
    FB: overlapped forward + backward time (DualPipe; default F + B, i.e. overlap hides only
      communication).

  Returns:
    (tasks, builder); the builder keeps per-op activation bookkeeping for `simulate_pipeline`.

  Raises:
    ValueError: for an unknown method or invalid sizes / times.
  """
  if method not in PIPELINE_METHODS:
    raise ValueError(f"method={method!r}; allowed: {PIPELINE_METHODS}")
  if not isinstance(pp, int) or isinstance(pp, bool) or pp < 2:
    raise ValueError(f"pp must be an integer >= 2, got {pp!r}")
  if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
    raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
  _check_times(F, B, W, FB)
  b = _Builder(pp)
  if method in ("1F1B", "ZB1P"):
    for s in range(pp):
      lag = s if method == "ZB1P" else 0
      pending: List[int] = []
      for kind, m in _one_f_one_b_order(pp, s, micro_batches):
        act = ("act", 0, m, s)
        if kind == "F":
          b.add(s, "F", F, [("F", 0, m, s)], _fwd_deps(0, m, s), allocs=[act])
          continue
        if method == "1F1B":
          b.add(s, "B", B, [("B", 0, m, s)], _bwd_deps(0, m, s, pp), frees=[act])
          continue
        b.add(s, "B", B - W, [("B", 0, m, s)], _bwd_deps(0, m, s, pp))
        pending.append(m)
        if len(pending) > lag:
          w = pending.pop(0)
          b.add(s, "W", W, [("W", 0, w, s)], [("B", 0, w, s)], frees=[("act", 0, w, s)])
      for w in pending:
        b.add(s, "W", W, [("W", 0, w, s)], [("B", 0, w, s)], frees=[("act", 0, w, s)])
    return b.tasks(), b
  # ------------------------------------------------------------------ DualPipe
  if pp % 2:
    raise ValueError(f"DualPipe needs an even pp, got {pp}")
  if micro_batches % 2 or micro_batches < 2 * pp:
    raise ValueError(f"DualPipe needs an even micro_batches >= 2 * pp = {2 * pp}, got "
                     f"{micro_batches}")
  fb = F + B if FB is None else FB
  half, n_half = pp // 2, micro_batches // 2
  for r in range(pp):
    h = min(r, pp - 1 - r)
    second = r >= half
    fcount, bcount = [0, 0], [0, 0]
    wqueue: List[Tuple] = []

    def direction(phase: int) -> int:
      return phase ^ int(second)

    def stage(d: int) -> int:
      return r if d == 0 else pp - 1 - r

    def next_f(phase: int):
      d = direction(phase)
      m = fcount[phase]
      fcount[phase] += 1
      s = stage(d)
      return ("F", d, m, s), _fwd_deps(d, m, s), ("act", d, m, s)

    def next_b(phase: int):
      d = direction(phase)
      m = bcount[phase]
      bcount[phase] += 1
      s = stage(d)
      return ("B", d, m, s), _bwd_deps(d, m, s, pp), ("act", d, m, s), (d, m, s)

    def f(phase: int):
      part, deps, act = next_f(phase)
      b.add(r, "F", F, [part], deps, allocs=[act])

    def bwd(phase: int, zero_bubble: bool = False):
      part, deps, act, key = next_b(phase)
      if zero_bubble:
        wqueue.append(key)
        b.add(r, "B", B - W, [part], deps)
      else:
        b.add(r, "B", B, [part], deps, frees=[act])

    def w():
      d, m, s = wqueue.pop(0)
      b.add(r, "W", W, [("W", d, m, s)], [("B", d, m, s)], frees=[("act", d, m, s)])

    def f_and_b(phase_f: int, phase_b: int):
      fpart, fdeps, fact = next_f(phase_f)
      bpart, bdeps, bact, _ = next_b(phase_b)
      b.add(r, "F&B", fb, [fpart, bpart], fdeps + bdeps, allocs=[fact], frees=[bact])

    for _ in range(2 * (half - h - 1)):  # 1: nF0
      f(0)
    for _ in range(h + 1):  # 2: nF0F1
      f(0)
      f(1)
    for _ in range(half - h - 1):  # 3: nB1W1F1
      bwd(1, zero_bubble=True)
      w()
      f(1)
    for i in range(n_half - pp + h + 1):  # 4: nF0B1F1B0
      if i == 0 and h == half - 1:  # middle ranks: not overlapped, shortens the bubble
        f(0)
        bwd(1)
      else:
        f_and_b(0, 1)
      f_and_b(1, 0)
    for _ in range(half - h - 1):  # 5: nB1F1B0
      bwd(1)
      f_and_b(1, 0)
    zero_bubble = False  # 6: nB1B0, the second half with zero bubble
    steps = h + 1
    for i in range(steps):
      if i == steps // 2 and h % 2 == 1:
        zero_bubble = True
      bwd(1, zero_bubble)
      if i == steps // 2 and h % 2 == 0:
        zero_bubble = True
      bwd(0, zero_bubble)
    for _ in range(half - h - 1):  # 7: nWB0
      w()
      bwd(0, zero_bubble=True)
    for _ in range(h + 1):  # 8: nW
      w()
    if wqueue or fcount != [n_half, n_half] or bcount != [n_half, n_half]:
      raise AssertionError(f"DualPipe schedule bug on rank {r}: {fcount} {bcount} {wqueue}")
  return b.tasks(), b


@dataclasses.dataclass(frozen=True)
class PipelineResult:
  """A simulated pipeline schedule against its Table 2 formula.

  Attributes:
    method, pp, micro_batches: the schedule.
    timeline: the simulated `Timeline` (one stream per rank).
    makespan: time of the whole step.
    bubble: max over ranks of (makespan - rank busy time), the measured bubble.
    bubble_per_rank: per-rank idle time.
    formula: `bubble_formula` for the same F, B, W, F&B.
    parameter_copies: max over ranks of distinct model stages held (1F1B: 1, DualPipe: 2).
    peak_activations: max over ranks and time of micro-batch-stage activations alive (allocated
      at a forward's start, freed when its weight gradient is done).
  """

  method: str
  pp: int
  micro_batches: int
  timeline: Timeline
  makespan: float
  bubble: float
  bubble_per_rank: Tuple[float, ...]
  formula: float
  parameter_copies: int
  peak_activations: int


def simulate_pipeline(method: str, pp: int, micro_batches: Optional[int] = None, F: float = 1.0,
                      B: float = 2.0, W: float = 1.0, FB: Optional[float] = None) -> PipelineResult:
  """Generates and simulates a pipeline schedule and measures bubble and memory.

  Args:
    method, pp, F, B, W, FB: see `pipeline_tasks`.
    micro_batches: default 2 * pp for DualPipe, 4 * pp otherwise... any count >= the minimum.

  Returns:
    `PipelineResult`.

  Raises:
    ValueError: as `pipeline_tasks`.
  """
  if micro_batches is None:
    micro_batches = 4 * pp
  tasks, builder = pipeline_tasks(method, pp, micro_batches, F, B, W, FB)
  tl = simulate(tasks)
  busy = [tl.busy(f"rank{r}") for r in range(pp)]
  bubbles = tuple(tl.makespan - x for x in busy)
  fb = F + B if FB is None else FB
  formula = bubble_formula(method, pp, F, B, W, fb)
  peak = 0
  copies = 0
  for r in range(pp):
    events = []
    stages = set()
    for iv in tl.on(f"rank{r}"):
      allocs, frees = builder.memory[iv.task.name]
      for a in allocs:
        events.append((iv.start, 1, 1))
        stages.add((a[1], a[3]))
      for _ in frees:
        events.append((iv.end, 0, -1))
    live = 0
    for _, _, delta in sorted(events):  # frees before allocs at equal times
      live += delta
      peak = max(peak, live)
    copies = max(copies, len(stages))
  return PipelineResult(method=method, pp=pp, micro_batches=micro_batches, timeline=tl,
                        makespan=tl.makespan, bubble=max(bubbles), bubble_per_rank=bubbles,
                        formula=formula, parameter_copies=copies, peak_activations=peak)
