"""`dsv3-train`: the config-driven training entry point.

    dsv3-train --config=configs/orion_4x8.py [--config.train.steps=200 ...]

The emulated device count (mesh.nodes x mesh.gpus_per_node) is set from the config before jax
is imported, so this module must not import jax at module level.
"""

from __future__ import annotations

import os
import sys


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
  from dsv3_jax.parallel.mesh import set_host_device_count

  set_host_device_count(cfg.mesh.nodes * cfg.mesh.gpus_per_node)
  from dsv3_jax.train import trainer  # imports jax with the device count in place

  try:
    trainer.train(cfg)
  except (ValueError, FileNotFoundError) as e:
    print(f"dsv3-train: error: {e}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  from absl import app, flags
  from ml_collections import config_flags

  _config_root(sys.argv)
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                  lock_config=True)
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
