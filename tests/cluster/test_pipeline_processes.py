"""The stacked-layout pipelined step across processes (experiments/pipeline_2048.py's
worker, the one the 2048-device run uses): 2 processes x 4 CPU devices, one pipeline stage
per process, so every stage transfer crosses processes through gloo. Its losses equal the
same step run in this one process, and the executed schedule equals the simulator's."""

import numpy as np

from dsv3_jax.cluster import launch
from dsv3_jax.parallel import pipeline_schedule as ps
from experiments import pipeline_2048

KW = dict(stages=2, nodes=2, gpus=2, ep_nodes=2, micro_batches=2, schedule="1F1B", seq_len=8,
          steps=2)


def test_stacked_step_across_processes_equals_one_process():
  one = pipeline_2048.pipeline_worker(**KW)  # this process: 8 of its 32 devices
  r = launch.launch("experiments.pipeline_2048:pipeline_worker", 8, 2, KW,
                    group_sizes=(2, 2, 2), timeout_s=900)
  table = ps.build_slot_table("1F1B", 2, 2)
  assert sorted(x["stage"] for x in r.results) == [0, 1]  # one stage per process
  for x in r.results:
    # gloo's sums may add in another order than the in-process collectives: float32 ulps
    np.testing.assert_allclose(x["loss"], one["loss"], rtol=2e-6)
    assert x["loss"][1] != x["loss"][0]  # the first step changed the weights
    np.testing.assert_allclose(x["grad_norm"], one["grad_norm"], rtol=1e-5)
    assert x["skipped"] == 0 and x["dropped"] == 0
    assert x["idle_slots"] == [table.idle_slots()[x["stage"]]]
    assert x["peak_activations"] == [table.peak_per_rank["x"][x["stage"]]]
    assert x["schedule_mismatches"] == [0]
  assert one["stage"] == 0 and one["idle_slots"] == [table.idle_slots()[0]]  # device 0's
  assert {a["axes"] for a in one["axes"]} <= {"stage", "node", "gpu"}
  assert all(a["kind"] != "collective-permute" for a in one["axes"])
