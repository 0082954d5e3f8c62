"""Training metrics: one JSON object per logged step in `<workdir>/metrics.jsonl`, and a compact
line on stdout (through tqdm so that the progress bar stays intact)."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

# (key, label, format) of the stdout line; every key goes to the JSONL file.
_SHOWN = (
    ("step", "step", "{:d}"),
    ("loss", "loss", "{:.4f}"),
    ("mtp_loss", "mtp", "{:.4f}"),
    ("balance_loss", "bal", "{:.3f}"),
    ("expert_load_max_over_mean", "load max/mean", "{:.2f}"),
    ("dropped_tokens", "dropped", "{:.0f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("step_time_s", "step s", "{:.3f}"),
)


def to_python(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Arrays -> floats / lists so that metrics serialise to JSON."""
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v) if not isinstance(v, (int, float, str)) else v
    if isinstance(v, np.ndarray):
      v = v.item() if v.ndim == 0 else v.tolist()
    out[k] = v
  return out


def format_line(m: Mapping[str, Any]) -> str:
  parts = []
  for key, label, fmt in _SHOWN:
    if key in m:
      parts.append(f"{label} {fmt.format(m[key])}")
  return " | ".join(parts)


class MetricsWriter:
  """Appends metric dicts to a JSONL file."""

  def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
    self.path = os.path.join(workdir, filename)

  def write(self, metrics: Mapping[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(to_python(metrics)) + "\n")
