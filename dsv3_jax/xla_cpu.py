"""XLA:CPU compiler options for the project's jitted programs.

jaxlib 0.10's XLA:CPU hands dots and reductions to YNNPACK by default. At this project's sizes
its own emitters are faster: the serving programs (decode-sized batched expert products,
results/serving.md, "XLA:CPU options") and the training step (the grouped expert GEMMs, the
attention and MLA projections at 8 x 256 tokens; results/benchmark_step.md compares the two in
the same paired rounds). Both compile with `NO_YNNPACK`; on other backends nothing changes.
"""

from __future__ import annotations

import jax

# DebugOptions.xla_cpu_experimental_ynn_fusion_type: the empty list = no op goes to YNNPACK.
NO_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}


def cpu_jit(fn, options: dict, **kwargs):
  """`jax.jit(fn, **kwargs)`, compiled with XLA:CPU compiler options on a CPU backend.

  Args:
    fn, kwargs: as `jax.jit`.
    options: XLA DebugOptions fields to strings or values (e.g. `NO_YNNPACK`), passed as
      `compiler_options` when the default backend is CPU; {} (or a `compiler_options` in
      `kwargs`) compiles with XLA's defaults. Copied now: later changes to the dict do nothing.

  Returns:
    The jitted function (lowering or calling it compiles with the options).
  """
  if jax.default_backend() == "cpu" and options:
    kwargs.setdefault("compiler_options", dict(options))
  return jax.jit(fn, **kwargs)
