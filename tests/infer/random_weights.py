"""A randomly initialised Transformer without the eager initialisers' compile cost.

`Transformer(config, rngs=nnx.Rngs(0))` draws every parameter with an eager jax.random call;
each new shape compiles a small program (~60 for a 2-layer model with 2 MTP modules: ~7 s of CPU
on this machine, more than the model's serving steps take to compile). `random_model` draws the
same distributions with numpy into the model's abstract state (~0.2 s).
"""

import jax
import numpy as np
from flax import nnx

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.transformer import Transformer

# Parameter leaf name -> how Transformer initialises it (model/layers.py, moe.py, norms.py)
_NORMAL = ("kernel", "gate_proj", "up_proj", "down_proj")  # N(0, initializer_range)


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
  """A one-device Transformer of `config` with random weights drawn by numpy.

  Projections and routed experts ~ N(0, initializer_range), the embedding ~
  N(0, embedding_init_std), RMSNorm scales 1, the router's e_score_correction_bias 0: the
  distributions of the model's own initialisers (not the same values).

  Raises:
    ValueError: a parameter this helper does not know how to initialise.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    shape, dtype = leaf.shape, leaf.dtype
    if name == "embed_tokens":
      return (rng.standard_normal(shape) * config.embedding_init_std).astype(dtype)
    if name in _NORMAL:
      return (rng.standard_normal(shape) * config.initializer_range).astype(dtype)
    if name == "weight":  # RMSNorm scale
      return np.ones(shape, dtype)
    if name == "e_score_correction_bias":
      return np.zeros(shape, dtype)
    raise ValueError(f"random_model: no rule for parameter {jax.tree_util.keystr(path)}")

  values = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, jax.device_put(values))
  return nnx.merge(graphdef, state)
