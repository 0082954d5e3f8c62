"""Static slot tables for executed pipeline schedules, derived from analysis/timeline's simulator.

The op order of 1F1B, ZB1P (ZB-H1) and DualPipe (V3 report §3.2.1, Fig. 5, Table 2) per rank and
the dependencies between stages are generated once, by `analysis.timeline.pipeline_tasks`, and
simulated by `analysis.timeline.simulate` with unit costs: a forward chunk F, an input-gradient
backward B and a weight-gradient backward W take one slot each, so a full (not split) backward
takes two slots (B then W) and DualPipe's overlapped forward-and-backward pair F&B three (F, B,
W: the first regime of results/pipeline_bubbles.md, F&B = F + B, where Table 2's formula holds
exactly). The simulated start times become a table of slots: in every slot every rank runs one
unit op or idles, so the executor (`parallel.pipeline.execute`) runs exactly the simulated
schedule and its idle slots per rank are the simulator's idle time and, at their maximum,
`bubble_formula(method, pp, F=1, B=2, W=1, FB=3)`.

Buffers. Each rank keeps four buffers of micro-batch-stage tensors, entries assigned statically
here (interval colouring over the slots, so each buffer has as many entries as its peak
occupancy): received activations (arrival to the forward that consumes them), received
input-gradients (arrival to the backward B), stored stage inputs (forward F to weight gradient W:
the activations Table 2 counts) and stored output-gradients (B to W).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import numpy as np

from dsv3_jax.analysis.timeline.engine import simulate
from dsv3_jax.analysis.timeline.pipeline import (PIPELINE_METHODS, PipelineResult,
                                                 bubble_formula, memory_formula,
                                                 pipeline_tasks, simulate_pipeline)

# Unit ops of a slot.
IDLE, FWD, BWD_INPUT, BWD_WEIGHT = 0, 1, 2, 3
OP_NAMES = ("idle", "F", "B", "W")
# Message kinds arriving after a slot.
NO_MESSAGE, ACTIVATION, GRADIENT = 0, 1, 2
# Chunk times of the slot table (Table 2's first regime: F&B = F + B).
UNIT_COSTS = dict(F=1.0, B=2.0, W=1.0, FB=3.0)
# Columns of `SlotTable.table` [slots, pp, len(FIELDS)] int32.
FIELDS = ("op", "direction", "micro_batch", "in_entry", "x_entry", "dy_entry",
          "recv_up", "recv_up_direction", "recv_up_micro_batch", "recv_up_entry",
          "recv_down", "recv_down_direction", "recv_down_micro_batch", "recv_down_entry")
COL = {f: i for i, f in enumerate(FIELDS)}


def min_micro_batches(method: str, pp: int) -> int:
  """The fewest micro-batches per step the schedule runs with.

  1F1B and ZB1P: pp (every stage busy in the steady state); DualPipe: 2 * pp, even (pp from
  each end, deepseek-ai/DualPipe).

  Raises:
    ValueError: an unknown method, pp < 2, or an odd pp for DualPipe.
  """
  if method not in PIPELINE_METHODS:
    raise ValueError(f"pipeline.schedule={method!r}; allowed: {PIPELINE_METHODS}")
  if not isinstance(pp, int) or isinstance(pp, bool) or pp < 2:
    raise ValueError(f"mesh.stages={pp!r}: a pipeline needs an integer >= 2")
  if method == "DualPipe":
    if pp % 2:
      raise ValueError(f"mesh.stages={pp}: DualPipe needs an even number of stages")
    return 2 * pp
  return pp


def check_micro_batches(method: str, pp: int, micro_batches: int) -> None:
  """Raises ValueError naming `pipeline.micro_batches` when the schedule cannot run with it."""
  need = min_micro_batches(method, pp)
  if (not isinstance(micro_batches, int) or isinstance(micro_batches, bool)
      or micro_batches < need or (method == "DualPipe" and micro_batches % 2)):
    even = " and even" if method == "DualPipe" else ""
    raise ValueError(f"pipeline.micro_batches={micro_batches!r}: {method} on {pp} stages needs "
                     f"an integer >= {need}{even}")


@dataclasses.dataclass(frozen=True)
class SlotTable:
  """A pipeline schedule as static slots: what every rank does in every slot.

  Attributes:
    method, pp, micro_batches: the schedule (`micro_batches` in total; DualPipe: half per
      direction).
    directions: 1 (1F1B, ZB1P) or 2 (DualPipe: direction 0 enters at rank 0, direction 1 at
      rank pp - 1; rank r holds stage r of direction 0 and stage pp - 1 - r of direction 1).
    table: [slots, pp, len(FIELDS)] int32, per slot and rank: the op (IDLE / FWD / BWD_INPUT /
      BWD_WEIGHT), its direction and micro-batch (index within the direction), the entries it
      reads or writes (`in_entry`: the received activation for FWD, the received gradient for
      BWD_INPUT; `x_entry`: stored stage input; `dy_entry`: stored output gradient), and the
      messages that arrive after the slot from rank r - 1 (`recv_up*`) and r + 1
      (`recv_down*`): kind (NO_MESSAGE / ACTIVATION / GRADIENT), direction, micro-batch, inbox
      entry.
    entries: buffer sizes (max over ranks of the peak occupancy): "act_in", "grad_in",
      "x", "dy".
    peak_per_rank: per buffer, the peak occupancy of each rank.
    simulated: the simulator's `PipelineResult` for the same schedule and unit costs.
  """

  method: str
  pp: int
  micro_batches: int
  directions: int
  table: np.ndarray
  entries: Dict[str, int]
  peak_per_rank: Dict[str, Tuple[int, ...]]
  simulated: PipelineResult

  @property
  def slots(self) -> int:
    return int(self.table.shape[0])

  @property
  def micro_batches_per_direction(self) -> int:
    return self.micro_batches // self.directions

  def idle_slots(self) -> Tuple[int, ...]:
    """Idle slots per rank in the table (the executor also counts them as it runs)."""
    return tuple(int(v) for v in np.sum(self.table[:, :, COL["op"]] == IDLE, axis=0))

  def formula_bubble(self) -> float:
    """Table 2's bubble for the slot costs (F = 1, B = 2, W = 1, F&B = 3 slots)."""
    c = UNIT_COSTS
    return bubble_formula(self.method, self.pp, c["F"], c["B"], c["W"], c["FB"])

  def formula_memory(self) -> Tuple[int, int]:
    """(parameter copies, activations) of Table 2 (`memory_formula`)."""
    return memory_formula(self.method, self.pp)

  def stage_of(self, direction: int, rank: int) -> int:
    """The model stage rank `rank` runs for `direction`."""
    return rank if direction == 0 else self.pp - 1 - rank


def _expand(kind: str, duration: float, parts: List[Tuple]) -> List[Tuple[int, Tuple]]:
  """A simulated task as its unit ops [(op, (kind, direction, micro_batch, stage))]."""
  if kind == "F":
    ops = [(FWD, parts[0])]
  elif kind == "W":
    ops = [(BWD_WEIGHT, parts[0])]
  elif kind == "B":
    ops = [(BWD_INPUT, parts[0])] + ([(BWD_WEIGHT, parts[0])] if duration == 2 else [])
  elif kind == "F&B":
    f, b = parts
    ops = [(FWD, f), (BWD_INPUT, b), (BWD_WEIGHT, b)]
  else:
    raise AssertionError(f"unknown pipeline op kind {kind!r}")
  if len(ops) != duration:
    raise AssertionError(f"{kind} lasts {duration} slots but expands to {len(ops)} unit ops")
  return ops


def _colour(items: List[Tuple[object, int, int]]) -> Tuple[Dict[object, int], int]:
  """Interval colouring: items (key, first, last) in half-slot times -> entry per key, entries.

  Greedy in order of first use (optimal for intervals: as many entries as the peak overlap).
  """
  ends: List[int] = []
  out: Dict[object, int] = {}
  for key, first, last in sorted(items, key=lambda it: (it[1], it[2])):
    for e, end in enumerate(ends):
      if end < first:
        ends[e] = last
        out[key] = e
        break
    else:
      out[key] = len(ends)
      ends.append(last)
  return out, len(ends)


def build_slot_table(method: str, pp: int, micro_batches: int) -> SlotTable:
  """The slot table of `method` on `pp` stages with `micro_batches` micro-batches.

  Args:
    method: "1F1B", "ZB1P" or "DualPipe" (`analysis.timeline.PIPELINE_METHODS`).
    pp: pipeline stages (mesh.stages), >= 2; even for DualPipe.
    micro_batches: micro-batches per step (pipeline.micro_batches), >= `min_micro_batches`.

  Returns:
    `SlotTable`.

  Raises:
    ValueError: naming the setting (pipeline.schedule, mesh.stages, pipeline.micro_batches).
  """
  check_micro_batches(method, pp, micro_batches)
  tasks, builder = pipeline_tasks(method, pp, micro_batches, **UNIT_COSTS)
  tl = simulate(tasks)
  parts_of: Dict[str, List[Tuple]] = {}
  for part, name in builder.alias.items():
    parts_of.setdefault(name, []).append(part)
  n_slots = int(round(tl.makespan))
  ops: Dict[Tuple[int, int], Tuple[int, int, int, int]] = {}  # (t, r) -> (op, d, m, stage)
  when: Dict[Tuple[int, int, int], int] = {}  # (op, d, m) on its stage's rank -> slot
  for iv in tl.intervals.values():
    r = int(iv.task.stream[len("rank"):])
    start = int(round(iv.start))
    if start != iv.start:
      raise AssertionError(f"{iv.task.name} starts at {iv.start}, not on a slot boundary")
    for i, (op, (_, d, m, s)) in enumerate(_expand(iv.task.kind, iv.task.duration,
                                                   parts_of[iv.task.name])):
      if (start + i, r) in ops:
        raise AssertionError(f"rank {r} runs two ops in slot {start + i}")
      ops[(start + i, r)] = (op, d, m, s)
      when[(op, d, m, s)] = start + i
  directions = 2 if method == "DualPipe" else 1
  t = np.zeros((n_slots, pp, len(FIELDS)), np.int32)
  items: Dict[str, List[List[Tuple]]] = {k: [[] for _ in range(pp)]
                                         for k in ("act_in", "grad_in", "x", "dy")}
  for (slot, r), (op, d, m, s) in ops.items():
    t[slot, r, COL["op"]], t[slot, r, COL["direction"]], t[slot, r, COL["micro_batch"]] = op, d, m
    if op == FWD:
      items["x"][r].append(((d, m), 2 * slot, 2 * when[(BWD_WEIGHT, d, m, s)]))
      if s < pp - 1:  # the activation goes to stage s + 1
        dest = r + 1 if d == 0 else r - 1
        use = when[(FWD, d, m, s + 1)]
        if use <= slot:
          raise AssertionError(f"F of micro-batch {m} stage {s + 1} runs before its input")
        items["act_in"][dest].append(((d, m), 2 * slot + 1, 2 * use))
        side = "recv_up" if dest == r + 1 else "recv_down"
        t[slot, dest, COL[side]] = ACTIVATION
        t[slot, dest, COL[side + "_direction"]], t[slot, dest, COL[side + "_micro_batch"]] = d, m
    elif op == BWD_INPUT:
      items["dy"][r].append(((d, m), 2 * slot, 2 * when[(BWD_WEIGHT, d, m, s)]))
      if s > 0:  # the input gradient goes to stage s - 1
        dest = r - 1 if d == 0 else r + 1
        use = when[(BWD_INPUT, d, m, s - 1)]
        if use <= slot:
          raise AssertionError(f"B of micro-batch {m} stage {s - 1} runs before its gradient")
        items["grad_in"][dest].append(((d, m), 2 * slot + 1, 2 * use))
        side = "recv_up" if dest == r + 1 else "recv_down"
        t[slot, dest, COL[side]] = GRADIENT
        t[slot, dest, COL[side + "_direction"]], t[slot, dest, COL[side + "_micro_batch"]] = d, m
  entries, peaks = {}, {}
  for buf, per_rank in items.items():
    sizes = []
    for r in range(pp):
      entry, n = _colour(per_rank[r])
      sizes.append(n)
      for (d, m), first, _ in per_rank[r]:
        e = entry[(d, m)]
        if buf == "x":
          slot = first // 2  # the forward writes it; B and W read it
          t[slot, r, COL["x_entry"]] = e
          for op in (BWD_INPUT, BWD_WEIGHT):
            t[when[(op, d, m, _stage(pp, d, r))], r, COL["x_entry"]] = e
        elif buf == "dy":
          t[first // 2, r, COL["dy_entry"]] = e
          t[when[(BWD_WEIGHT, d, m, _stage(pp, d, r))], r, COL["dy_entry"]] = e
        else:
          op = FWD if buf == "act_in" else BWD_INPUT
          side_slot = (first - 1) // 2
          side = _arrival_side(t, side_slot, r, d, m, ACTIVATION if buf == "act_in" else GRADIENT)
          t[side_slot, r, COL[side + "_entry"]] = e
          t[when[(op, d, m, _stage(pp, d, r))], r, COL["in_entry"]] = e
    entries[buf] = max(1, max(sizes))
    peaks[buf] = tuple(sizes)
  sim = simulate_pipeline(method, pp, micro_batches, **UNIT_COSTS)
  if abs(sim.makespan - n_slots) > 1e-9:
    raise AssertionError(f"slot table of {n_slots} slots, simulated makespan {sim.makespan}")
  return SlotTable(method=method, pp=pp, micro_batches=micro_batches, directions=directions,
                   table=t, entries=entries, peak_per_rank=peaks, simulated=sim)


def _stage(pp: int, d: int, r: int) -> int:
  return r if d == 0 else pp - 1 - r


def _arrival_side(t: np.ndarray, slot: int, r: int, d: int, m: int, kind: int) -> str:
  for side in ("recv_up", "recv_down"):
    if (t[slot, r, COL[side]] == kind and t[slot, r, COL[side + "_direction"]] == d
        and t[slot, r, COL[side + "_micro_batch"]] == m):
      return side
  raise AssertionError(f"no arrival of micro-batch {m} direction {d} at rank {r} slot {slot}")
