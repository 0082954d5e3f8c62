"""`dsv3-train`: the config-driven training entry point.

    dsv3-train --config=configs/orion_4x8.py [--config.train.steps=200 ...]

The emulated device count (mesh.nodes x mesh.gpus_per_node) is set from the config before jax
is imported, so this module must not import jax at module level.

Exit codes: 0 done; 2 a bad command line or config (one line on stderr, nothing written);
3 the run stopped early (non-finite steps, a non-finite state, replica mismatch; the message
names the step and the newest checkpoint, which a rerun resumes from).
"""

from __future__ import annotations

import os
import sys
from typing import Optional


def _config_root(argv: list[str]) -> None:
  """Puts the directory holding the given file's `configs/` folder first on sys.path.

  The `configs` package is installed with dsv3_jax; this makes the configs a file imports
  (`from configs import tiny`) come from the same folder as the file itself, e.g. when it is
  given from another checkout than the installed one.
  """
  for i, a in enumerate(argv):
    path = a.split("=", 1)[1] if a.startswith("--config=") else (
        argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
    if path:
      root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":")[0])))
      if root not in sys.path:
        sys.path.insert(0, root)
      return


def main(argv) -> None:
  del argv
  from absl import flags, logging

  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO

  cfg = flags.FLAGS.config
  from dsv3_jax.parallel.mesh import mesh_device_count, set_host_device_count
  from dsv3_jax import xla_cpu  # imports jax only when a program is jitted
  from dsv3_jax.train import memory  # does not import jax

  # Before jax starts: XLA:CPU's memory-saving scheduler, and with DSV3_LOW_MEMORY=1 fewer glibc
  # arenas and a fixed mmap threshold (memory.py; DSV3_MEMORY_DEFAULTS=1: the libraries' defaults).
  if memory.low_memory():
    memory.configure_malloc()
  os.environ["XLA_FLAGS"] = xla_cpu.with_process_flags(
      memory.xla_flags(os.environ.get("XLA_FLAGS", "")))
  phases = memory.PhaseLog()
  try:
    n_dev = mesh_device_count(cfg.mesh)  # before jax starts: the rest is checked by the trainer
  except ValueError as e:
    print(f"dsv3-train: error: {e}", file=sys.stderr)
    sys.exit(2)
  set_host_device_count(n_dev)
  from dsv3_jax.train import trainer  # imports jax with the device count in place

  phases.mark("imports")
  try:
    trainer.train(cfg, phases=phases)
  except (ValueError, FileNotFoundError) as e:
    print(f"dsv3-train: error: {e}", file=sys.stderr)
    sys.exit(2)
  except trainer.TrainingStopped as e:
    print(f"dsv3-train: {e}", file=sys.stderr)
    sys.exit(3)


def train_target(config: str, overrides: Optional[dict] = None) -> dict:
  """A `dsv3_jax.cluster.launch` target: trains (or resumes) `config` in the launched worker(s).

      python -m dsv3_jax.cluster.launch run --devices 1 --processes 1 \\
          --target dsv3_jax.train.cli:train_target \\
          --kwargs '{"config": "configs/tiny.py", "overrides": {"train.steps": 20}}'

  With --processes P > 1 (and --devices N = mesh.nodes x mesh.gpus_per_node), the P workers
  train one job on one global mesh over all of their devices (trainer module docstring,
  "Multi-process"); process 0 writes the run's files. If a worker dies, the launcher stops the
  others and names it; rerunning the same command resumes from the newest intact checkpoint.

  Args:
    config: a config file (configs/*.py).
    overrides: {"train.steps": 20, ...}: dotted field names, as --config.<name> on the command
      line (lists for tuple fields).

  Returns:
    The run's summary dict (summary.json), on every process.

  Raises:
    ValueError: a bad config (e.g. a mesh that does not split evenly over the processes).
  """
  from dsv3_jax.train import trainer

  cfg = _load_config_file(config)
  if overrides:  # JSON has no tuples: lists become tuples (data.paths, model.fp8_layers)
    cfg.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v
                                    for k, v in overrides.items()})
  return trainer.train(cfg, progress=False, log=lambda s: print(s, flush=True))


USAGE = """usage: dsv3-train --config=CONFIG.py [--config.SECTION.KEY=VALUE ...]

Trains (or resumes) the run described by CONFIG.py (a file with get_config(), e.g.
configs/tiny.py, configs/orion_4x8.py); any field below can be overridden, e.g.
  dsv3-train --config=configs/tiny.py --config.train.steps=100 --config.data.paths="('/my/texts',)"
Writes train.workdir/{config.json, metrics.jsonl, summary.json, checkpoints/}; rerunning resumes
from the newest intact checkpoint. Exit codes: 0 done, 2 bad command line or config, 3 stopped
early (non-finite steps, replica mismatch)."""


def _config_path(argv: list[str]) -> Optional[str]:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config_file(path: str):
  import importlib.util

  spec = importlib.util.spec_from_file_location("_dsv3_train_config", path.split(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _fields(cfg, prefix: str = "") -> list[str]:
  """'section.key = value' for every leaf of a ConfigDict."""
  out = []
  for key in sorted(cfg.keys()):
    v = cfg[key]
    if hasattr(v, "keys") and hasattr(v, "to_dict"):
      out += _fields(v, f"{prefix}{key}.")
    else:
      out.append(f"  {prefix}{key} = {v!r}")
  return out


def _help(argv: list[str]) -> None:
  path = _config_path(argv)
  print(USAGE)
  try:
    if path:
      cfg, name = _load_config_file(path), path
    else:
      from configs import tiny

      cfg, name = tiny.get_config(), "configs/tiny.py (the default shown; pass --config)"
    print(f"\nFields of {name}:")
    print("\n".join(_fields(cfg)))
  except Exception as e:  # noqa: BLE001 -- help must not fail on a broken config file
    print(f"\n(could not read the fields of {path}: {type(e).__name__}: {e})")


def _error_text(e: BaseException) -> str:
  """The readable message of an exception raised while parsing config overrides."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = str(e.args[0]) if e.args and isinstance(e.args[0], str) else str(e)
  return " ".join(text.split())


def _flag_error(e: BaseException) -> str:
  """One line for an override absl refused to parse; a non-boolean value of a boolean setting
  names the values absl's boolean flags take."""
  import re

  text = _error_text(e)
  m = re.match(r"flag (--config\.[^=]+)=(.*?): \('Non-boolean argument to boolean flag'", text)
  if m:
    return (f"{m.group(1)}={m.group(2)} is not a boolean; allowed: True, False (also true, "
            "false, 1, 0)")
  return text


def _override_error(e: BaseException, argv: list[str]) -> str:
  """One line for a bad --config.* override: the flag, the unknown key and the suggestion."""
  import re

  text = _error_text(e)
  m = re.match(r"'([^']+)'( Did you mean \"([^\"]+)\")?", text)
  key = m.group(1) if m else None
  flag = next((a for a in argv if a.startswith("--config.") and key and
               re.search(rf"[.]{re.escape(key)}([.=]|$)", a.split("=", 1)[0] + "=")), None)
  if m:
    hint = f" (did you mean {m.group(3)!r}?)" if m.group(3) else ""
    return (f"{flag or 'a --config override'}: there is no setting {key!r}{hint}; see "
            "dsv3-train --help for the fields")
  flag = next((a for a in argv if a.startswith("--config.")), "--config")
  return f"{text} (parsing {flag}; see dsv3-train --help)"


def run() -> None:
  from absl import flags
  from ml_collections import config_flags

  argv = list(sys.argv)
  if any(a in ("-h", "--help", "--helpshort", "-help") for a in argv[1:]):
    _config_root(argv)
    _help(argv)
    sys.exit(0)
  path = _config_path(argv)
  if path is None:
    print("dsv3-train: error: --config=CONFIG.py is required (e.g. configs/tiny.py); see "
          "dsv3-train --help", file=sys.stderr)
    sys.exit(2)
  if not os.path.isfile(path.split(":")[0]):
    print(f"dsv3-train: error: config file {path.split(':')[0]!r} not found (working directory "
          f"{os.getcwd()})", file=sys.stderr)
    sys.exit(2)
  _config_root(argv)
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                  lock_config=True)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    print(f"dsv3-train: error: {_flag_error(e)}; see dsv3-train --help", file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # noqa: BLE001 -- a bad override: KeyError, AttributeError, TypeError
    print(f"dsv3-train: error: {_override_error(e, argv)}", file=sys.stderr)
    sys.exit(2)
  if len(rest) > 1:
    print(f"dsv3-train: error: unexpected arguments {rest[1:]}; see dsv3-train --help",
          file=sys.stderr)
    sys.exit(2)
  main(rest)


if __name__ == "__main__":
  run()
