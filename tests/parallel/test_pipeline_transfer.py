"""The all_gather stage transfer (groups of the stage axis only) against ppermute: the same
losses, gradients and executor counters, for 1F1B and DualPipe (which also mirrors the
parameters), PP2 and PP4 x (node, gpu) = 2 x 2."""

import jax
import numpy as np
import pytest

import test_pipeline as tp  # same directory (pytest prepend import mode)


_REAL = tp.pipeline_step.make_pipeline_step_fns


def _run(schedule, stages, micro_batches, transfer, monkeypatch):
  def with_transfer(*a, **k):
    return _REAL(*a, transfer=transfer, **k)

  monkeypatch.setattr(tp.pipeline_step, "make_pipeline_step_fns", with_transfer)
  return tp._pipelined(schedule, stages, micro_batches)


@pytest.mark.parametrize("schedule,stages,micro_batches", [("1F1B", 4, 4), ("DualPipe", 2, 4)])
def test_all_gather_equals_ppermute(schedule, stages, micro_batches, monkeypatch):
  a = _run(schedule, stages, micro_batches, "ppermute", monkeypatch)
  b = _run(schedule, stages, micro_batches, "all_gather", monkeypatch)
  assert int(np.sum(b[2]["schedule_mismatches"])) == 0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert np.isfinite(float(b[2]["loss"])) and float(b[2]["loss"]) > 0


def test_unknown_transfer_is_refused():
  with pytest.raises(ValueError, match="pipeline.transfer"):
    _REAL(None, None, tp._reference()[1], tp._cfg().train, 8,
                                            tp.make_pipeline_mesh(2, 2, 2), None, None, None,
                                            schedule="1F1B", micro_batches=4, transfer="psum")
