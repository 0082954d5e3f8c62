"""The worker side of the multi-controller launcher: what each of the P processes runs.

`worker_main` (CLI: `python -m dsv3_jax.cluster.launch worker ...`) sets the process's emulated
device count and collective timeout, joins `jax.distributed` with gloo collectives, runs the
target and writes its result; a real cluster runs the same code on every host. Helpers a
multi-process program calls: `cluster_devices`, `barrier`, `warm_up_collectives` (create every
gloo communicator up front), `trim_memory`, `peak_rss_bytes`. The launching side (layout checks,
`launch`, `read_results`) is `dsv3_jax.cluster.launch`, which re-exports these names.

Source: limits of jax 0.10.2 on XLA:CPU with gloo, measured on this project's machine
(README, "More than 256 devices"; results/scale_2048.md).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import json
import os
import resource
import signal
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"  # XLA:CPU DebugOptions, jaxlib 0.10.2

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
                        log: Optional[Callable[[str], None]] = None,
                        whole_mesh: bool = False) -> dict[str, float]:
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
    whole_mesh: also, last, the group of all the mesh's devices (all axes as one tuple) when
      more than one axis has size > 1: the group of a collective over every axis (the flat
      all_to_all) and of `multihost_utils.process_allgather` of a mesh-sharded array. Off by
      default: at 2048 devices one communicator over all of them costs more than the
      per-axis ones together.

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
    if whole_mesh and len(axes) > 1:
      axes.append(names)
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
