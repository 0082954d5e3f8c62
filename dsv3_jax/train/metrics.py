"""Training metrics: one JSON object per logged step in `<workdir>/metrics.jsonl`, the same
scalars as TensorBoard summaries next to it (`<workdir>/events.out.tfevents.*`, written with
tensorboardX, which needs no TensorFlow: `tensorboard --logdir runs/`), and a compact line on
stdout (through tqdm so that the progress bar stays intact)."""

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


def strict_json(obj: Any) -> Any:
  """`obj` with every non-finite float (NaN, +-inf) replaced by None, recursively through
  dicts, lists and tuples, so that `json.dumps(..., allow_nan=False)` writes strict JSON
  (RFC 8259 has no NaN; Python's default `NaN` token is rejected by other parsers)."""
  if isinstance(obj, float):
    return obj if np.isfinite(obj) else None
  if isinstance(obj, Mapping):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  if isinstance(obj, np.generic):
    return strict_json(obj.item())
  return obj


def dumps(obj: Any, **kwargs) -> str:
  """Strict JSON text of `obj` (non-finite floats as null; see `strict_json`)."""
  return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl file, skipping lines that are not a JSON object (a line cut
  short by a crash, garbage); NaN / Infinity tokens written by older versions are accepted.

  Returns:
    [row dict] in file order ([] when the file does not exist).
  """
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path, "rb") as f:
    for line in f:
      try:
        row = json.loads(line.decode("utf-8"))
      except (ValueError, UnicodeDecodeError):
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


def format_line(m: Mapping[str, Any]) -> str:
  parts = []
  for key, label, fmt in _SHOWN:
    v = m.get(key)
    if isinstance(v, (int, float)) and np.isfinite(v):
      parts.append(f"{label} {fmt.format(v)}")
    elif key in m:
      parts.append(f"{label} {v}")
  return " | ".join(parts)


class MetricsWriter:
  """Appends metric dicts to a JSONL file and their scalars to a TensorBoard event file.

  Every dict goes to `<workdir>/<filename>` as one JSON line. With `tensorboard`, its int / float
  values (not the lists: expert counts, capacities) are also written as TensorBoard scalars,
  tag = key, at global step `metrics["step"]`, to an event file in `workdir` (a resumed run adds
  a new file; TensorBoard reads them together). TensorBoard stores float32: a scalar read back
  equals the JSONL value rounded to float32.
  """

  def __init__(self, workdir: str, filename: str = "metrics.jsonl", *, tensorboard: bool = True):
    self.path = os.path.join(workdir, filename)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(logdir=workdir)

  def write(self, metrics: Mapping[str, Any]) -> None:
    """Appends `metrics` (a dict with an int "step" for TensorBoard; arrays become lists,
    non-finite floats null: the file is strict JSON, one object per line)."""
    m = strict_json(to_python(metrics))
    with open(self.path, "a") as f:
      f.write(dumps(m) + "\n")
    if self._tb is not None and isinstance(m.get("step"), int):
      for k, v in m.items():  # non-finite values are None here: not written
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, global_step=m["step"])
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """The TensorBoard scalars of a run: tag -> [(step, value)] in file and write order.

  Reads every `events.out.tfevents.*` file in `workdir` (TFRecord framing: uint64 length,
  masked CRC-32C of it, the serialized `Event`, masked CRC-32C of the data), with tensorboardX's
  protos, so neither TensorFlow nor tensorboard is needed.

  Raises:
    ValueError: a record whose CRC does not match (a truncated or corrupt file).
  """
  import glob
  import struct

  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c

  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      header = data[pos:pos + 8]
      (length,), (crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[pos + 8:pos + 12])
      body = data[pos + 12:pos + 12 + length]
      (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
      if crc != masked_crc32c(header) or body_crc != masked_crc32c(body):
        raise ValueError(f"{path}: corrupt record at byte {pos}")
      pos += 16 + length
      event = event_pb2.Event.FromString(body)
      for v in event.summary.value:
        if v.HasField("simple_value"):
          out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
  return out
