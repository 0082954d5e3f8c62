"""Shared helpers for the experiment scripts: paths, number formatting, .md / .csv writers.

Every script computes its numbers with `dsv3_jax.analysis`, then calls `write_csv` and
`write_markdown` with rows of plain values; paper values are reference constants, never results.

The experiments are scripts (`python experiments/<name>.py`, dsv3_jax installed): Python puts
the script's folder first on sys.path, so they import this module as `import _report as R`, and
dsv3_jax and `configs` from the installed package.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO_ROOT, "results")

import matplotlib  # noqa: E402

matplotlib.use("Agg")


def path(name: str, ext: str) -> str:
  """results/<name>.<ext>, creating results/ if needed."""
  os.makedirs(RESULTS, exist_ok=True)
  return os.path.join(RESULTS, f"{name}.{ext}")


def rel_diff(computed: float, paper: Optional[float]) -> Optional[float]:
  """(computed - paper) / paper, or None without a paper value."""
  if paper is None or paper == 0:
    return None
  return (computed - paper) / paper


def fmt(x: Any, digits: int = 3) -> str:
  """Formats numbers for tables: None -> "—", ints with thousands separators."""
  if x is None:
    return "—"
  if isinstance(x, bool):
    return "yes" if x else "no"
  if isinstance(x, int):
    return f"{x:,}"
  if isinstance(x, float):
    if x == int(x) and abs(x) < 1e15 and digits == 0:
      return f"{int(x):,}"
    return f"{x:,.{digits}f}"
  return str(x)


def pct(x: Optional[float], digits: int = 2) -> str:
  """A relative difference as a signed percentage."""
  return "—" if x is None else f"{100 * x:+.{digits}f}%"


def write_csv(name: str, rows: Sequence[Dict[str, Any]]) -> str:
  """Writes rows (dicts with the same keys) to results/<name>.csv; returns the path."""
  p = path(name, "csv")
  keys: List[str] = []
  for r in rows:
    for k in r:
      if k not in keys:
        keys.append(k)
  with open(p, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, "") for k in keys})
  return p


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A GitHub markdown table; cells are formatted already (strings) or via `fmt`."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |")
  return "\n".join(lines)


def write_markdown(name: str, title: str, sections: Sequence[str], script: str) -> str:
  """Writes results/<name>.md: a title, the given markdown sections, and how to regenerate."""
  p = path(name, "md")
  body = [f"# {title}", ""]
  for s in sections:
    body += [s.rstrip(), ""]
  body += [f"Regenerate: `.venv/bin/python experiments/{script}` (figure: `results/{name}.png`, "
           f"data: `results/{name}.csv`).", ""]
  with open(p, "w") as f:
    f.write("\n".join(body))
  return p
