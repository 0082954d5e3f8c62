"""RMSNorm (Zhang & Sennrich 2019) as used throughout DeepSeek-V3."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """weight * x / sqrt(mean(x^2) + eps), computed in float32, returned in x.dtype.

  Matches Hugging Face `DeepseekV3RMSNorm`: eps is inside the square root, the
  normalisation runs in float32 and the result is cast back before the weight multiplies.

  Args:
    x: [..., dim] any float dtype.
    weight: [dim] float32 scale.
    eps: added to the mean square before the reciprocal square root.
  """
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  normed = (x32 * jax.lax.rsqrt(variance + eps)).astype(dtype)
  return weight.astype(dtype) * normed


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learned float32 `weight` [dim] (initialised to ones)."""

  def __init__(self, dim: int, *, eps: float = 1e-6):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps)
