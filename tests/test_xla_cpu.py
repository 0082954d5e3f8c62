"""xla_cpu.cpu_jit: the options reach XLA:CPU's compiler, are copied when jitted, and {} means
XLA's defaults."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import xla_cpu

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")


def _f(x):
  return jnp.tanh(x @ x.T).sum(axis=0)


def test_options_reach_the_compiler():
  x = jnp.arange(12.0).reshape(3, 4) / 10
  bad = {"xla_cpu_no_such_option_dsv3": "1"}
  with pytest.raises(Exception, match="xla_cpu_no_such_option_dsv3"):
    xla_cpu.cpu_jit(_f, bad)(x)
  want = np.tanh(np.asarray(x) @ np.asarray(x).T).sum(axis=0)
  for options in ({}, xla_cpu.NO_YNNPACK):
    np.testing.assert_allclose(xla_cpu.cpu_jit(_f, options)(x), want, rtol=1e-6)


def test_options_are_copied_when_jitted():
  options = dict(xla_cpu.NO_YNNPACK)
  fn = xla_cpu.cpu_jit(_f, options)
  options["xla_cpu_no_such_option_dsv3"] = "1"  # too late: fn compiles with the copy
  x = jnp.ones((2, 2))
  np.testing.assert_allclose(fn(x), np.tanh(2.0) * 2 * np.ones(2), rtol=1e-6)


def test_process_flags_add_llvm_o2_once_and_a_callers_level_wins():
  assert xla_cpu.with_process_flags("") == "--xla_backend_optimization_level=2"
  assert (xla_cpu.with_process_flags("--xla_force_host_platform_device_count=4")
          == "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=2")
  once = xla_cpu.with_process_flags("")
  assert xla_cpu.with_process_flags(once) == once
  assert (xla_cpu.with_process_flags("--xla_backend_optimization_level=3")
          == "--xla_backend_optimization_level=3")


def test_the_session_runs_every_program_at_llvm_o2_as_dsv3_train_does():
  # tests/conftest.py appended it to the device-count flag it set.
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_backend_optimization_level=2" in flags
  assert any(f.startswith("--xla_force_host_platform_device_count=") for f in flags)


def test_a_field_set_in_xla_flags_is_left_out_of_the_jit_options(monkeypatch):
  # A user's XLA_FLAGS level reaches the train step (found by a new-user trial: per-jit
  # options override XLA_FLAGS, so -O3 there used to reach only the small helper programs).
  from dsv3_jax.train import step

  # XLA_FLAGS is read here by cpu_jit only (the session's backend parsed it long before).
  x = jnp.ones((2, 2))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  assert xla_cpu.jit_options(step.TRAIN_CPU_OPTIONS) == step.TRAIN_CPU_OPTIONS
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3 --xla_cpu_no_such_dsv3")
  assert xla_cpu.jit_options(step.TRAIN_CPU_OPTIONS) == xla_cpu.NO_YNNPACK  # -O3 wins
  fn = xla_cpu.cpu_jit(_f, {**step.TRAIN_CPU_OPTIONS, "xla_cpu_no_such_dsv3": "1"})
  np.testing.assert_allclose(fn(x), np.tanh(2.0) * 2 * np.ones(2), rtol=1e-6)  # field dropped
  assert xla_cpu.flag_names("--a=1 --b -c=2") == {"a", "b", "c"}
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  with pytest.raises(Exception, match="xla_cpu_no_such_dsv3"):
    xla_cpu.cpu_jit(_f, {"xla_cpu_no_such_dsv3": "1"}).lower(x).compile()
