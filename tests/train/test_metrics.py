"""Metrics files: JSONL lines and the same scalars in TensorBoard event files, read back."""

import json

import numpy as np

from dsv3_jax.train import metrics


def test_tensorboard_scalars_equal_the_jsonl_values(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path))
  w.write({"step": 10, "loss": np.float32(2.5), "grad_norm": 0.123456789,
           "expert_counts": np.ones((2, 4)), "capacity": [8, 16]})
  w.write({"step": 20, "loss": 2.25, "heldout_loss": 2.375})
  w.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [10, 20] and lines[0]["expert_counts"] == [[1.0] * 4] * 2
  tb = metrics.read_scalars(str(tmp_path))
  assert set(tb) == {"loss", "grad_norm", "heldout_loss"}  # scalars only, no lists
  assert tb["loss"] == [(10, 2.5), (20, 2.25)] and tb["heldout_loss"] == [(20, 2.375)]
  assert tb["grad_norm"] == [(10, float(np.float32(0.123456789)))]  # TensorBoard stores float32
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)  # a second run in the same dir
  w.write({"step": 30, "loss": 2.0})
  assert metrics.read_scalars(str(tmp_path))["loss"] == [(10, 2.5), (20, 2.25)]
