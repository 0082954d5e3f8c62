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

Layout checks: `dsv3_jax.cluster.layout`; the worker side: `dsv3_jax.cluster.worker` (both
re-exported here).

Source: limits of jax 0.10.2 on XLA:CPU with gloo, measured on this project's machine; the
runs they allow and the one that did not complete are in results/scale_2048.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from dsv3_jax.cluster.layout import (FD_OVERHEAD, MAX_LOCAL_DEVICES, Layout,  # noqa: F401
                                     check_layout, estimate_open_files, free_port,
                                     min_processes, open_file_limit)
# The worker side lives in cluster/worker.py; its public names are part of this module's API.
from dsv3_jax.cluster.worker import (_DEVICE_FLAG, _TIMEOUT_FLAG, barrier,  # noqa: F401
                                     cluster_devices, peak_rss_bytes, trim_memory,
                                     warm_up_collectives, worker_main)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_COLLECTIVE_TIMEOUT_S = 600  # > the 428 s longest step measured at 2048 devices


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
