"""A randomly initialised Transformer without the eager initialisers' compile cost.

`Transformer(config, rngs=nnx.Rngs(0))` compiles a small program per new parameter shape (~7 s
of CPU for a 2-layer model with 2 MTP modules); `random_model` draws the same distributions
with numpy (`dsv3_jax.model.host_init`) into the model's abstract state (~0.2 s).
"""

import jax
from flax import nnx

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.host_init import host_init
from dsv3_jax.model.transformer import Transformer


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
  """A one-device Transformer of `config` with random weights drawn by numpy (`host_init`).

  Raises:
    ValueError: a parameter `host_init` has no rule for.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  values = host_init(config, nnx.to_pure_dict(state), seed)
  nnx.replace_by_pure_dict(state, jax.device_put(values))
  return nnx.merge(graphdef, state)
