"""The multi-controller launcher: a 2-process x 4-device two_hop dispatch equals the dense
reference; failures and timeouts kill every worker; impossible layouts are refused."""

import os
import sys
import time

import numpy as np
import pytest

from dsv3_jax.cluster import launch

THIS = os.path.abspath(__file__)


# ----------------------------------------------------------------------- worker targets
# Run inside the launched processes (imported there by file path); jax is imported lazily so
# that the worker has set its device count first.


def two_hop_worker(nodes: int, gpus: int, t_local: int, k: int, d: int, f: int) -> dict:
  """two_hop dispatch on the whole cluster; compares this process's output and input
  gradient shards with the single-device dense reference."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from dsv3_jax.model.experts import bind_experts
  from dsv3_jax.parallel import dispatch
  from dsv3_jax.parallel.mesh import make_mesh
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
  from moe_reference import moe_dense_reference

  n_dev = nodes * gpus
  e, t = n_dev, n_dev * t_local
  rng = np.random.default_rng(0)  # the same global inputs on every process
  x = rng.standard_normal((t, d)).astype(np.float32)
  idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
  w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
  wg, wu = (rng.standard_normal((e, d, f)).astype(np.float32) * 0.3 for _ in range(2))
  wd = rng.standard_normal((e, f, d)).astype(np.float32) * 0.3
  valid = np.ones((t,), bool)

  devices = launch.cluster_devices(n_dev)  # N / P local devices of each process, spares unused
  mesh = make_mesh(nodes, gpus, devices=devices)
  topo = dispatch.EPTopology(nodes, gpus)
  sched = dispatch.get_schedule("two_hop")
  cap = sched.worst_case_capacity(t_local, e, k, topo, nodes)
  tok = P(("node", "gpu"))
  stats_spec = dispatch.DispatchStats(*([P()] * len(dispatch.DispatchStats._fields)))
  fn = jax.shard_map(
      lambda x, idx, w, valid, wg, wu, wd: sched(x, idx, w, valid, bind_experts(wg, wu, wd),
                                                 capacity=cap, topo=topo, n_experts=e),
      mesh=mesh,
      in_specs=(tok,) * 7, out_specs=(tok, stats_spec))
  arrays = [jax.make_array_from_callback(a.shape, NamedSharding(mesh, tok),
                                         lambda i, a=a: a[i])
            for a in (x, idx, w, valid, wg, wu, wd)]
  y, st = jax.jit(fn)(*arrays)
  dx = jax.jit(jax.grad(lambda x, *r: jnp.sum(jnp.sin(fn(x, *r)[0]))))(*arrays)

  ref = moe_dense_reference(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w),
                            jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd))
  dref = jax.grad(lambda x: jnp.sum(jnp.sin(moe_dense_reference(
      x, jnp.asarray(idx), jnp.asarray(w), jnp.asarray(wg), jnp.asarray(wu),
      jnp.asarray(wd)))))(jnp.asarray(x))
  err = max(float(np.max(np.abs(np.asarray(s.data) - np.asarray(ref)[s.index])))
            for s in y.addressable_shards)
  derr = max(float(np.max(np.abs(np.asarray(s.data) - np.asarray(dref)[s.index])))
             for s in dx.addressable_shards)
  return dict(process=jax.process_index(), processes=jax.process_count(),
              devices=jax.device_count(), local=jax.local_device_count(),
              shards=len(y.addressable_shards), max_err=err, max_grad_err=derr,
              dropped=float(np.asarray(st.dropped.addressable_data(0))))


def fail_on_process_one() -> dict:
  import jax

  if jax.process_index() == 1:
    raise RuntimeError("deliberate failure on process 1")
  time.sleep(120)
  return {}


def sleep_forever() -> dict:
  time.sleep(120)
  return {}


# ----------------------------------------------------------------------- tests


def test_two_processes_run_two_hop_dispatch_equal_to_dense_reference(tmp_path):
  # Each process emulates 4 + 2 devices; the program runs on 4 of each.
  r = launch.launch(f"{THIS}:two_hop_worker", 8, 2,
                    dict(nodes=2, gpus=4, t_local=3, k=3, d=8, f=4),
                    group_sizes=(2, 4), timeout_s=120, log_dir=str(tmp_path), spare_devices=2)
  assert [x["process"] for x in r.results] == [0, 1]
  for x in r.results:
    # 12 emulated devices (6 per process), the program's arrays on 4 of each process's 6.
    assert (x["processes"], x["devices"], x["local"], x["shards"]) == (2, 12, 6, 4)
    assert x["max_err"] < 1e-5 and x["max_grad_err"] < 1e-5
    assert x["dropped"] == 0.0
  assert len(r.peak_rss) == 2 and all(b > 0 for b in r.peak_rss)
  assert 0 < r.peak_rss_total <= sum(r.peak_rss)
  # The same results read back from the finished launch's directory (a caller that died
  # after the run): the workers' own peaks, never above what the launcher recorded.
  back = launch.read_results(str(tmp_path), (2, 4))
  assert back.results == r.results
  assert all(0 < b <= a for a, b in zip(r.peak_rss, back.peak_rss))
  assert back.peak_rss_total == sum(back.peak_rss) and back.rss_trace == []
  assert 0 < back.wall_s <= r.wall_s


def test_read_results_needs_every_finished_process(tmp_path):
  with pytest.raises(FileNotFoundError, match="no result_0.json"):
    launch.read_results(str(tmp_path))
  (tmp_path / "result_0.json").write_text(
      '{"result": {"x": 1}, "peak_rss": 10, "process_id": 0, "wall_s": 2.0}')
  (tmp_path / "result_2.json").write_text(
      '{"result": {"x": 3}, "peak_rss": 30, "process_id": 2, "wall_s": 3.0}')
  with pytest.raises(FileNotFoundError):  # process 1 never finished
    launch.read_results(str(tmp_path))
  (tmp_path / "result_1.json").write_text(
      '{"result": {"x": 2}, "peak_rss": 20, "process_id": 1, "wall_s": 1.0}')
  back = launch.read_results(str(tmp_path))
  assert [x["x"] for x in back.results] == [1, 2, 3]
  assert (back.peak_rss, back.peak_rss_total, back.wall_s) == ([10, 20, 30], 60, 3.0)


def _alive(pids):
  alive = []
  for pid in pids:
    try:
      os.kill(pid, 0)
      alive.append(pid)
    except ProcessLookupError:
      pass
  return alive


def _worker_pids(log_dir):
  pids = []
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/cmdline", "rb") as fh:
          cmd = fh.read().decode(errors="replace")
      except OSError:
        continue
      if str(log_dir) in cmd and "worker" in cmd:
        pids.append(int(name))
  return pids


def test_first_failure_kills_every_worker(tmp_path):
  t0 = time.time()
  with pytest.raises(launch.LaunchError, match=r"process 1 of 2 \(pid \d+\) exited with code 1") as e:
    launch.launch(f"{THIS}:fail_on_process_one", 8, 2, timeout_s=100, log_dir=str(tmp_path))
  assert "deliberate failure on process 1" in str(e.value)
  assert time.time() - t0 < 60  # process 0 (sleeping 120 s) was killed, not waited for
  assert not _alive(_worker_pids(tmp_path))


def test_a_worker_killed_with_sigkill_stops_every_process_naming_it(tmp_path):
  import signal
  import threading

  err = {}

  def run():
    try:
      launch.launch(f"{THIS}:sleep_forever", 4, 2, timeout_s=100, log_dir=str(tmp_path),
                    poll_s=0.2)
    except launch.LaunchError as e:
      err["e"], err["t"] = e, time.time()

  th = threading.Thread(target=run)
  th.start()
  deadline = time.time() + 60
  while len(_worker_pids(tmp_path)) < 2 and time.time() < deadline:
    time.sleep(0.2)
  pids = {int(open(f"/proc/{p}/cmdline").read().split("--process-id\0")[1].split("\0")[0]): p
          for p in _worker_pids(tmp_path)}
  assert sorted(pids) == [0, 1]
  killed_at = time.time()
  os.kill(pids[1], signal.SIGKILL)
  th.join(timeout=60)
  assert not th.is_alive() and "e" in err
  assert err["t"] - killed_at < 10  # bounded: a poll interval plus the kill of the others
  assert (f"process 1 of 2 (pid {pids[1]}) was killed by signal SIGKILL" in str(err["e"]))
  assert not _alive(list(pids.values()))


def test_timeout_kills_workers(tmp_path):
  with pytest.raises(launch.LaunchError, match="timeout after 3 s"):
    launch.launch(f"{THIS}:sleep_forever", 4, 1, timeout_s=3, log_dir=str(tmp_path))
  assert not _alive(_worker_pids(tmp_path))


def test_layouts_that_cannot_work_are_refused():
  with pytest.raises(ValueError, match=r"n_devices=2048 is not divisible by processes=3"):
    launch.check_layout(2048, 3)
  with pytest.raises(ValueError, match=r"512 devices per process .* exceeds 256.*processes >= 8"):
    launch.check_layout(2048, 4)
  # (256, 8) mesh, 16 processes: 128 x (255 + 7) + 50 = 33,586 open files > 20,000.
  with pytest.raises(ValueError, match=r"33586 open files.*limit 20000; use processes >= 32"):
    launch.check_layout(2048, 16, (256, 8), fd_limit=20000)
  ok = launch.check_layout(2048, 32, (256, 8), fd_limit=20000)
  assert (ok.local_devices, ok.open_files) == (64, 64 * 262 + 50)
  assert launch.min_processes(2048, (256, 8), fd_limit=20000) == 32
  # A flat all-to-all over all 2048 devices needs 8 devices per process: 256 processes.
  assert launch.min_processes(2048, (2048, 256, 8), fd_limit=20000) == 256
  with pytest.raises(ValueError, match="processes must be a positive integer"):
    launch.check_layout(8, 0)
  with pytest.raises(ValueError, match="target='nocolon'"):
    launch.launch("nocolon", 8, 2)
  with pytest.raises(ValueError, match="not divisible"):
    launch.launch(f"{THIS}:sleep_forever", 8, 3)  # refused before anything starts
  with pytest.raises(ValueError, match=r"spare_devices=200 .* local devices 64 \+ spare_devices"):
    launch.launch(f"{THIS}:sleep_forever", 2048, 32, spare_devices=200)


def test_workers_die_with_a_killed_launcher(tmp_path):
  import signal
  import subprocess
  import sys

  launcher = subprocess.Popen(
      [sys.executable, "-m", "dsv3_jax.cluster.launch", "run", "--devices", "4",
       "--processes", "1", "--target", f"{THIS}:sleep_forever", "--log-dir", str(tmp_path)],
      cwd=os.path.dirname(os.path.dirname(os.path.dirname(THIS))), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while not _worker_pids(tmp_path) and time.time() < deadline:
      time.sleep(0.2)
    workers = _worker_pids(tmp_path)
    assert workers
  finally:
    launcher.send_signal(signal.SIGKILL)  # no cleanup code runs in the launcher
    launcher.wait()
  deadline = time.time() + 10
  while _alive(workers) and time.time() < deadline:
    time.sleep(0.2)
  assert not _alive(workers)
