"""Copies the headline tables of results/*.md into README.md (between the results markers), so
that every number in the README is one a script in experiments/ wrote.

    python experiments/update_readme.py

Run it after regenerating any results file. A results file that does not exist yet is listed as
missing rather than filled with anything.
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# (results file, heading shown in the README, which table: index among the file's tables or the
# text of the heading that precedes it, extra paragraph to copy: a regex or None)
SECTIONS = (
    ("main_job.md", "Main job (`make train`)", 0, None),
    ("benchmark_step.md", "Training-step throughput (tiny config, one device)", 0, None),
    ("benchmark_step.md", "Training step: the emulated 4 x 8 mesh against one device",
     "The emulated 4 x 8 mesh against one device, same global batch", r"^Mesh / one device"),
    ("node_limited_routing.md", "Node-limited routing: inter-node copies per token", 0,
     r"^Two-hop inter-node copies are bounded"),
    ("scale_2048.md", "Scaling to 2048 emulated devices",
     "Compile time, step time and memory vs device count", None),
    ("serving.md", "Serving: decode tokens/s vs transformers generate() (tiny dims, one device)",
     "Batch 32 in paired rounds", r"^Targets:"),
    ("fp8_training.md", "FP8 vs BF16 training (same seed, same steps)", 0, None),
    ("fp8_step_time.md", "FP8 quantization overhead (step time)", 0, None),
    ("quant_error.md", "Quantization error on real activations and gradients", 0, None),
    ("comm_bytes.md", "Dispatch / combine bytes per token (main job, measured)",
     "Measured: main job, 4 x 8 emulated devices", None),
    ("fp8_accumulation.md", "FP8 accumulation error vs K", 0, None),
    ("summary.md", "Cost models vs the papers", "Headline numbers", None),
)


def tables(text: str) -> list[tuple[str, str]]:
  """(preceding heading, table text) for every markdown table in `text`."""
  out, heading, block = [], "", []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      block.append(line)
      continue
    if block:
      out.append((heading, "\n".join(block)))
      block = []
    if line.startswith("#"):
      heading = line.lstrip("#").strip()
  return out


def section(name: str, title: str, which, paragraph) -> str:
  path = os.path.join(ROOT, "results", name)
  if not os.path.exists(path):
    return f"### {title}\n\n(results/{name} not generated yet)\n"
  text = open(path).read()
  found = tables(text)
  if isinstance(which, int):
    table = found[which][1] if len(found) > which else ""
  else:
    table = next((t for h, t in found if h == which), "")
  script = re.search(r"`(experiments/[\w./-]+\.py)[^`]*`", text)
  src = f"From [results/{name}](results/{name})"
  src += f", written by `{script.group(1)}`." if script else "."
  parts = [f"### {title}", "", src, "", table]
  if paragraph:
    para = next((p for p in text.split("\n\n") if re.search(paragraph, p, re.M)), None)
    if para:
      parts += ["", para.strip()]
  return "\n".join(parts) + "\n"


def main() -> None:
  readme = os.path.join(ROOT, "README.md")
  text = open(readme).read()
  if BEGIN not in text or END not in text:
    sys.exit(f"README.md lacks the {BEGIN} / {END} markers")
  body = "\n".join(section(*s) for s in SECTIONS)
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  with open(readme, "w") as f:
    f.write(f"{head}{BEGIN}\n\n{body}\n{END}{tail}")
  print("updated README.md")


if __name__ == "__main__":
  main()
