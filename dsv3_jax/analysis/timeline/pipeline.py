"""Pipeline-parallel schedules op by op: 1F1B, ZB1P and DualPipe, against V3 report Table 2.

1F1B, ZB1P (ZB-H1, Qi et al. 2023) and DualPipe (V3 report §3.2.1, Fig. 5, Table 2) are
generated op by op per rank, with the dependencies between stages (`pipeline_tasks`), simulated
(`simulate_pipeline`), and their measured bubbles and activation memory compared with
`bubble_formula` / `memory_formula`. Times in any unit (F, B, W chunk times).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from dsv3_jax.analysis.timeline.engine import Task, Timeline, simulate

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
