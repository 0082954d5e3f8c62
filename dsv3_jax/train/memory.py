"""Host memory of the training process: probes per phase and the glibc allocator settings.

On the emulated mesh every device is a slice of this one process's memory, so what `make train`
costs in resident memory is the device buffers (each replicated leaf 32 times), XLA's
compilations and the C allocator's retained free memory together. This module measures them
per phase (`PhaseLog`) and holds the allocator settings the entry point applies
(`configure_malloc`, `trim`).

glibc (Linux) details that matter here (see mallopt(3)):

* XLA:CPU runs the devices' programs on many threads; glibc gives each thread that contends
  for the heap its own arena (up to 8 x cores of them), and memory freed into an arena is kept
  by it. `M_ARENA_MAX` caps their number.
* Buffers above `M_MMAP_THRESHOLD` are mmapped and returned to the system when freed, but the
  threshold is dynamic by default: freeing an mmapped buffer raises it to that buffer's size
  (up to 32 MiB on 64-bit), after which buffers of that size come from the arenas and stay
  resident after they are freed. Setting the threshold explicitly turns that off.
* `malloc_trim(0)` returns the free memory of every arena to the system.

All of this changes where the allocator places memory, never a computed value.
Three settings, chosen by environment variables (experiments/train_memory.py compares them):

* default: `xla_flags` (XLA:CPU's memory-saving scheduler) and `trim` after compiling, glibc's
  allocator as it is: ~0.5 GiB lower peak than the library defaults at the same step time;
* `DSV3_LOW_MEMORY=1`: also `configure_malloc` (2 arenas, 1 MiB mmap threshold): another
  ~0.8 GiB lower peak, but the 32-device step runs ~1.2-1.35x slower (fewer arenas for XLA's
  threads and an mmap / munmap per large buffer), so it is not the default;
* `DSV3_MEMORY_DEFAULTS=1`: none of it (glibc's and XLA's defaults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import time
from typing import Optional

# mallopt(3) parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8

_libc: list = []
ENV = "DSV3_MEMORY_DEFAULTS"  # "1": glibc's and XLA's defaults (this module's settings off)


LOW_MEMORY_ENV = "DSV3_LOW_MEMORY"  # "1": `configure_malloc` too (smaller peak, slower steps)


def _enabled() -> bool:
  return os.environ.get(ENV, "") != "1"


def low_memory() -> bool:
  """Whether the entry points apply `configure_malloc` (DSV3_LOW_MEMORY=1 and not
  DSV3_MEMORY_DEFAULTS=1; module docstring)."""
  return _enabled() and os.environ.get(LOW_MEMORY_ENV, "") == "1"


def _glibc():
  """The C library if it is glibc (has mallopt and malloc_trim), else None."""
  if not _libc:
    lib = None
    try:
      cand = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
      if hasattr(cand, "mallopt") and hasattr(cand, "malloc_trim"):
        lib = cand
    except OSError:
      pass
    _libc.append(lib)
  return _libc[0]


def configure_malloc(arena_max: int = 2, mmap_threshold: int = 1 << 20) -> bool:
  """Caps glibc's arenas at `arena_max` and fixes the mmap threshold at `mmap_threshold` bytes
  (module docstring). Call it before jax is imported (its threads create the arenas). An
  environment variable the user set (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_) wins, and
  DSV3_MEMORY_DEFAULTS=1 skips both.

  Args:
    arena_max: arenas (>= 1); glibc's default is 8 per core.
    mmap_threshold: bytes (>= 0); allocations at least this large are mmapped and unmapped
      when freed.

  Returns:
    Whether the settings were applied (False off glibc, e.g. macOS, or with
    DSV3_MEMORY_DEFAULTS=1).

  Raises:
    ValueError: arena_max < 1 or mmap_threshold < 0.
  """
  if arena_max < 1:
    raise ValueError(f"arena_max must be >= 1, got {arena_max}")
  if mmap_threshold < 0:
    raise ValueError(f"mmap_threshold must be >= 0 bytes, got {mmap_threshold}")
  lib = _glibc()
  if lib is None or not _enabled():
    return False
  ok = True
  if "MALLOC_ARENA_MAX" not in os.environ:
    ok &= bool(lib.mallopt(M_ARENA_MAX, int(arena_max)))
  if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    ok &= bool(lib.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
  return ok


# XLA:CPU flags that change how the compiled programs' buffers are scheduled, never a value
# (experiments/train_memory.py measures them).
XLA_MEMORY_FLAGS: tuple[str, ...] = (
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
)


def xla_flags(current: str = "") -> str:
  """`current` (an XLA_FLAGS value) with each of `XLA_MEMORY_FLAGS` appended unless `current`
  already sets that flag; `current` unchanged with DSV3_MEMORY_DEFAULTS=1. Takes effect only
  when set before jax creates its CPU backend."""
  from dsv3_jax import xla_cpu  # does not import jax

  return xla_cpu.append_flags(current, XLA_MEMORY_FLAGS) if _enabled() else current


def trim() -> bool:
  """`malloc_trim(0)`: returns the allocator's free memory to the system; whether any was
  released (False off glibc or with DSV3_MEMORY_DEFAULTS=1)."""
  lib = _glibc()
  return bool(lib.malloc_trim(0)) if lib is not None and _enabled() else False


def process_memory() -> dict[str, Optional[int]]:
  """{"rss", "hwm"}: this process's resident set size now and its peak (VmRSS, VmHWM of
  /proc/self/status), bytes; None where /proc is missing."""
  out: dict[str, Optional[int]] = {"rss": None, "hwm": None}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(("VmRSS:", "VmHWM:")):
          key, value = line.split(":", 1)
          out["rss" if key == "VmRSS" else "hwm"] = int(value.split()[0]) * 1024
  except OSError:
    pass
  return out


def reset_peak() -> bool:
  """Resets VmHWM to the current RSS (writes 5 to /proc/self/clear_refs, Linux >= 4.0), so
  that the next reading's peak belongs to the phase that follows; whether it worked."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def live_array_bytes() -> int:
  """Bytes of the device buffers of every live jax.Array on this process's devices, each
  buffer counted once (a replicated array on 32 devices counts 32 times; the single-device
  arrays jax caches for a sharded array's shards share its buffers and are not counted again).
  """
  import jax

  seen, total = set(), 0
  for x in jax.live_arrays():
    try:
      for s in x.addressable_shards:
        key = (s.device.id, s.data.unsafe_buffer_pointer())
        if key not in seen:
          seen.add(key)
          total += s.data.nbytes
    except Exception:  # noqa: BLE001 -- an array deleted (donated) meanwhile
      pass
  return total


class _CompileCounter:
  """Counts XLA backend compilations (jax.monitoring's backend-compile event) and their
  seconds, from the first `PhaseLog.mark` on (one listener per process)."""

  def __init__(self):
    import jax

    self.count, self.seconds = 0, 0.0
    event = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT

    def listen(name, secs, **_):
      if name == event:
        self.count += 1
        self.seconds += secs

    jax.monitoring.register_event_duration_secs_listener(listen)


_counter: list = []


@dataclasses.dataclass
class Phase:
  """One phase's readings, summed over its occurrences (`count`): resident bytes at the end of
  its last occurrence (`rss`), the largest peak resident bytes during any occurrence (`peak`;
  the process's peak so far when VmHWM cannot be reset), live jax.Array bytes at the end of
  the last occurrence (`live`), XLA compilations and wall seconds over all occurrences."""

  name: str
  rss: Optional[int]
  peak: Optional[int]
  live: int
  compiles: int
  seconds: float
  count: int = 1


class PhaseLog:
  """Per-phase memory readings of a process: `mark(name)` closes the phase that ran since the
  previous mark (or the log's creation) and starts the next; a name marked again (every train
  step) accumulates into its first row.

      log = PhaseLog()   # may be created before jax is imported
      import jax ...
      log.mark("imports")

  Attributes:
    phases: the readings, in order of first occurrence.
    peak_resets: whether VmHWM could be reset between phases (else `peak` is cumulative).
  """

  def __init__(self, *, live: bool = True):
    self.live = live
    self.phases: list[Phase] = []
    self._by_name: dict[str, Phase] = {}
    self.peak_resets = reset_peak()
    self._t = time.perf_counter()
    self._compiles = _counter[0].count if _counter else 0

  def mark(self, name: str) -> Phase:
    """Closes the running phase as `name`; returns its (accumulated) row."""
    if not _counter:  # jax is imported by now: no compilation ran before this first mark
      _counter.append(_CompileCounter())
    mem = process_memory()
    counter = _counter[0]
    now = time.perf_counter()
    live = live_array_bytes() if self.live else 0
    compiles, seconds = counter.count - self._compiles, now - self._t
    phase = self._by_name.get(name)
    if phase is None:
      phase = Phase(name, mem["rss"], mem["hwm"], live, compiles, seconds)
      self._by_name[name] = phase
      self.phases.append(phase)
    else:
      peaks = [p for p in (phase.peak, mem["hwm"]) if p is not None]
      phase.rss, phase.live, phase.peak = mem["rss"], live, max(peaks) if peaks else None
      phase.compiles += compiles
      phase.seconds += seconds
      phase.count += 1
    self.peak_resets = reset_peak() and self.peak_resets
    self._t, self._compiles = time.perf_counter(), counter.count
    return phase

  def peak(self) -> Optional[int]:
    """The largest peak resident bytes over every phase (the run's peak from this log's
    creation)."""
    peaks = [p.peak for p in self.phases if p.peak is not None]
    return max(peaks) if peaks else None

  def rows(self) -> list[dict]:
    """The phases as JSON-ready dicts (bytes, seconds)."""
    return [dataclasses.asdict(p) for p in self.phases]
