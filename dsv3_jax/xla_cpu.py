"""XLA:CPU compiler options for the project's jitted programs.

jaxlib 0.10's XLA:CPU hands dots and reductions to YNNPACK by default. At this project's sizes
its own emitters are faster: the serving programs (decode-sized batched expert products,
results/serving.md, "XLA:CPU options") and the training step (the grouped expert GEMMs, the
attention and MLA projections at 8 x 256 tokens; results/benchmark_step.md compares the two in
the same paired rounds). Both compile with `NO_YNNPACK`; on other backends nothing changes.

LLVM runs at -O2 (`LLVM_O2`) instead of XLA's default -O3, for compile time: one
`benchmark_step.py --quick --no-torch` run compiled the one-device step in 6.8 s against 8.8 s,
and a clean-clone `make test` took 771 s of pytest against 882 s at -O3 (one run each). The step
itself may be a little slower: 567 against 573 ms in that quick run, but 611 against 586 ms
(median, 5 paired rounds, per-round ratios to PyTorch 0.73-0.91 and 0.81-0.88) in the full run
of results/benchmark_step.md, whose "LLVM -O3" variant is this A/B. The low bits of a result may
differ from -O3's; the whole suite passes at -O2. The train and serving steps compile with it
(`TRAIN_CPU_OPTIONS`, `SERVING_CPU_OPTIONS`); `dsv3-train` and the test session also set it for
every other program of the process (`XLA_FLAGS_O2` via `with_process_flags`).
"""

from __future__ import annotations

# DebugOptions.xla_cpu_experimental_ynn_fusion_type: the empty list = no op goes to YNNPACK.
NO_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}
# DebugOptions.xla_backend_optimization_level: LLVM's -O level (XLA's default 3).
LLVM_O2 = {"xla_backend_optimization_level": 2}
# The same for a whole process, as XLA_FLAGS (read when jax starts its backend).
XLA_FLAGS_O2 = ("--xla_backend_optimization_level=2",)


def append_flags(current: str, flags: tuple[str, ...]) -> str:
  """`current` (an XLA_FLAGS value) with each `--name=value` of `flags` appended unless
  `current` already sets that name (the caller's own value wins)."""
  have = flag_names(current)
  extra = [f for f in flags if f.split("=", 1)[0].lstrip("-") not in have]
  return " ".join([current] * bool(current) + extra)


def with_process_flags(current: str = "") -> str:
  """`append_flags(current, XLA_FLAGS_O2)`. Takes effect only when set before jax creates its
  backend; it applies to every backend's LLVM (XLA:GPU's too)."""
  return append_flags(current, XLA_FLAGS_O2)


def flag_names(flags: str) -> set[str]:
  """The DebugOptions field names an XLA_FLAGS value sets ("--a=1 --b" -> {"a", "b"})."""
  return {f.split("=", 1)[0].lstrip("-") for f in flags.split()}


def jit_options(options: dict) -> dict:
  """The compiler options `cpu_jit` passes: a copy of `options` (DebugOptions field -> value)
  without the fields the process's XLA_FLAGS sets now, whose values win (jax's per-jit
  `compiler_options` would otherwise override XLA_FLAGS)."""
  import os

  user = flag_names(os.environ.get("XLA_FLAGS", ""))
  return {k: v for k, v in options.items() if k not in user}


def cpu_jit(fn, options: dict, **kwargs):
  """`jax.jit(fn, **kwargs)`, compiled with XLA:CPU compiler options on a CPU backend.

  A field the process's XLA_FLAGS already sets is left out of the options (`jit_options`): the
  user's own value wins, as in `append_flags`; e.g. with
  `XLA_FLAGS=--xla_backend_optimization_level=3` dsv3-train compiles its train step at -O3.

  Args:
    fn, kwargs: as `jax.jit`.
    options: XLA DebugOptions fields to strings or values (e.g. `NO_YNNPACK`), passed as
      `compiler_options` when the default backend is CPU; {} (or a `compiler_options` in
      `kwargs`) compiles with XLA's defaults. Copied now, with XLA_FLAGS as it is now: later
      changes to either do nothing.

  Returns:
    The jitted function (lowering or calling it compiles with the options).
  """
  import jax

  options = jit_options(options)
  if jax.default_backend() == "cpu" and options:
    kwargs.setdefault("compiler_options", options)
  return jax.jit(fn, **kwargs)
