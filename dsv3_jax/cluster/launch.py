"""A local multi-controller launcher: P processes x L devices, joined by `jax.distributed`.

One process can emulate at most 256 CPU devices that take part in collectives (XLA:CPU blocks
one intra-op thread per device in a collective and caps the pool at 256 threads; README, "More
than 256 devices"),
so larger emulated clusters run as several processes, each with L local CPU devices, joined by
`jax.distributed.initialize` and gloo CPU collectives: the multi-controller model of a real
multi-host cluster. The worker side (`worker_main`) is the same code a cluster would run on each
host; only how the processes are started (this module's `launch`, or a cluster scheduler
running `python -m dsv3_jax.cluster.launch worker ...` on every host) changes.

    result = launch("experiments.scale_2048_worker:moe_step", n_devices=2048, processes=32,
                    kwargs={"schedule": "two_hop"}, group_sizes=(256, 8))
    result.results[0]        # process 0's return value (a JSON-able dict)
    result.peak_rss_total    # bytes, sampled sum over the processes

CLI (runs a target and prints the per-process results as JSON):

    python -m dsv3_jax.cluster.launch run --devices 8 --processes 2 \
        --target tests/cluster/test_launch.py:two_hop_worker --kwargs '{}'

Limits it checks before starting anything (`check_layout`): P divides N, L <= 256, and gloo's
open files L x sum(group size - 1) + 50 (one socket per local device and peer of each
communicator, plus the runtime's own) under the process's open-file limit.

Gloo communicators: a multi-process program calls `warm_up_collectives(mesh)` before its first
step (one tiny psum per mesh axis, minor first, each behind a `barrier`), because a communicator
is created inside the first collective over its device group and gloo waits only ~30 s for the
group's members; and the launcher gives every worker a collective timeout
(`launch(..., collective_timeout_s=600)`, CLI `--collective-timeout`), so that a collective
that can never complete fails instead of hanging.

Source: limits of jax 0.10.2 on XLA:CPU with gloo, measured on this project's machine; the
runs they allow and the one that did not complete are in results/scale_2048.md.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import importlib
import importlib.util
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

MAX_LOCAL_DEVICES = 256  # XLA:CPU's intra-op thread cap (kMaxIntraOpThreads), jax 0.10.2
FD_OVERHEAD = 50  # open files of a jax process besides gloo's sockets (measured, jax 0.10.2)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"  # XLA:CPU DebugOptions, jaxlib 0.10.2
DEFAULT_COLLECTIVE_TIMEOUT_S = 600  # > the 428 s longest step measured at 2048 devices


# ----------------------------------------------------------------------------- layout


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


# ----------------------------------------------------------------------------- launcher


@dataclasses.dataclass
class LaunchResult:
  """What `launch` measured.

  results: each process's return value, by process id.
  peak_rss: [P] bytes, each process's peak resident set: the larger of the worker's own
    getrusage peak (when it wrote its result) and the launcher's samples.
  peak_rss_total: bytes, the largest sum of the processes' resident sets seen by the
    launcher's sampling (every `poll_s`); <= sum(peak_rss).
  wall_s: seconds from the first spawn to the last exit.
  log_dir: directory holding process_<i>.log (stdout + stderr of each process).
  layout: the checked `Layout`.
  rss_trace: [(seconds since the first spawn, summed resident bytes)], one per sample.
  """

  results: list
  peak_rss: list
  peak_rss_total: int
  wall_s: float
  log_dir: str
  layout: Layout
  rss_trace: list = dataclasses.field(default_factory=list)


class LaunchError(RuntimeError):
  """A worker failed, the job timed out or ran out of its memory limit; the message carries
  the relevant log's tail, `rss_trace` the memory samples taken until then (as in
  `LaunchResult`)."""

  rss_trace: list = []


def _error(trace: list, message: str) -> LaunchError:
  err = LaunchError(message)
  err.rss_trace = list(trace)
  return err


def _signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return str(signum)


def _rss_bytes(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _tail(path: str, n: int = 4000) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      f.seek(max(0, size - n))
      return f.read().decode(errors="replace")
  except OSError:
    return ""


def _die_with_launcher() -> None:
  """In a worker started by `launch`: get SIGKILL when the launcher dies (Linux
  PR_SET_PDEATHSIG), and exit at once if it is already gone."""
  parent = os.environ.get("DSV3_LAUNCHER_PID")
  if not parent:
    return
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() != int(parent):
    os._exit(1)


def launch(target: str, n_devices: int, processes: int, kwargs: Optional[dict] = None, *,
           group_sizes: Sequence[int] = (), timeout_s: float = 900.0,
           log_dir: Optional[str] = None, echo: bool = False, poll_s: float = 0.5,
           env: Optional[dict] = None, python: str = sys.executable,
           init_timeout_s: int = 600, heartbeat_timeout_s: int = 600,
           share_binary: bool = True,
           max_local_devices: int = MAX_LOCAL_DEVICES,
           spare_devices: int = 0,
           max_rss_bytes: Optional[int] = None,
           collective_timeout_s: Optional[int] = DEFAULT_COLLECTIVE_TIMEOUT_S) -> LaunchResult:
  """Runs `target(**kwargs)` in P local processes that form one N-device JAX cluster.

  Each process emulates L = N / P CPU devices, selects gloo CPU collectives and joins the
  cluster with `jax.distributed.initialize(coordinator_address="127.0.0.1:<free port>", ...)`
  (generous timeouts: gloo's first connections are slow at scale), then calls the target,
  which sees all N devices in `jax.devices()` and its own L in `jax.local_devices()`. With
  `share_binary`, process 0 compiles each program and the others load its executable through
  the coordinator's key-value store (`jax_share_binary_between_hosts`): P processes do not
  compete for the CPU compiling the same program. The processes share one process group; on the
  first failure, on timeout, on an exception or signal in the launcher, the whole group is
  killed (SIGKILL), and each child also dies if the launcher dies (PR_SET_PDEATHSIG).

  Args:
    target: "package.module:function" or "path/to/file.py:function"; the function takes
      keyword arguments and returns something `json.dumps` accepts.
    n_devices: N, total devices.
    processes: P (1 runs a single process without jax.distributed).
    kwargs: keyword arguments for the target (JSON-serialisable).
    group_sizes: replica-group sizes of the program's collectives, for the open-file check.
    timeout_s: wall-clock limit for the whole job, seconds.
    log_dir: where process_<i>.log and the result files go (default: a new temp directory).
    echo: copy process 0's output lines to this process's stdout as they arrive (without
      gloo's per-connection "[Gloo] Rank ..." lines).
    poll_s: seconds between liveness / memory samples.
    env: extra environment variables for the workers.
    python: interpreter for the workers.
    init_timeout_s, heartbeat_timeout_s: `jax.distributed.initialize` timeouts, seconds.
    share_binary: compile once in process 0 and share the executable (see above).
    max_local_devices: devices allowed per process; raise it only for programs that are
      compiled and not executed (compiling any device count in one process works).
    spare_devices: extra CPU devices each process emulates beyond its L, which the program
      does not use (build the mesh from `cluster_devices`). XLA:CPU sizes a process's thread
      pools by its device count (~2 threads per emulated device, measured) and a device
      blocked in a collective holds a pool thread, so spare devices give headroom against
      pool starvation; they join no collective and open no socket. Measured: they do not cure
      the hang of the 2048-device step on 32 processes x 64 devices (results/scale_2048.md).
    max_rss_bytes: kill the job when the sampled resident memory summed over the workers
      exceeds this (None: no limit).
    collective_timeout_s: with P > 1, seconds a device may wait in one collective (including
      the creation of its gloo communicator) before the collective fails with an error: XLA's
      `--xla_cpu_collective_timeout_seconds`, set in each worker's XLA_FLAGS (replacing one
      given in `env`). A hang then ends as a worker error, which stops the job, instead of
      idling until `timeout_s` (e.g. members of a group reaching its first collective > 30 s
      apart; `warm_up_collectives`). The default, 600 s, is above the longest step measured
      at 2048 devices (428 s, every collective of it included); None keeps XLA's default.

  Returns:
    `LaunchResult`.

  Raises:
    ValueError: an invalid layout (`check_layout`) or a bad target string.
    LaunchError: a worker exited non-zero, the job ran past `timeout_s` or its memory past
      `max_rss_bytes` (the processes are killed first; the message says which and ends with
      the tail of the relevant log).
  """
  layout = check_layout(n_devices, processes, group_sizes, max_local_devices=max_local_devices)
  if collective_timeout_s is not None and (
      not isinstance(collective_timeout_s, int) or isinstance(collective_timeout_s, bool)
      or collective_timeout_s < 1):
    raise ValueError(f"launch: collective_timeout_s={collective_timeout_s!r} must be a "
                     "positive integer (seconds) or None (XLA's default)")
  if not isinstance(spare_devices, int) or spare_devices < 0 or (
      processes > 1 and layout.local_devices + spare_devices > MAX_LOCAL_DEVICES):
    raise ValueError(f"launch: spare_devices={spare_devices!r} must be an integer >= 0 with "
                     f"local devices {layout.local_devices} + spare_devices <= "
                     f"{MAX_LOCAL_DEVICES}")
  if ":" not in target:
    raise ValueError(f"launch: target={target!r} must be 'module:function' or "
                     "'file.py:function'")
  kwargs = {} if kwargs is None else kwargs
  json.dumps(kwargs)  # fail early on unserialisable arguments
  log_dir = log_dir or tempfile.mkdtemp(prefix="dsv3_launch_")
  os.makedirs(log_dir, exist_ok=True)
  port = free_port()
  child_env = dict(os.environ)
  child_env["PYTHONPATH"] = os.pathsep.join(
      [_REPO_ROOT] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p])
  child_env["PYTHONUNBUFFERED"] = "1"
  child_env["DSV3_LAUNCHER_PID"] = str(os.getpid())
  child_env.update(env or {})
  procs: list[subprocess.Popen] = []
  logs = []
  pgid = None
  start = time.time()
  previous = {}

  def kill_all(*_):
    if pgid is not None:
      try:
        os.killpg(pgid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    for p in procs:
      if p.poll() is None:
        try:
          p.kill()
        except ProcessLookupError:
          pass
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        pass

  def on_signal(signum, frame):
    kill_all()
    raise KeyboardInterrupt(f"launch: signal {signum}; workers killed")

  for sig in (signal.SIGINT, signal.SIGTERM):
    try:
      previous[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread
      pass
  peak_total = 0
  echo_pos = 0
  try:
    peak_each = [0] * processes
    trace = []
    for i in range(processes):
      cmd = [python, "-m", "dsv3_jax.cluster.launch", "worker", "--target", target,
             "--kwargs", json.dumps(kwargs), "--result", os.path.join(log_dir, f"result_{i}.json"),
             "--cpu-devices", str(layout.local_devices + spare_devices)]
      if processes > 1:
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                "--process-id", str(i), "--init-timeout", str(init_timeout_s),
                "--heartbeat-timeout", str(heartbeat_timeout_s)]
        if share_binary:
          cmd += ["--share-binary"]
        if collective_timeout_s is not None:
          cmd += ["--collective-timeout", str(collective_timeout_s)]
      log = open(os.path.join(log_dir, f"process_{i}.log"), "wb")
      logs.append(log)
      log.write((" ".join(shlex.quote(c) for c in cmd) + "\n").encode())
      log.flush()
      p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                           cwd=_REPO_ROOT, process_group=0 if pgid is None else pgid)
      procs.append(p)
      if pgid is None:
        pgid = p.pid
    while True:
      codes = [p.poll() for p in procs]
      now = [_rss_bytes(p.pid) if c is None else 0 for p, c in zip(procs, codes)]
      peak_each = [max(a, b) for a, b in zip(peak_each, now)]
      peak_total = max(peak_total, sum(now))
      trace.append((round(time.time() - start, 2), sum(now)))
      if echo:
        with open(os.path.join(log_dir, "process_0.log"), "rb") as f:
          f.seek(echo_pos)
          chunk = f.read()
        chunk = chunk[:chunk.rfind(b"\n") + 1]  # whole lines only
        if chunk:
          echo_pos += len(chunk)
          lines = chunk.decode(errors="replace").splitlines(keepends=True)
          sys.stdout.write("".join(l for l in lines if not l.startswith("[Gloo]")))
          sys.stdout.flush()
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        # The cause first: a worker killed by a signal (its peers then fail on the closed
        # connections of their collectives, often within the same poll interval), else the
        # lowest process id.
        i, c = min(failed, key=lambda f: (f[1] > 0, f[0]))
        found = time.time()
        kill_all()
        how = (f"was killed by signal {_signal_name(-c)}" if c < 0 else
               f"exited with code {c}")
        also = "".join(f"; process {j} exited with code {cj} too" if cj > 0 else
                       f"; process {j} was killed by signal {_signal_name(-cj)} too"
                       for j, cj in failed if j != i)
        raise _error(trace,
            f"launch: process {i} of {processes} (pid {procs[i].pid}) {how} after "
            f"{found - start:.1f} s{also}; all workers killed {time.time() - found:.1f} s later "
            f"(found within --poll {poll_s} s). Log "
            f"{os.path.join(log_dir, f'process_{i}.log')} ends with:\n"
            f"{_tail(os.path.join(log_dir, f'process_{i}.log'))}")
      if all(c == 0 for c in codes):
        break
      if max_rss_bytes is not None and sum(now) > max_rss_bytes:
        kill_all()
        raise _error(trace,
            f"launch: the workers' resident memory reached {sum(now) / 2**30:.2f} GiB after "
            f"{time.time() - start:.1f} s, over max_rss_bytes = {max_rss_bytes / 2**30:.2f} "
            f"GiB; all workers killed. Log {os.path.join(log_dir, 'process_0.log')} ends "
            f"with:\n{_tail(os.path.join(log_dir, 'process_0.log'))}")
      if time.time() - start > timeout_s:
        done = [i for i, c in enumerate(codes) if c == 0]
        kill_all()
        raise _error(trace,
            f"launch: timeout after {timeout_s:.0f} s ({len(done)} of {processes} processes had "
            f"finished); all workers killed. Log {os.path.join(log_dir, 'process_0.log')} ends "
            f"with:\n{_tail(os.path.join(log_dir, 'process_0.log'))}")
      time.sleep(poll_s)
    wall = time.time() - start
  except BaseException:
    kill_all()
    raise
  finally:
    for log in logs:
      log.close()
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  results, rss, _ = _read_result_files(log_dir, processes)
  rss = [max(x, peak_each[i]) for i, x in enumerate(rss)]
  return LaunchResult(results, rss, int(peak_total), wall, log_dir, layout, trace)


def _read_result_files(log_dir: str, processes: int) -> tuple[list, list, list]:
  """(return values, peak RSS bytes, wall seconds) from result_<i>.json of every process."""
  results, rss, walls = [], [], []
  for i in range(processes):
    with open(os.path.join(log_dir, f"result_{i}.json")) as f:
      r = json.load(f)
    results.append(r["result"])
    rss.append(int(r["peak_rss"]))
    walls.append(float(r["wall_s"]))
  return results, rss, walls


def read_results(log_dir: str, group_sizes: Sequence[int] = ()) -> LaunchResult:
  """The `LaunchResult` of a finished launch, read back from its log directory.

  For a job whose workers all finished (every result_<i>.json written) but whose caller died
  before using the result (e.g. a later step of the same experiment failed): the directory
  `launch` printed or `LaunchResult.log_dir`. The launcher's own samples are gone, so
  `peak_rss` is each worker's getrusage peak, `peak_rss_total` their sum (an upper bound on
  the concurrent total), `wall_s` the longest worker's wall time (import to exit, without the
  spawn) and `rss_trace` empty.

  Args:
    log_dir: the launch's directory (holds process_<i>.log and result_<i>.json).
    group_sizes: the job's collective group sizes, for the returned `layout`.

  Raises:
    FileNotFoundError: no result_0.json there, or a process's result missing (that process did
      not finish: nothing to read back).
  """
  files = [f for f in os.listdir(log_dir)
           if f.startswith("result_") and f.endswith(".json") and f[7:-5].isdigit()]
  if "result_0.json" not in files:
    raise FileNotFoundError(f"read_results: no result_0.json in {log_dir}")
  processes = len(files)
  results, rss, walls = _read_result_files(log_dir, processes)
  n = sum(int(r.get("local_devices", 0)) for r in results if isinstance(r, dict))
  layout = Layout(n, processes, tuple(group_sizes)) if n else None  # None: not recorded
  return LaunchResult(results, rss, int(sum(rss)), max(walls), log_dir, layout, [])


# ----------------------------------------------------------------------------- worker side


def _load_target(target: str) -> Callable[..., Any]:
  module_name, _, fn_name = target.rpartition(":")
  if module_name.endswith(".py"):
    path = module_name if os.path.isabs(module_name) else os.path.join(os.getcwd(), module_name)
    spec = importlib.util.spec_from_file_location(
        "_dsv3_launch_target_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    module = importlib.import_module(module_name)
  try:
    return getattr(module, fn_name)
  except AttributeError:
    raise ValueError(f"launch: {module_name} has no function {fn_name!r}") from None


def barrier(name: str, timeout_s: float = 600.0) -> None:
  """Waits until every process reaches `name`, through the coordination service (a
  key-value-store barrier, not a device collective: no gloo communicator over all devices is
  formed). A no-op in a single process.

  Raises:
    RuntimeError (from the runtime): the barrier timed out or a process died.
  """
  from jax._src import distributed

  client = distributed.global_state.client
  if client is not None:
    client.wait_at_barrier(name, int(timeout_s * 1000))


_WARM_UP_CALLS = [0]  # distinct barrier names per call (every process calls in the same order)


def warm_up_collectives(mesh, timeout_s: float = 600.0, axes: Optional[Sequence] = None,
                        log: Optional[Callable[[str], None]] = None) -> dict[str, float]:
  """Creates every gloo communicator of `mesh` up front: one tiny psum per mesh axis, minor
  axis first, each as its own jitted program started behind a cross-process `barrier`.

  Why: XLA:CPU creates a gloo communicator lazily, inside the first collective that uses its
  device group, and caches it per group; gloo's rendezvous then waits its fixed default ~30 s
  for the other members' addresses (XLA:CPU does not change it). Members of one group that reach
  their first collective more than ~30 s apart fail (the early ones: "Gloo context
  initialization failed: DEADLINE_EXCEEDED ... GetKeyValue() timed out ... 30s") or block until
  the collective timeout (the late ones): the job hangs. In a real step the members of a small
  group reach it at very different times because a large group's connection setup precedes it
  (at 2048 devices, 32 processes x 64, the 256-member `node` groups take ~200 s to connect and
  the 8-member `gpu` groups' first all-reduce then times out). Measured (jax 0.10.2, 2
  processes x 4 devices, a step of psum over `gpu` then over `node`, under load): with one
  device of each process 40 s late (a host callback), the job hangs (idle until the launcher's
  100 s timeout; with a 10 s collective timeout it fails after 58 s with the DEADLINE_EXCEEDED
  error above); 25 s late runs; 40 s late after this warm-up runs (the step waits 40 s; the
  warm-up took 0.02 s per axis). With a whole process 40 s late, its peer fails after 30 s
  with the same error. At 2048 devices with the warm-up, the two_hop MoE step executed:
  communicators 8.4 s (`gpu`) + 401 s (`node`), steps 609 s and 565 s (32 processes x 64;
  results/scale_2048.md; tests/cluster/test_collective_warmup.py). Once created, a communicator is reused by every
  collective kind (psum, all_gather, all_to_all, ...) over the same device group, so later
  skew between members only costs waiting, bounded by the launcher's collective timeout
  (`launch(..., collective_timeout_s=...)`).

  Each axis's program is compiled before its barrier (compile time, which differs between
  processes, does not count against gloo's 30 s), then every process starts it at once. Minor
  axis first (e.g. `gpu`, then `node`, then `replica` for a ('replica', 'node', 'gpu') mesh):
  the small intra-node groups connect in seconds before the large ones. Groups that span
  several axes at once (a psum over ('node', 'gpu')) are separate communicators: pass them in
  `axes` as tuples if a program uses them.

  Cost: one float32 per device per axis (negligible bytes), one small compile per axis, plus
  the connection setup itself, which the first step would pay anyway (6.6 s + 204 s at 2048
  devices; 0.02 s per axis on 2 processes x 4 devices).

  Args:
    mesh: a `jax.sharding.Mesh` over the cluster's devices (e.g. `make_mesh(...,
      devices=cluster_devices(n))`).
    timeout_s: seconds each barrier waits for the other processes.
    axes: axis names (or tuples of names, one communicator per tuple) to warm up, in order;
      default: every axis of size > 1, minor (last) axis first.
    log: called with one line per axis (default: `logging.info` of this module's logger).

  Returns:
    {axis name (tuple names joined by "+"): seconds from the barrier to the psum's result on
    this process}; {} in a single process (no gloo) or when every axis has size 1.

  Raises:
    ValueError: an axis name not in the mesh.
    RuntimeError: a barrier timed out (from the runtime), or a psum returned the wrong sum.
  """
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  names = tuple(mesh.axis_names)
  if axes is None:
    axes = [a for a in reversed(names) if mesh.shape[a] > 1]
  groups = [tuple(a) if isinstance(a, (tuple, list)) else (a,) for a in axes]
  for g in groups:
    bad = [a for a in g if a not in names]
    if bad:
      raise ValueError(f"warm_up_collectives: axes {bad} are not mesh axes; allowed: "
                       f"{list(names)}")
  if jax.process_count() == 1:
    return {}
  if log is None:
    import logging

    log = logging.getLogger(__name__).info
  _WARM_UP_CALLS[0] += 1
  call = _WARM_UP_CALLS[0]
  spec = P(*names)  # one element per device
  sharding = NamedSharding(mesh, spec)
  shape = mesh.devices.shape
  ones = np.ones(shape, np.float32)
  x = jax.make_array_from_callback(shape, sharding, lambda idx: ones[idx])
  seconds = {}
  for g in groups:
    axis = g[0] if len(g) == 1 else g
    compiled = jax.jit(jax.shard_map(lambda v, axis=axis: jax.lax.psum(v, axis), mesh=mesh,
                                     in_specs=spec, out_specs=spec)).lower(x).compile()
    key = "+".join(g)
    barrier(f"warm_up_collectives_{call}_{key}", timeout_s)
    t0 = time.perf_counter()
    y = jax.block_until_ready(compiled(x))
    seconds[key] = time.perf_counter() - t0
    want = float(np.prod([mesh.shape[a] for a in g]))
    got = [float(np.asarray(s.data).reshape(-1)[0]) for s in y.addressable_shards]
    if any(v != want for v in got):
      raise RuntimeError(f"warm_up_collectives: psum over {key} gave {sorted(set(got))}, "
                         f"expected {want}")
    log(f"[process {jax.process_index()}] warm-up of the {key} communicators "
        f"({want:.0f} members each): {seconds[key]:.2f} s")
  return seconds


def cluster_devices(n_devices: int) -> list:
  """The devices a program of `n_devices` runs on: the first N / P local devices of each of the
  P processes, process 0's first (with `launch(..., spare_devices=S)` each process emulates
  N / P + S devices, the S spare ones unused). In one process: `jax.devices()[:n_devices]`.

  Raises:
    ValueError: the processes hold fewer than n_devices devices or N is not divisible by P.
  """
  import jax

  procs = jax.process_count()
  if n_devices % procs:
    raise ValueError(f"cluster_devices: n_devices={n_devices} is not divisible by the "
                     f"{procs} processes")
  per = n_devices // procs
  by_process = {}
  for d in sorted(jax.devices(), key=lambda d: d.id):
    by_process.setdefault(d.process_index, []).append(d)
  if any(len(by_process.get(i, [])) < per for i in range(procs)):
    raise ValueError(f"cluster_devices: n_devices={n_devices} needs {per} devices on each of "
                     f"{procs} processes, have "
                     f"{[len(by_process.get(i, [])) for i in range(procs)]}")
  return [d for i in range(procs) for d in by_process[i][:per]]


def trim_memory() -> None:
  """Returns freed heap pages to the OS (glibc `malloc_trim(0)`; ~300 MB per process after
  compiling at 2048 devices, measured with jax 0.10.2). No-op where glibc is missing."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def peak_rss_bytes() -> int:
  """This process's peak resident set size, bytes (getrusage; Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _same_cache_key_on_every_process() -> None:
  """Makes the compilation-cache key of a multi-process CPU program the same on every process.

  jax 0.10.2 hashes `get_topology_for_devices(devices).fingerprint()` into the key; on XLA:CPU
  that fingerprint differs between the processes of one cluster (measured: 2 processes x 4
  devices, same program, different `accelerator_config` hashes), so with
  `jax_share_binary_between_hosts` the other processes wait forever for a key process 0 never
  writes. jax's own fallback, `cache_key._hash_devices` (each device's kind), is the same on
  every process; the device assignment itself is already hashed with the compile options.
  """
  from jax._src import cache_key

  cache_key._hash_accelerator_config = cache_key._hash_devices


def worker_main(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point of one worker process (`python -m dsv3_jax.cluster.launch worker ...`).

  Sets the emulated CPU device count (`--cpu-devices`, before jax is imported), selects gloo
  collectives, joins the cluster (`--coordinator/--num-processes/--process-id`; each falls back
  to DSV3_COORDINATOR / DSV3_NUM_PROCESSES / DSV3_PROCESS_ID, and with none of them and
  `--num-processes` > 1 jax's own cluster detection, e.g. SLURM, is used), runs the target and
  writes {"result", "peak_rss", "process_id", "wall_s"} as JSON to `--result`. On a real
  multi-host cluster, run this on every host without `--cpu-devices`.
  """
  ap = argparse.ArgumentParser(prog="python -m dsv3_jax.cluster.launch worker")
  ap.add_argument("--target", required=True)
  ap.add_argument("--kwargs", default="{}")
  ap.add_argument("--result", required=True)
  ap.add_argument("--cpu-devices", type=int, default=0,
                  help="emulate this many CPU devices in this process (0: real devices)")
  ap.add_argument("--coordinator", default=os.environ.get("DSV3_COORDINATOR"))
  ap.add_argument("--num-processes", type=int,
                  default=int(os.environ.get("DSV3_NUM_PROCESSES", "1")))
  ap.add_argument("--process-id", type=int,
                  default=int(os.environ["DSV3_PROCESS_ID"]) if "DSV3_PROCESS_ID" in os.environ
                  else None)
  ap.add_argument("--init-timeout", type=int, default=600)
  ap.add_argument("--heartbeat-timeout", type=int, default=600)
  ap.add_argument("--share-binary", action="store_true")
  ap.add_argument("--collective-timeout", type=int, default=0,
                  help="seconds before a waiting collective fails (XLA's "
                  f"{_TIMEOUT_FLAG}); 0: XLA's default")
  a = ap.parse_args(argv)
  t0 = time.time()
  _die_with_launcher()
  if a.cpu_devices:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith(_DEVICE_FLAG))
    os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={a.cpu_devices}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if a.collective_timeout > 0:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith(_TIMEOUT_FLAG))
    os.environ["XLA_FLAGS"] = f"{flags} {_TIMEOUT_FLAG}={a.collective_timeout}".strip()
  import jax

  if a.num_processes > 1:
    if a.cpu_devices:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if a.share_binary:
      jax.config.update("jax_compilation_cache_dir",
                        os.path.join(os.path.dirname(os.path.abspath(a.result)), "jax_cache"))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
      jax.config.update("jax_share_binary_between_hosts", True)
      if a.cpu_devices:
        _same_cache_key_on_every_process()
    jax.distributed.initialize(coordinator_address=a.coordinator,
                               num_processes=a.num_processes, process_id=a.process_id,
                               initialization_timeout=a.init_timeout,
                               heartbeat_timeout_seconds=a.heartbeat_timeout)
  try:
    fn = _load_target(a.target)
    result = fn(**json.loads(a.kwargs))
  except BaseException:
    # Exit now: a normal exit would run jax.distributed's shutdown, which waits (up to its
    # shutdown timeout) for the peers at a barrier they may never reach.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  out = dict(result=result, peak_rss=peak_rss_bytes(), process_id=jax.process_index(),
             wall_s=time.time() - t0)
  tmp = a.result + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f)
  os.replace(tmp, a.result)
  if a.num_processes > 1:
    jax.distributed.shutdown()


def main(argv: Optional[Sequence[str]] = None) -> None:
  """CLI: `worker ...` (one process, see `worker_main`) or `run ...` (launch and print)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "worker":
    worker_main(argv[1:])
    return
  if argv and argv[0] == "run":
    argv = argv[1:]
  ap = argparse.ArgumentParser(prog="python -m dsv3_jax.cluster.launch run",
                               description="Run module:function on P local processes x L "
                               "emulated CPU devices joined by jax.distributed + gloo.")
  ap.add_argument("--target", required=True, help="module:function or file.py:function")
  ap.add_argument("--devices", type=int, required=True, help="N, total devices")
  ap.add_argument("--processes", type=int, required=True, help="P (N / P devices each)")
  ap.add_argument("--kwargs", default="{}", help="JSON keyword arguments for the target")
  ap.add_argument("--group-sizes", default="", help="comma-separated collective group sizes "
                  "(for the open-file check)")
  ap.add_argument("--timeout", type=float, default=900.0, help="seconds")
  ap.add_argument("--log-dir", default=None)
  ap.add_argument("--echo", action="store_true", help="stream process 0's output")
  ap.add_argument("--collective-timeout", type=int, default=DEFAULT_COLLECTIVE_TIMEOUT_S,
                  help="seconds a device may wait in one collective before it fails (P > 1; "
                  f"XLA's {_TIMEOUT_FLAG}); 0: XLA's default")
  a = ap.parse_args(argv)
  groups = tuple(int(g) for g in a.group_sizes.split(",") if g)
  r = launch(a.target, a.devices, a.processes, json.loads(a.kwargs), group_sizes=groups,
             timeout_s=a.timeout, log_dir=a.log_dir, echo=a.echo,
             collective_timeout_s=a.collective_timeout or None)
  print(json.dumps(dict(results=r.results, peak_rss=r.peak_rss, peak_rss_total=r.peak_rss_total,
                        wall_s=r.wall_s, log_dir=r.log_dir), indent=1))


if __name__ == "__main__":
  main()
