"""A request stream through the serving engine: Poisson arrivals, TTFT / TPOT, occupancy.

The SLO view of serving (Insights §2.3, V3 report §3.4): requests arrive at random times, join
the continuous batch, and each one experiences a time to first token (TTFT: arrival -> its
first token) and a time per output token (TPOT: first -> last token, per token after the first).

Time. The stream is replayed on a virtual clock driven by measured step durations: the engine
runs its steps back to back (no sleeping), every `Engine.step` advances the clock by the
wall-clock time it took, and a request is submitted at the first step boundary at or after its
arrival (when the engine is idle the clock jumps to the next arrival). Tokens produced by a
step are delivered when that step returns. So the figures are what a server doing exactly this
work on this machine would report, and a run takes only the compute time, whatever the load.

Prefill/decode disaggregation. In a colocated engine a step's prefill and decode run one after
the other on the same devices: the clock advances by the whole step. A disaggregated engine's
prefill and decode meshes are separate machines in the deployment it emulates, but one process
runs them one after the other here; with `concurrent_phases=True` the clock advances by
max(prefill + cache transfer, decode + host) of the step, the phases' durations taken from
`engine.timings` (measured, then composed as concurrent: say so when reporting).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["Request", "RequestRecord", "StreamResult", "poisson_requests", "run_stream"]


@dataclasses.dataclass(frozen=True)
class Request:
  """One request of a stream: arrival time (s from the start), prompt ids, tokens wanted."""

  arrival_s: float
  prompt: tuple
  max_new_tokens: int


@dataclasses.dataclass
class RequestRecord:
  """What one request experienced (times in seconds on the stream's clock)."""

  request_id: int
  arrival_s: float
  prompt_tokens: int
  first_token_s: Optional[float] = None
  finish_s: Optional[float] = None
  tokens: int = 0

  @property
  def ttft_s(self) -> float:
    """Arrival -> first token."""
    return self.first_token_s - self.arrival_s

  @property
  def tpot_s(self) -> Optional[float]:
    """(last token - first token) / (tokens - 1); None for a one-token completion."""
    if self.tokens < 2:
      return None
    return (self.finish_s - self.first_token_s) / (self.tokens - 1)


@dataclasses.dataclass
class StreamResult:
  """A replayed stream: per-request records and per-step samples.

  Attributes:
    records: one per request, in submission order.
    duration_s: clock time from the start to the last token.
    steps: engine steps run.
    occupancy: per step, the fraction of the cache pages in use after the step.
    counts: the engine's counters over the stream (`Engine.counts` delta).
  """

  records: list
  duration_s: float
  steps: int
  occupancy: list
  counts: dict

  def summary(self) -> dict:
    """p50 / p99 TTFT and TPOT (ms), output tokens/s, mean / max cache occupancy."""
    ttft = np.array([r.ttft_s for r in self.records]) * 1e3
    tpot = np.array([r.tpot_s for r in self.records if r.tpot_s is not None]) * 1e3
    pct = lambda a, q: float(np.percentile(a, q)) if a.size else float("nan")
    tokens = sum(r.tokens for r in self.records)
    return {
        "requests": len(self.records),
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
        "output_tokens": tokens,
        "throughput_tok_s": tokens / self.duration_s if self.duration_s > 0 else float("nan"),
        "occupancy_mean": float(np.mean(self.occupancy)) if self.occupancy else 0.0,
        "occupancy_max": float(np.max(self.occupancy)) if self.occupancy else 0.0,
        "steps": self.steps,
        "duration_s": self.duration_s,
    }


def poisson_requests(rate_per_s: float, n: int, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int, seed: int = 0) -> list[Request]:
  """`n` requests with exponential inter-arrival times of mean 1 / rate_per_s.

  Args:
    rate_per_s: mean arrivals per second (> 0).
    n: number of requests (>= 1).
    prompts: prompt id lists, used in turn (request i gets prompts[i % len(prompts)]).
    max_new_tokens: tokens each request asks for (>= 1).
    seed: numpy seed of the arrival times.

  Raises:
    ValueError: a non-positive rate, n < 1, no prompts or max_new_tokens < 1.
  """
  if not rate_per_s > 0:
    raise ValueError(f"rate_per_s must be > 0, got {rate_per_s!r}")
  if n < 1 or not prompts or max_new_tokens < 1:
    raise ValueError(f"need n >= 1 (got {n}), at least one prompt (got {len(prompts)}) and "
                     f"max_new_tokens >= 1 (got {max_new_tokens})")
  gaps = np.random.default_rng(seed).exponential(1.0 / rate_per_s, size=n)
  arrivals = np.cumsum(gaps) - gaps[0]  # the first request arrives at 0
  return [Request(float(a), tuple(int(t) for t in prompts[i % len(prompts)]), max_new_tokens)
          for i, a in enumerate(arrivals)]


def run_stream(engine, requests: Sequence[Request], *, concurrent_phases: bool = False,
               clock: Callable[[], float] = time.perf_counter) -> StreamResult:
  """Replays `requests` through `engine` on the measured-step clock (module docstring).

  Args:
    engine: an `Engine` (or `DisaggregatedEngine`) with no queued or running request.
    requests: the stream, sorted by arrival.
    concurrent_phases: compose each step's prefill and decode as concurrent (disaggregated
      serving) instead of sequential.
    clock: wall-clock source (seconds), injectable for tests.

  Returns:
    The `StreamResult`.

  Raises:
    ValueError: the engine already has work, or requests are not sorted by arrival; a request
      the engine refuses raises its own ValueError before the stream starts.
  """
  if engine.has_work():
    raise ValueError("run_stream needs an idle engine (it has queued or running requests)")
  arrivals = [r.arrival_s for r in requests]
  if arrivals != sorted(arrivals):
    raise ValueError("requests must be sorted by arrival_s")
  for i, r in enumerate(requests):  # every request is checked before the stream starts
    try:
      engine._check(list(r.prompt), r.max_new_tokens, _greedy(), ())
    except ValueError as e:
      raise ValueError(f"request {i}: {e}") from None
  total_pages = sum(a.num_pages for a in engine.allocators)
  counts0 = dict(engine.counts)
  now, steps, occupancy = 0.0, 0, []
  records: dict[int, RequestRecord] = {}
  order: list[int] = []
  pending = list(requests)[::-1]  # pop() takes the earliest
  while pending or engine.has_work():
    if not engine.has_work():
      now = max(now, pending[-1].arrival_s)
    while pending and pending[-1].arrival_s <= now:
      r = pending.pop()
      rid = engine.submit(list(r.prompt), max_new_tokens=r.max_new_tokens)
      records[rid] = RequestRecord(rid, r.arrival_s, len(r.prompt))
      order.append(rid)
    before = dict(engine.timings)
    t0 = clock()
    events = engine.step()
    took = clock() - t0
    if concurrent_phases:
      d = lambda k: engine.timings.get(k, 0.0) - before.get(k, 0.0)
      pre = d("prefill_s") + d("transfer_s")
      took = max(pre, took - pre)
    now += took
    steps += 1
    for ev in events:
      rec = records[ev.request_id]
      if rec.first_token_s is None:
        rec.first_token_s = now
      rec.tokens += 1
      if ev.finish_reason is not None:
        rec.finish_s = now
    occupancy.append(engine.pages_in_use() / total_pages)
  counts = {k: v - counts0.get(k, 0) for k, v in engine.counts.items()}
  return StreamResult([records[i] for i in order], now, steps, occupancy, counts)


def _greedy():
  from dsv3_jax.infer.sampling import SamplingParams
  return SamplingParams(0.0, 0, 1.0)
