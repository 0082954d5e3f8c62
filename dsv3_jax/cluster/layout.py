"""Process layouts of an emulated cluster: N devices as P processes of L, and their limits.

`check_layout` refuses, before anything starts, a layout that cannot run here: P not dividing N,
more than `MAX_LOCAL_DEVICES` devices in one process (XLA:CPU blocks one intra-op thread per
device in a collective and caps the pool at 256), or gloo's sockets, L x sum(group size - 1) +
`FD_OVERHEAD`, over the open-file limit. `min_processes` is the fewest processes that fit.

Source: limits of jax 0.10.2 on XLA:CPU with gloo, measured on this project's machine
(README, "More than 256 devices"; /work/shared/NOTES-2048.md).
"""

from __future__ import annotations

import dataclasses
import resource
import socket
from typing import Optional, Sequence

MAX_LOCAL_DEVICES = 256  # XLA:CPU's intra-op thread cap (kMaxIntraOpThreads), jax 0.10.2
FD_OVERHEAD = 50  # open files of a jax process besides gloo's sockets (measured, jax 0.10.2)


def open_file_limit() -> int:
  """This process's soft RLIMIT_NOFILE (children inherit it)."""
  return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def estimate_open_files(local_devices: int, group_sizes: Sequence[int]) -> int:
  """Open files one worker process needs for gloo collectives.

  Gloo connects every local device to each peer of every communicator (one per distinct
  replica-group partition the program uses), one socket each: L x sum(size - 1), plus
  `FD_OVERHEAD` for the runtime (measured on jax 0.10.2).

  Args:
    local_devices: L, devices per process.
    group_sizes: size of each distinct replica-group partition (e.g. (256, 8) for the `node`
      and `gpu` axes of a (256, 8) mesh; `hlo.group_sizes` reads them from a compiled program).

  Returns:
    The estimated number of open files per process.
  """
  return local_devices * sum(max(int(g) - 1, 0) for g in group_sizes) + FD_OVERHEAD


@dataclasses.dataclass(frozen=True)
class Layout:
  """N devices as P processes of L = N / P local devices each (process i holds devices
  i*L .. (i+1)*L - 1 of the global device list)."""

  n_devices: int
  processes: int
  group_sizes: tuple[int, ...] = ()

  @property
  def local_devices(self) -> int:
    return self.n_devices // self.processes

  @property
  def open_files(self) -> int:
    """Estimated open files per process (0 for one process: no gloo)."""
    if self.processes == 1:
      return 0
    return estimate_open_files(self.local_devices, self.group_sizes)


def check_layout(n_devices: int, processes: int, group_sizes: Sequence[int] = (),
                 fd_limit: Optional[int] = None,
                 max_local_devices: int = MAX_LOCAL_DEVICES) -> Layout:
  """Validates a process layout before anything is started.

  Args:
    n_devices: N, total emulated devices.
    processes: P, processes (N / P devices each).
    group_sizes: replica-group sizes of the program's distinct collectives (see
      `estimate_open_files`); () skips the open-file check.
    fd_limit: open-file limit per process (default: this process's soft RLIMIT_NOFILE).
    max_local_devices: devices per process that can block in a collective at once (256 on
      XLA:CPU).

  Returns:
    The `Layout`.

  Raises:
    ValueError: a non-positive count, N not divisible by P, more than `max_local_devices` per
      process, or an estimated open-file count over the limit (each message names the setting,
      its value and what would work).
  """
  for name, v in (("n_devices", n_devices), ("processes", processes)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"launch: {name} must be a positive integer, got {v!r}")
  if n_devices % processes:
    divisors = [p for p in range(1, n_devices + 1) if n_devices % p == 0]
    raise ValueError(f"launch: n_devices={n_devices} is not divisible by processes={processes};"
                     f" allowed processes: {divisors}")
  layout = Layout(n_devices, processes, tuple(int(g) for g in group_sizes))
  if layout.local_devices > max_local_devices:
    need = -(-n_devices // max_local_devices)
    raise ValueError(
        f"launch: {layout.local_devices} devices per process (n_devices={n_devices} / "
        f"processes={processes}) exceeds {max_local_devices}, the devices XLA:CPU can block in "
        f"one collective per process (its intra-op thread cap); use processes >= {need}")
  if processes > 1 and group_sizes:
    limit = open_file_limit() if fd_limit is None else fd_limit
    if layout.open_files > limit:
      fits = [p for p in range(processes, n_devices + 1)
              if n_devices % p == 0 and Layout(n_devices, p, layout.group_sizes).open_files
              <= limit]
      hint = (f"use processes >= {fits[0]}" if fits else
              "no process count fits: reduce the largest group (e.g. reduce hierarchically)")
      raise ValueError(
          f"launch: processes={processes} gives {layout.local_devices} devices per process; "
          f"gloo needs about {layout.local_devices} x sum(group size - 1 for group sizes "
          f"{list(layout.group_sizes)}) + {FD_OVERHEAD} = {layout.open_files} open files per "
          f"process, over the open-file limit {limit}; {hint}")
  return layout


def min_processes(n_devices: int, group_sizes: Sequence[int] = (),
                  fd_limit: Optional[int] = None) -> int:
  """The fewest processes `check_layout` accepts for N devices and these group sizes.

  Raises:
    ValueError: no divisor of n_devices gives a valid layout.
  """
  for p in range(1, n_devices + 1):
    if n_devices % p:
      continue
    try:
      check_layout(n_devices, p, group_sizes, fd_limit)
      return p
    except ValueError:
      continue
  raise ValueError(f"launch: no process count works for n_devices={n_devices} with group "
                   f"sizes {list(group_sizes)} (open-file limit "
                   f"{open_file_limit() if fd_limit is None else fd_limit})")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (for the coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
