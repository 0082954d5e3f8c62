"""Process memory probes (train/memory.py): phase peaks, live device bytes, compile counts, and
the allocator / XLA flag settings of dsv3-train."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.train import memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


@linux
def test_phase_peak_sees_a_transient_buffer_and_repeats_accumulate():
  log = memory.PhaseLog()
  log.mark("idle")
  n = 256 * 2**20
  buf = np.ones(n, np.uint8)  # 256 MiB, every page touched
  del buf
  big = log.mark("transient")
  small = log.mark("after")
  assert log.peak_resets
  assert big.peak - small.rss > 0.9 * n  # the freed buffer shows in its own phase's peak only
  assert small.peak < big.peak - 0.9 * n
  again = log.mark("after")
  assert again is small and small.count == 2
  assert [p.name for p in log.phases] == ["idle", "transient", "after"]
  assert log.peak() == big.peak
  assert log.rows()[1]["name"] == "transient" and log.rows()[1]["peak"] == big.peak


def test_live_bytes_count_each_device_buffer_once_and_compiles_are_counted():
  import gc

  mesh = jax.make_mesh((len(jax.devices()),), ("d",))
  log = memory.PhaseLog()
  # Arrays an earlier test in this worker left in unreachable cycles would be freed whenever
  # the collector runs, changing the live bytes between the two marks: collect them first and
  # keep the collector off in between.
  gc.collect()
  gc.disable()
  try:
    log.mark("start")
    x = jax.device_put(np.zeros((1000, 250), np.float32), NamedSharding(mesh, P()))  # 1e6 B
    _ = [s.data for s in x.addressable_shards]  # jax caches per-device arrays sharing buffers
    f = jax.jit(lambda a: a * 3.0 + 1.0)
    y = f(jnp.ones((7, 13)))
    row = log.mark("placed")
  finally:
    gc.enable()
  assert row.live - log.phases[0].live == len(jax.devices()) * 1_000_000 + y.nbytes
  assert row.compiles >= 1
  f(jnp.ones((7, 13)))  # cached: no compilation
  assert log.mark("cached").compiles == 0
  del x


def test_xla_flags_append_unless_set_and_defaults_switch(monkeypatch):
  monkeypatch.delenv(memory.ENV, raising=False)
  flag = memory.XLA_MEMORY_FLAGS[0]
  name = flag.split("=")[0]
  assert memory.xla_flags("") == " ".join(memory.XLA_MEMORY_FLAGS)
  assert memory.xla_flags("--a=1") == "--a=1 " + " ".join(memory.XLA_MEMORY_FLAGS)
  mine = f"{name}=true"
  assert memory.xla_flags(mine).split().count(mine) == 1 and flag not in memory.xla_flags(mine)
  monkeypatch.setenv(memory.ENV, "1")
  assert memory.xla_flags("--a=1") == "--a=1"
  assert memory.configure_malloc() is False and memory.trim() is False


def test_low_memory_is_opt_in(monkeypatch):
  monkeypatch.delenv(memory.ENV, raising=False)
  monkeypatch.delenv(memory.LOW_MEMORY_ENV, raising=False)
  assert memory.low_memory() is False  # the malloc caps slow the step: not the default
  monkeypatch.setenv(memory.LOW_MEMORY_ENV, "1")
  assert memory.low_memory() is True
  monkeypatch.setenv(memory.ENV, "1")  # the libraries' defaults win over everything
  assert memory.low_memory() is False


def test_configure_malloc_rejects_bad_settings():
  with pytest.raises(ValueError, match="arena_max"):
    memory.configure_malloc(arena_max=0)
  with pytest.raises(ValueError, match="mmap_threshold"):
    memory.configure_malloc(mmap_threshold=-1)
