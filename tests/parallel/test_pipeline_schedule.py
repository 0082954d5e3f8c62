"""Slot tables of the executed pipeline schedules against the simulator and V3 report Table 2."""

import numpy as np
import pytest

from dsv3_jax.analysis.timeline import bubble_formula, memory_formula, simulate_pipeline
from dsv3_jax.parallel import pipeline_schedule as ps

CASES = [("1F1B", 2, 2), ("1F1B", 4, 4), ("1F1B", 4, 8), ("ZB1P", 4, 8), ("DualPipe", 2, 4),
         ("DualPipe", 4, 8), ("DualPipe", 4, 12), ("DualPipe", 8, 16)]


@pytest.mark.parametrize("method,pp,m", CASES)
def test_idle_slots_equal_simulator_and_table2(method, pp, m):
  t = ps.build_slot_table(method, pp, m)
  sim = simulate_pipeline(method, pp, m, F=1.0, B=2.0, W=1.0, FB=3.0)
  assert t.slots == sim.makespan
  assert t.idle_slots() == tuple(int(b) for b in sim.bubble_per_rank)
  assert max(t.idle_slots()) == bubble_formula(method, pp, 1.0, 2.0, 1.0, 3.0)
  # hand-computed: 1F1B (PP-1)(F+B) = 3(PP-1); ZB1P (PP-1)(F+B-2W) = PP-1;
  # DualPipe (PP/2-1)(F&B+B-3W) = PP-2
  assert max(t.idle_slots()) == {"1F1B": 3 * (pp - 1), "ZB1P": pp - 1,
                                 "DualPipe": pp - 2}[method]
  ops = t.table[:, :, ps.COL["op"]]
  for r in range(pp):  # every rank runs each micro-batch's F, B and W exactly once
    for op in (ps.FWD, ps.BWD_INPUT, ps.BWD_WEIGHT):
      assert np.sum(ops[:, r] == op) == m


@pytest.mark.parametrize("method,pp,m", CASES)
def test_stored_activations_equal_memory_formula(method, pp, m):
  t = ps.build_slot_table(method, pp, m)
  copies, activations = memory_formula(method, pp)
  assert t.directions == copies
  assert max(t.peak_per_rank["x"]) == activations == t.simulated.peak_activations
  assert t.entries["x"] == activations


def test_messages_arrive_before_they_are_used():
  t = ps.build_slot_table("DualPipe", 4, 8)
  col = ps.COL
  for slot in range(t.slots):
    for r in range(t.pp):
      row = t.table[slot, r]
      for side in ("recv_up", "recv_down"):
        if row[col[side]] == ps.NO_MESSAGE:
          continue
        d, m = row[col[side + "_direction"]], row[col[side + "_micro_batch"]]
        op = ps.FWD if row[col[side]] == ps.ACTIVATION else ps.BWD_INPUT
        later = t.table[slot + 1:, r]
        use = np.nonzero((later[:, col["op"]] == op) & (later[:, col["direction"]] == d)
                         & (later[:, col["micro_batch"]] == m))[0]
        assert len(use) == 1
        assert later[use[0], col["in_entry"]] == row[col[side + "_entry"]]


@pytest.mark.parametrize("method,pp,m,match", [
    ("1F1B", 4, 3, "pipeline.micro_batches=3"),
    ("DualPipe", 4, 6, "pipeline.micro_batches=6"),
    ("DualPipe", 4, 9, "even"),
    ("DualPipe", 3, 6, "mesh.stages=3"),
    ("GPipe", 4, 8, "pipeline.schedule='GPipe'"),
    ("1F1B", 1, 8, "mesh.stages=1"),
])
def test_bad_schedule_settings(method, pp, m, match):
  with pytest.raises(ValueError, match=match):
    ps.build_slot_table(method, pp, m)
