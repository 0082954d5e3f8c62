"""The event-driven engine: tasks on FIFO streams, time advancing from completion to completion.

`simulate` runs tasks on streams (a compute stream, a communication stream, a pipeline rank...).
Each stream executes its tasks in submission order, one at a time, like a CUDA stream; a task starts
when it is at the head of its stream and all its dependencies have finished. Time advances from
completion event to completion event (a heap), so overlaps, stalls and bubbles come out of the
dependencies, not from formulas. Times are in any unit (the callers use seconds, or pipeline
chunk units).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
from typing import Dict, Iterable, List, Tuple


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
