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


def test_metrics_are_strict_json_and_the_reader_skips_garbled_lines(tmp_path):
  from dsv3_jax.train.metrics import MetricsWriter, read_metrics

  w = MetricsWriter(str(tmp_path), tensorboard=False)
  w.write({"step": 1, "loss": float("nan"), "grad_norm": np.float32(np.inf), "x": [1.0, np.nan]})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 2, "lo\n\xff\xfe\n[1, 2]\n{"step": 3, "loss": NaN}\n')
  text = (tmp_path / "metrics.jsonl").read_text(errors="replace").splitlines()[0]
  assert text == '{"step": 1, "loss": null, "grad_norm": null, "x": [1.0, null]}'
  rows = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 3]
