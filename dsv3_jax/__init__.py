"""dsv3_jax: DeepSeek-V3's hardware-aware co-design, reproduced in JAX on emulated device meshes.

Importing the top-level package does not import jax, so that entry points can set
``XLA_FLAGS=--xla_force_host_platform_device_count`` first (see `dsv3_jax.parallel.mesh`).
"""

__version__ = "0.1.0"
