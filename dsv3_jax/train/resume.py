"""The resume contract: what a rerun in an existing workdir may change, and the run's record.

A run directory's `config.json` holds the settings that trained its checkpoints. Resuming with
settings that change the math of training (learning rate, top-k, dtype, step count (the
learning-rate schedule), data, mesh, ...) is refused with the list of changed fields, unless
`train.allow_config_change=True`; then every change is appended, with the step it applies
from, to `<workdir>/run_history.jsonl`, so the record of what trained the earlier steps
survives `config.json` being rewritten. Settings that only change bookkeeping (`NEUTRAL`) may
change freely. After a crash `metrics.jsonl` is cut back to the resumed step
(`trim_metrics`), so each step has one row.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

from dsv3_jax.train import metrics as metrics_lib

# Settings that change no number a training step computes.
NEUTRAL = frozenset({
    "name", "train.workdir", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.max_nonfinite_steps", "train.sdc_check_every", "train.allow_config_change",
    "data.eval_sequences",
})
HISTORY = "run_history.jsonl"
DATA = "data.json"  # the fingerprint of the text the checkpoints were trained on
# Settings added after runs were already written: a stored config.json without one of them
# trained with its value here (the behaviour before the setting existed), so resuming such a run
# with that value is no change.
ADDED_DEFAULTS = {
    "train.shard_optimizer_state": False,
    "train.remat": False,
}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  """{'train.learning_rate': 0.003, ...} for a nested dict (lists / tuples are leaves)."""
  if not isinstance(d, dict):
    return {prefix.rstrip("."): d}
  out = {}
  for k, v in d.items():
    out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else
               {f"{prefix}{k}": v})
  return out


_ABSENT = "(absent)"


def changed_fields(stored: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{field: (stored value, new value)} for every field outside `NEUTRAL` that differs (a
  field present on one side only shows "(absent)" on the other; a stored config without a
  field of `ADDED_DEFAULTS`, on either side, counts as holding its default). Both dicts as JSON-loaded."""
  a, b = flatten(stored), flatten(new)
  for key, default in ADDED_DEFAULTS.items():
    a.setdefault(key, default)
    b.setdefault(key, default)
  out = {}
  for key in sorted(set(a) | set(b)):
    if key in NEUTRAL:
      continue
    va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
    if va != vb:
      out[key] = (va, vb)
  return out


def has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def check(cfg, workdir: str) -> dict[str, tuple[Any, Any]]:
  """Compares `cfg` with `<workdir>/config.json` when the workdir holds a checkpoint.

  Returns:
    The accepted changes ({} for a new run or an unchanged one).

  Raises:
    ValueError: math-changing fields differ and train.allow_config_change is not set (the
      message lists them, old -> new); nothing is written.
  """
  path = os.path.join(workdir, "config.json")
  if not (os.path.exists(path) and has_checkpoint(workdir)):
    return {}
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); the settings that "
                     "trained the checkpoints in this workdir are unknown: choose another "
                     "train.workdir, or restore that file") from None
  changes = changed_fields(stored, json.loads(cfg.to_json()))
  if changes and not cfg.train.get("allow_config_change", False):
    listed = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in changes.items())
    raise ValueError(
        f"resuming {workdir} with settings that change the training math: {listed}. Rerun "
        "with the stored settings (config.json there), choose another train.workdir, or set "
        "--config.train.allow_config_change=True to continue with the new ones (recorded in "
        f"{os.path.join(workdir, HISTORY)})")
  return changes


def data_fingerprint(corpus) -> dict[str, Any]:
  """What a run reads, for the resume contract, so that a file added to, removed from or edited
  under data.paths is seen even when the setting is unchanged.

  Args:
    corpus: a `data.Corpus` (uint8 train and held-out streams).

  Returns:
    {"split", "train_files", "heldout_files", "train_bytes", "heldout_bytes", "sha256"}:
    JSON-ready; sha256 (hex) over the train stream, a separator, then the held-out stream.
  """
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(corpus.train))  # (the buffer itself, no copy)
  h.update(b"\0heldout\0")
  h.update(np.ascontiguousarray(corpus.heldout))
  return dict(split=corpus.split, train_files=int(corpus.n_train_files),
              heldout_files=int(corpus.n_heldout_files), train_bytes=int(len(corpus.train)),
              heldout_bytes=int(len(corpus.heldout)), sha256=h.hexdigest())


def _describe(fp: dict) -> str:
  return (f"{fp.get('train_files')} train / {fp.get('heldout_files')} held-out files, "
          f"{fp.get('train_bytes')} / {fp.get('heldout_bytes')} bytes, split "
          f"{fp.get('split')}, sha256 {str(fp.get('sha256'))[:12]}")


def check_data(cfg, workdir: str, fingerprint: dict) -> dict[str, tuple[Any, Any]]:
  """Compares the text this run reads (`data_fingerprint`) with `<workdir>/data.json` when the
  workdir holds a checkpoint (a run written before data.json existed is not checked).

  Returns:
    {"data (the text read)": (stored, new)} when it changed and train.allow_config_change is
    set (recorded like a config change), else {}.

  Raises:
    ValueError: the text changed (the held-out split may then hold text the checkpoints were
      trained on) and train.allow_config_change is not set; nothing is written.
  """
  path = os.path.join(workdir, DATA)
  if not (os.path.exists(path) and has_checkpoint(workdir)):
    return {}
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError):
    stored = {}
  if stored == fingerprint:
    return {}
  old = _describe(stored) if stored else f"{path} unreadable"
  new = _describe(fingerprint)
  if not cfg.train.get("allow_config_change", False):
    raise ValueError(
        f"resuming {workdir}: the text under data.paths is not the text its checkpoints were "
        f"trained on ({old} -> {new}), so the held-out split may now hold trained-on text. "
        "Restore the files, choose another train.workdir, or set "
        "--config.train.allow_config_change=True to continue on the new text (recorded in "
        f"{os.path.join(workdir, HISTORY)})")
  return {"data (the text read)": (old, new)}


def write_data(workdir: str, fingerprint: dict) -> None:
  """Writes `<workdir>/data.json` (atomically)."""
  path = os.path.join(workdir, DATA)
  with open(path + ".tmp", "w") as f:
    json.dump(fingerprint, f, indent=2)
  os.replace(path + ".tmp", path)


def record(workdir: str, step: int, changes: dict, event: str) -> None:
  """Appends {"time", "event" ('start' | 'resume'), "step", "changes"} to run_history.jsonl."""
  row = dict(time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             event=event, step=step,
             changes={k: {"old": a, "new": b} for k, (a, b) in changes.items()})
  with open(os.path.join(workdir, HISTORY), "a") as f:
    f.write(metrics_lib.dumps(row) + "\n")


def read_history(workdir: str) -> list[dict]:
  """The rows of run_history.jsonl (garbled lines skipped)."""
  return metrics_lib.read_metrics(os.path.join(workdir, HISTORY))


def trim_metrics(workdir: str, step: int, filename: str = "metrics.jsonl") -> Optional[int]:
  """Rewrites `<workdir>/metrics.jsonl` keeping only whole rows with "step" <= `step` (rows a
  crashed run wrote after its last checkpoint are dropped, as are garbled lines), atomically.

  Returns:
    How many lines were dropped (None when there is no file).
  """
  path = os.path.join(workdir, filename)
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    lines = f.read().splitlines()
  rows = metrics_lib.read_metrics(path)
  keep = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in keep:
      f.write(metrics_lib.dumps(r) + "\n")
  os.replace(tmp, path)
  return len(lines) - len(keep)
