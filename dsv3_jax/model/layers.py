"""Linear layers and the SiLU-gated MLP shared by attention, dense layers and experts.

With an `Fp8Recipe` a Linear runs its GEMM through `quant.fp8.fp8_matmul` (DeepSeek-V3 report
§3.3.2: 1 x 128 activation tiles, 128 x 128 weight blocks, output gradients in 1 x 128 tiles in
the backward pass); the float32 master kernel and its float32 gradient are unchanged.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.model import capture
from dsv3_jax.quant.fp8 import Fp8Recipe, fp8_matmul


def normal_init(std: float):
  return jax.nn.initializers.normal(stddev=std)


class Linear(nnx.Module):
  """y = x @ kernel, no bias (every DeepSeek-V3 projection is bias-free).

  The kernel is stored float32 as [in_features, out_features] (the transpose of a torch
  `nn.Linear.weight`); the matmul runs in `dtype`, or, with `fp8_recipe` set, in FP8 with
  fine-grained scaling (`quant.fp8.fp8_matmul`; output in `dtype`, kernel gradient float32).

  Capture points (`model.capture`, active inside `nnx.capture` only): the input is sown as
  "input", the output carries the perturbation "output" (its gradient is dL/dy).
  """

  def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32,
               init_std: float = 0.02, fp8_recipe: Optional[Fp8Recipe] = None,
               rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.fp8_recipe = fp8_recipe
    self.kernel = nnx.Param(normal_init(init_std)(rngs.params(), (in_features, out_features),
                                                  jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in_features] -> [..., out_features] in `dtype`."""
    # Flattened to 2-D: XLA:CPU runs the weight gradient of a 3-D dot (two contracted dims)
    # ~2.5x slower than the same product written as one [tokens, in] x [in, out] matmul.
    lead = x.shape[:-1]
    x2 = x.reshape(-1, self.in_features).astype(self.dtype)
    if self.fp8_recipe is not None:
      y = fp8_matmul(x2, self.kernel[...], self.fp8_recipe)
    else:
      y = jnp.dot(x2, self.kernel[...].astype(self.dtype))
    capture.sow(self, "input", x)
    return capture.perturb(self, "output", y.reshape(lead + (self.out_features,)))


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (dense layers and shared experts).

  `fp8_recipe` (None = `dtype` matmuls) applies to all three projections.
  """

  def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=jnp.float32,
               init_std: float = 0.02, fp8_recipe: Optional[Fp8Recipe] = None,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, init_std=init_std, fp8_recipe=fp8_recipe, rngs=rngs)
    self.gate_proj = Linear(hidden_size, intermediate_size, **kw)
    self.up_proj = Linear(hidden_size, intermediate_size, **kw)
    self.down_proj = Linear(intermediate_size, hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., hidden] -> [..., hidden]."""
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
