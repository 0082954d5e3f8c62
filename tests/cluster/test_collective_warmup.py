"""Gloo communicators created up front (`launch.warm_up_collectives`) and the launcher's
collective timeout, on 2 processes x 2 CPU devices.

XLA:CPU creates a gloo communicator inside the first collective over its device group and gloo
waits ~30 s for the group's members. The skewed worker below has one device in each process
sleep before the step's first psum (over `gpu`, then over `node`): without the warm-up the
early members give up after 30 s and the late ones block (measured: the job idles until the
launcher's timeout); with it the step waits for the late device and completes.
"""

import os

import pytest

from dsv3_jax.cluster import launch

THIS = os.path.abspath(__file__)
LATE_S = 35.0  # > gloo's ~30 s rendezvous wait


# ----------------------------------------------------------------------- worker target
# Run inside the launched processes (imported there by file path); jax is imported lazily so
# that the worker has set its device count first.


def skewed_step(late_s: float, late_devices: list, warm_up: bool) -> dict:
  """A (node=2, gpu=N/2) mesh; devices `late_devices` sleep `late_s` seconds (a host callback)
  before the step's psum over `gpu` and then over `node`, whose result is N on every device.
  Returns the sums this process's devices hold, the step's seconds, the warm-up's seconds per
  axis and the worker's XLA_FLAGS."""
  import time

  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from dsv3_jax.parallel.mesh import make_mesh

  n = jax.device_count()
  mesh = make_mesh(2, n // 2, devices=launch.cluster_devices(n))
  spec = P(("node", "gpu"))

  def nap(s):
    time.sleep(float(s.reshape(-1)[0]))
    return s

  def body(v, s):
    s = jax.pure_callback(nap, jax.ShapeDtypeStruct(s.shape, s.dtype), s)
    return jax.lax.psum(jax.lax.psum(v + 0 * s, "gpu"), "node")

  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
  late = np.zeros((n,), np.float32)
  late[list(late_devices)] = late_s
  put = lambda a: jax.make_array_from_callback((n,), NamedSharding(mesh, spec), lambda i: a[i])
  x, s = put(np.ones((n,), np.float32)), put(late)
  compiled = step.lower(x, s).compile()
  warm = launch.warm_up_collectives(mesh, timeout_s=120, log=print) if warm_up else {}
  t0 = time.perf_counter()
  y = jax.block_until_ready(compiled(x, s))
  return dict(sums=[float(np.asarray(d.data)[0]) for d in y.addressable_shards],
              step_s=time.perf_counter() - t0, warm_up_s=warm, warm_up_order=list(warm),
              xla_flags=os.environ.get("XLA_FLAGS", ""))


# ----------------------------------------------------------------------- tests


def test_a_member_late_by_more_than_gloos_wait_completes_after_the_warm_up(tmp_path):
  # Device 1 of process 0 and device 3 (the second of process 1) are 35 s late. Without the
  # warm-up this job does not finish (measured: killed by the launcher's timeout, 100 s).
  r = launch.launch(f"{THIS}:skewed_step", 4, 2,
                    dict(late_s=LATE_S, late_devices=[1, 3], warm_up=True),
                    timeout_s=180, log_dir=str(tmp_path))
  for res in r.results:
    assert res["sums"] == [4.0, 4.0]  # psum over gpu (2) then node (2) of ones
    assert res["warm_up_order"] == ["gpu", "node"]  # minor axis first
    assert all(v >= 0 for v in res["warm_up_s"].values())
    assert res["step_s"] >= LATE_S - 1  # the early devices waited for the late ones
    # The launcher's default collective timeout reached the worker.
    assert f"--xla_cpu_collective_timeout_seconds={launch.DEFAULT_COLLECTIVE_TIMEOUT_S}" in (
        res["xla_flags"].split())
  log = (tmp_path / "process_1.log").read_text()
  assert "[process 1] warm-up of the gpu communicators (2 members each): " in log
  assert "[process 1] warm-up of the node communicators (2 members each): " in log


def test_the_collective_timeout_turns_a_hang_into_an_error(tmp_path):
  # After the warm-up, device 1 (process 0) does not reach the step's psum within the job (an
  # hour late): without a collective timeout process 1 would wait for it until the launcher's
  # timeout. With a 5 s collective timeout process 1's all-reduce fails and the launcher stops
  # the job, naming it, within seconds.
  with pytest.raises(launch.LaunchError, match=r"process 1 of 2 \(pid \d+\) exited with code 1"
                     ) as e:
    launch.launch(f"{THIS}:skewed_step", 4, 2,
                  dict(late_s=3600.0, late_devices=[1], warm_up=True),
                  timeout_s=180, log_dir=str(tmp_path), collective_timeout_s=5)
  message = str(e.value)
  assert "Gloo all-reduce failed" in message and "Timed out waiting 5000ms" in message
  elapsed = float(message.split(" after ")[1].split(" s")[0])  # since the first spawn
  assert elapsed < 60, message


def test_bad_settings_are_refused_before_anything_starts(tmp_path):
  import jax

  from dsv3_jax.parallel.mesh import make_mesh

  for bad in (0, -5, 2.5, True, "600"):
    with pytest.raises(ValueError, match="collective_timeout_s"):
      launch.launch(f"{THIS}:skewed_step", 4, 2, {}, collective_timeout_s=bad,
                    log_dir=str(tmp_path))
  assert not list(tmp_path.iterdir())  # no process was started
  mesh = make_mesh(2, 2)
  with pytest.raises(ValueError, match=r"axes \['expert'\] are not mesh axes"):
    launch.warm_up_collectives(mesh, axes=["gpu", "expert"])
  assert jax.process_count() == 1
  assert launch.warm_up_collectives(mesh) == {}  # one process: no gloo, nothing to create
