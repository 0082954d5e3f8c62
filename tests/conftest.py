"""Test session setup: 32 emulated CPU devices (a 4-node x 8-GPU mesh and its 8-device
sub-meshes run in-process); tests that need another device count start a subprocess."""

import os
import sys

N_DEVICES = 32
_flag = "--xla_force_host_platform_device_count"
if "jax" not in sys.modules:
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_flag))
  os.environ["XLA_FLAGS"] = f"{flags} {_flag}={N_DEVICES}".strip()
