"""Rotary position embedding (RoPE) with DeepSeek's decoupled key and YaRN extension.

Sources: RoFormer (Su et al. 2021); YaRN (Peng et al. 2023, arXiv 2309.00071); DeepSeek-V2
§2.1.3 (decoupled RoPE) and DeepSeek-V3 report §4.3 (YaRN, s = 40, alpha = 1, beta = 32,
sqrt(t) = 0.1 ln s + 1). Frequencies and scales follow Hugging Face transformers'
`_compute_default_rope_parameters` / `_compute_yarn_parameters` and `DeepseekV3Attention`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.model.config import ModelConfig, yarn_get_mscale


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies and cos/sin amplitude for the rotary part of q and k.

  Returns:
    inv_freq: [qk_rope_head_dim // 2] float32, radians per position.
    attention_scaling: amplitude applied to cos and sin; 1 without YaRN, otherwise
      mscale(s, mscale) / mscale(s, mscale_all_dim) (YaRN's sqrt(t) split between the
      rotary amplitude and the softmax scale, as in DeepSeek's release).
  """
  dim = config.qk_rope_head_dim
  base = config.rope_theta
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  inv_freq = 1.0 / pos_freqs
  rs = config.rope_scaling
  if rs is None:
    return inv_freq.astype(np.float32), 1.0

  def correction_dim(num_rotations: float) -> float:
    # Dimension at which the wavelength makes `num_rotations` turns over the original context.
    return (dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi))
            / (2 * math.log(base)))

  low = max(math.floor(correction_dim(rs.beta_fast)), 0)
  high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  extrapolation_weight = 1.0 - ramp  # 1: keep the original frequency (high-frequency dims)
  inv_freq = (inv_freq / rs.factor) * (1.0 - extrapolation_weight) + inv_freq * extrapolation_weight
  if rs.mscale and rs.mscale_all_dim:
    scaling = yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
  else:
    scaling = yarn_get_mscale(rs.factor)
  return inv_freq.astype(np.float32), float(scaling)


def softmax_scale(config: ModelConfig) -> float:
  """The attention logit scale: qk_head_dim^-1/2, times mscale(s, mscale_all_dim)^2 under YaRN."""
  scale = config.qk_head_dim ** -0.5
  rs = config.rope_scaling
  if rs is not None and rs.mscale_all_dim:
    m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    scale = scale * m * m
  return scale


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array,
                 attention_scaling: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables.

  Args:
    positions: [...] integer positions.
    inv_freq: [rope_dim // 2] float32.
    attention_scaling: amplitude multiplying both tables.

  Returns:
    cos, sin: [..., rope_dim // 2] float32.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  return jnp.cos(angles) * attention_scaling, jnp.sin(angles) * attention_scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleave: bool) -> jax.Array:
  """Rotates pairs of x by the position angles.

  With `interleave` the pairs are (x[2i], x[2i+1]) (DeepSeek's layout); otherwise
  (x[i], x[i + d/2]) (rotate-half). Either way the output is returned in rotate-half layout
  [rotated firsts | rotated seconds], which is what Hugging Face returns for both; q.k is the
  same in any layout as long as q and k share it.

  Args:
    x: [batch, seq, heads, rope_dim].
    cos, sin: [seq, rope_dim // 2] or [batch, seq, rope_dim // 2] float32.

  Returns:
    [batch, seq, heads, rope_dim] in x.dtype. Norm-preserving (when the amplitude is 1) and
    q.k depends on positions only through their difference.
  """
  if interleave:
    a, b = x[..., 0::2], x[..., 1::2]
  else:
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
  cos = cos[..., None, :]  # broadcast over heads
  sin = sin[..., None, :]
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  out = jnp.concatenate([a32 * cos - b32 * sin, b32 * cos + a32 * sin], axis=-1)
  return out.astype(x.dtype)
