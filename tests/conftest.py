"""Test session setup: 32 emulated CPU devices (a 4-node x 8-GPU mesh and its 8-device
sub-meshes run in-process); tests that need another device count start a subprocess.

`make test` runs the files on 3 pytest-xdist workers (Makefile, TEST_WORKERS), one file per
worker at a time (`--dist loadfile --no-loadscope-reorder`: a file's module-scoped fixtures and
the programs its tests share are built once, in one process). The workers take the files in
the order `pytest_collection_modifyitems` below gives them, longest first, so that the long
files do not end up alone at the end of the run: by the per-file seconds of the last
whole-suite run that passed in this checkout (pytest's cache,
`.pytest_cache/v/dsv3_jax/file_seconds`), on a fresh checkout by `LONG_FILES`.
"""

from __future__ import annotations

import collections
import math
import os
import sys

N_DEVICES = 32
_flag = "--xla_force_host_platform_device_count"
if "jax" not in sys.modules:
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_flag))
  os.environ["XLA_FLAGS"] = f"{flags} {_flag}={N_DEVICES}".strip()
  # LLVM at -O2 for every program, as dsv3-train and the train / serving steps compile
  # (dsv3_jax/xla_cpu.py: 771 s of pytest against 882 s at -O3, one clean-clone run each).
  from dsv3_jax import xla_cpu
  os.environ["XLA_FLAGS"] = xla_cpu.with_process_flags(os.environ["XLA_FLAGS"])

# One persistent compilation cache for the whole run, shared by the xdist workers and every
# subprocess they start (the variables are inherited): a program compiled once (the same
# config's train step in the CLI runs, a resumed run, a rebuilt engine) is loaded, not compiled
# again; the executables, and so the numbers, are the same. It starts empty on every run (the
# controller, or the only process under -n 0, clears it before any worker starts), so the
# suite's time is that of a cold machine. JAX_COMPILATION_CACHE_DIR set by the caller wins.
JIT_CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             ".pytest_cache", "jax_compilation_cache")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  if "PYTEST_XDIST_WORKER" not in os.environ:
    import shutil
    shutil.rmtree(JIT_CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = JIT_CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# The files that took longest in a full `make test` (the command in README, Tests), longest
# first. Only the order in which the xdist workers take files depends on it.
LONG_FILES = (
    "tests/parallel/test_pipeline.py",
    "tests/train/test_reliability.py",
    "tests/parallel/test_pipeline_train.py",
    "tests/train/test_multiprocess_training.py",
    "tests/cluster/test_pipeline_processes.py",
    "tests/train/test_zero1.py",
    "tests/train/test_trainer.py",
    "tests/parallel/test_dispatch.py",
    "tests/model/test_fp8_model.py",
    "tests/test_cli.py",
    "tests/train/test_mesh_training.py",
    "tests/train/test_step.py",
    "tests/model/test_moe.py",
)
CACHE_KEY = "dsv3_jax/file_seconds"


def _file(nodeid: str) -> str:
  return nodeid.split("::", 1)[0]


def file_order(files: list[str], seconds: dict[str, float]) -> list[str]:
  """`files` in the order the workers should take them: by `seconds` (measured per file, longest
  first; a file with no measurement first of all: it is new and may be long) when there are
  measurements, else the `LONG_FILES` first in their order, then the rest as collected."""
  if seconds:
    key = lambda f: -seconds.get(f, math.inf)
  else:
    key = lambda f: LONG_FILES.index(f) if f in LONG_FILES else len(LONG_FILES)
  return sorted(files, key=key)  # stable: ties keep the collection order


def pytest_collection_modifyitems(session, config, items):
  cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
  seconds = cache.get(CACHE_KEY, {}) if cache is not None else {}
  files = list(dict.fromkeys(_file(i.nodeid) for i in items))
  rank = {f: r for r, f in enumerate(file_order(files, seconds))}
  items.sort(key=lambda i: rank[_file(i.nodeid)])  # stable: a file's tests keep their order


_seconds: collections.Counter = collections.Counter()


def pytest_runtest_logreport(report):
  _seconds[_file(report.nodeid)] += report.duration  # setup, call and teardown


def _whole_suite(config) -> bool:
  """Whether this run is the whole suite (no paths, -k, -m, --lf given): a narrower run's
  seconds would stand for a part of a file."""
  import pytest

  o = config.option
  return (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not o.keyword and
          not o.markexpr and not getattr(o, "lf", False))


def pytest_sessionfinish(session, exitstatus):
  config = session.config
  if (hasattr(config, "workerinput") or getattr(config, "cache", None) is None or exitstatus or
      not _whole_suite(config)):
    return  # an xdist worker (the controller gets every report) or a partial run
  config.cache.set(CACHE_KEY, {f: round(s, 2) for f, s in _seconds.items()})
