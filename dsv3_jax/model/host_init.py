"""Random Transformer weights drawn on the host with numpy, without the eager initialisers.

`Transformer(config, rngs=nnx.Rngs(0))` draws every parameter with an eager `jax.random`
call, and each new shape compiles a small XLA program: ~60 programs (~7 s of CPU here) for a
2-layer model with MTP, and in a multi-process run (experiments/pipeline_2048.py, 32
processes) each process would compile them again and keep ~100 MB of them resident.
`host_init` draws the same distributions with numpy into an abstract state
(`nnx.eval_shape`), identically on every process, ready for `jax.make_array_from_callback`.

Distributions (model/layers.py, moe.py, experts.py, norms.py): projections and experts
("kernel", "gate_proj", "up_proj", "down_proj") ~ N(0, initializer_range^2), the embedding
~ N(0, embedding_init_std^2), RMSNorm scales ("weight") 1, the router bias
("e_score_correction_bias", report §2.1.2) 0. The same distributions, not the same values.
"""

from __future__ import annotations

import jax
import numpy as np

from dsv3_jax.model.config import ModelConfig

_NORMAL = ("kernel", "gate_proj", "up_proj", "down_proj")  # N(0, initializer_range^2)


def _leaf_name(path) -> str:
  """The parameter's own name: the last key of its path that is not a Variable's `.value`."""
  for k in reversed(path):
    name = getattr(k, "key", getattr(k, "name", None))
    if name != "value":
      return str(name)
  raise ValueError(f"host_init: a leaf without a name at {jax.tree_util.keystr(path)}")


def host_init(config: ModelConfig, tree, seed: int = 0):
  """Numpy values for every leaf of `tree` (an abstract nnx.State, e.g. a split of
  `nnx.eval_shape(lambda: Transformer(config, ...))`, or its pure dict).

  Args:
    config: the model's config (initializer_range, embedding_init_std).
    tree: a pytree whose leaves have .shape and .dtype (ShapeDtypeStruct or arrays).
    seed: numpy's `default_rng` seed; the leaves draw the stream in the tree's flatten order.

  Returns:
    The same tree with host `np.ndarray` leaves of each leaf's shape and dtype.

  Raises:
    ValueError: a leaf whose name has no rule (the error names its path).
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape, dtype = _leaf_name(path), tuple(leaf.shape), leaf.dtype
    if name == "embed_tokens":
      return (rng.standard_normal(shape) * config.embedding_init_std).astype(dtype)
    if name in _NORMAL:
      return (rng.standard_normal(shape) * config.initializer_range).astype(dtype)
    if name == "weight":  # RMSNorm scale
      return np.ones(shape, dtype)
    if name == "e_score_correction_bias":
      return np.zeros(shape, dtype)
    raise ValueError(f"host_init: no rule for parameter {jax.tree_util.keystr(path)} "
                     f"(known: embed_tokens, {', '.join(_NORMAL)}, weight, "
                     "e_score_correction_bias)")

  return jax.tree_util.tree_map_with_path(draw, tree)
