"""Opt-in capture of intermediate values: `nnx.Module.sow` and `perturb`, under `nnx.capture` only.

Modules record what analysis scripts read (experiments/quant_error.py) with `sow(self, name, x)`
and mark the values whose gradients they want with `y = perturb(self, name, y)`. Inside
`nnx.capture(fn, nnx.Intermediate, ..., init=perturbations)` these store `x` in the returned
`nnx.Intermediate` state and add a zero `nnx.Perturbation` to `y` (the gradient with respect to
the perturbation is dL/dy). Outside a capture both do nothing: a plain forward pass adds no
variables to the module, so its state (`nnx.split`, checkpoints) and the jitted training step
are exactly those of a model without capture points. (Flax's own `Module.sow` outside
`nnx.capture` would store the value as a new module attribute, and is deprecated.)

Capture runs the model outside `jax.shard_map` (e.g. restored on one device); values recorded
inside a shard_map body would be per-device tracers.
"""

from __future__ import annotations

from typing import Any, TypeVar

from flax import nnx

T = TypeVar("T")


def capturing(module: nnx.Module) -> bool:
  """True while `module` runs inside `nnx.capture` (which gives every module `__captures__`)."""
  return hasattr(module, "__captures__")


def sow(module: nnx.Module, name: str, value: Any) -> None:
  """Records `value` under `name` (an `nnx.Intermediate`; a tuple, one entry per call) when
  inside `nnx.capture`; does nothing otherwise."""
  if capturing(module):
    module.sow(nnx.Intermediate, name, value)


def perturb(module: nnx.Module, name: str, value: T) -> T:
  """`value` plus the `nnx.Perturbation` `name` when inside a capture that holds perturbations
  (zeros, so the result equals `value`; its gradient is the gradient of `value`); `value`
  itself otherwise."""
  return module.perturb(name, value) if capturing(module) else value
