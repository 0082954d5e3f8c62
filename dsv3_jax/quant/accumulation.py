"""Emulated limited-precision tensor-core accumulation of FP8 GEMMs (DeepSeek-V3 report §3.3.2).

The H800 tensor cores keep about 14 bits of each partial sum (FP22: 1 sign, 8 exponent, 13
mantissa bits; "Insights into DeepSeek-V3", arXiv 2505.09343 §3.1); DeepSeek-V3 promotes the
partial sums to FP32 on the CUDA cores every N_C = 128 products. `accumulate_dot` emulates that
model bit by bit in float32 (results/fp8_accumulation.md); `dsv3_jax.quant.fp8` re-exports it.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


from dsv3_jax.quant.fp8 import _check_float_array, _check_positive_int

ACCUMULATOR_ROUNDINGS = ("truncate", "nearest")

# ------------------------------------------------------------------------------------------
# Limited-precision tensor-core accumulation.


def _exponent(v: jax.Array) -> jax.Array:
  """floor(log2|v|) of float32 `v` as int32, read from the bits; zeros (and, as XLA:CPU
  flushes them, subnormals) give -1000 so they never set a group's maximum exponent."""
  biased = (jax.lax.bitcast_convert_type(v, jnp.int32) >> 23) & 0xFF
  return jnp.where(biased == 0, -1000, biased - 127)


def _round_int_to_bits(a: jax.Array, bits: int, rounding: str) -> jax.Array:
  """Rounds non-negative int32 `a` to its `bits` most significant bits (toward zero, or to
  nearest with ties to even); the result has at most `bits` significant bits."""
  nbits = 32 - jax.lax.clz(a)
  shift = jnp.maximum(nbits - bits, 0)
  r = a >> shift
  if rounding == "nearest":
    rem = a - (r << shift)
    half = jnp.where(shift > 0, 1 << jnp.maximum(shift - 1, 0), 1)
    up = (shift > 0) & ((rem > half) | ((rem == half) & ((r & 1) == 1)))
    r = r + up.astype(jnp.int32)
  return r << shift


def _tensor_core_group_add(acc: jax.Array, products: jax.Array, mantissa_bits: int,
                           rounding: str) -> jax.Array:
  """One accumulator update: acc [M, N] + sum of products [M, G, N], in the FP22-like model.

  All G + 1 addends are aligned to the largest exponent E among them and cut to multiples of
  2^(E - mantissa_bits) (toward zero, or to nearest), summed exactly as integers, and the sum
  is rounded to `mantissa_bits` fraction bits. See `accumulate_dot`.
  """
  emax = jnp.maximum(jnp.max(_exponent(products), axis=1), _exponent(acc))
  emax = jnp.maximum(emax, -126 + mantissa_bits)  # all-zero group: keep the quantum normal
  qexp = emax - mantissa_bits  # weight of the last retained bit
  cut = jnp.trunc if rounding == "truncate" else jnp.round

  def to_int(v, qe):
    return cut(jnp.ldexp(v, -qe)).astype(jnp.int32)  # |.| <= 2^(mantissa_bits + 1)

  total = jnp.sum(to_int(products, qexp[:, None, :]), axis=1) + to_int(acc, qexp)
  mag = _round_int_to_bits(jnp.abs(total), mantissa_bits + 1, rounding)
  return jnp.ldexp(jnp.sign(total).astype(jnp.float32) * mag.astype(jnp.float32), qexp)


def _check_accumulator(mantissa_bits, promotion_interval, group, rounding) -> None:
  """Validates the `accumulate_dot` settings (mantissa_bits must not be None here)."""
  if (isinstance(mantissa_bits, bool) or not isinstance(mantissa_bits, (int, np.integer))
      or not 1 <= mantissa_bits <= 23):
    raise ValueError(f"mantissa_bits must be None or an int in [1, 23], got {mantissa_bits!r}")
  group = _check_positive_int(group, "group")
  if promotion_interval is not None:
    promotion_interval = _check_positive_int(promotion_interval, "promotion_interval")
    if promotion_interval % group:
      raise ValueError(f"promotion_interval must be None or a multiple of group={group}, "
                       f"got {promotion_interval}")
  if rounding not in ACCUMULATOR_ROUNDINGS:
    raise ValueError(f"rounding must be one of {ACCUMULATOR_ROUNDINGS}, got {rounding!r}")


def accumulate_dot(a, b, *, mantissa_bits: Optional[int], promotion_interval: Optional[int],
                   group: int = 32, rounding: str = "truncate") -> jax.Array:
  """Matmul a @ b whose partial sums live in a limited-precision accumulator (report §3.3.2).

  Accumulator model (FP22-like, after arXiv 2505.09343 §3.1: "after aligning 32 mantissa
  products by right-shifting based on the maximum exponent, the Tensor Core only uses their
  highest 13 fraction bits for addition, and truncates bits exceeding this range; addition
  results are accumulated to FP22 registers (1 sign, 8 exponent, 13 mantissa bits)"):

  1. The K products a[m, k] * b[k, n] are formed exactly in float32 (an FP8 x FP8 product has
     at most 8 significant bits; with non power-of-two scales the dequantized product carries
     a 2^-24 relative rounding, far below the accumulator's 2^-13).
  2. They are consumed in groups of `group` consecutive k (32 = the K of one Hopper FP8
     WGMMA instruction). For each group, the group's products and the running accumulator
     are aligned to the largest exponent E among them, and every addend keeps only the bits
     down to 2^(E - mantissa_bits): truncated toward zero (`rounding="truncate"`, the
     hardware behaviour described above) or rounded to nearest-even ("nearest"). The aligned
     addends are summed exactly (int32), and the sum is rounded the same way to
     `mantissa_bits` fraction bits, giving the new accumulator (exponent range of float32).
  3. Every `promotion_interval` products (N_C), the accumulator is added to an FP32
     accumulator (ordinary float32 add, round to nearest) and reset to zero: the report's
     promotion to CUDA-core FP32 registers. `None` never promotes: the whole K stays in the
     limited accumulator, and the last partial result is returned in float32.

  Why this model: it is the ISCA paper's description taken literally (the accumulator joins the
  alignment, as Fasi et al. 2021 measured for earlier tensor cores), and it has the two
  mechanisms that make the error grow with K: (a) as the accumulator grows, the incoming
  products' low bits fall below its last retained bit and are dropped; (b) truncation is biased
  toward zero, so for same-sign products the loss of about half a unit in the last place per
  group adds up linearly in K, while for random-sign products it grows roughly as sqrt(K).
  Measured at K = 4096 (results/fp8_accumulation.md): mean relative error 0.24% (max 4%) for
  N(0, 1) inputs, 8% for U[0, 1) inputs, around the report's "maximum relative error of nearly
  2%" (the report's "about 14 retained bits" = 13 fraction bits + the leading one); with
  promotion every 128, about 0.06% and 0.2%. `group=1` gives the simpler
  truncate-after-every-add model (nearly the same numbers).

  Cost: a `lax.scan` over K / group steps, each materialising [M, group, N] float32 products;
  use it for experiments and small layers, not as the default training path.

  Args:
    a: [..., K] float (any float dtype; computed in float32).
    b: [K, N] float.
    mantissa_bits: fraction bits retained by the accumulator, 1..23 (13 = FP22); `None` for
      an exact float32 dot (`jnp.dot`, precision HIGHEST), ignoring the other options.
    promotion_interval: N_C, products per promotion to FP32 (a positive multiple of
      `group`), or `None` for no promotion.
    group: products aligned and added together per accumulator update (positive int).
    rounding: "truncate" (toward zero) or "nearest" (ties to even).

  Returns:
    [..., N] float32.

  Raises:
    ValueError: on mismatched shapes or any argument outside the ranges above.
  """
  a = _check_float_array(a, "a", 1)
  b = _check_float_array(b, "b", 2)
  if b.ndim != 2 or a.shape[-1] != b.shape[0]:
    raise ValueError(f"a [..., K] and b [K, N] must agree on K, got {a.shape} and {b.shape}")
  if mantissa_bits is None:
    return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  _check_accumulator(mantissa_bits, promotion_interval, group, rounding)
  return _accumulate_dot(a, b, int(mantissa_bits),
                         None if promotion_interval is None else int(promotion_interval),
                         int(group), rounding)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _accumulate_dot(a, b, mantissa_bits, promotion_interval, group, rounding):
  *lead, k = a.shape
  n = b.shape[1]
  a2 = a.reshape(-1, k).astype(jnp.float32)
  b2 = b.astype(jnp.float32)
  n_groups = -(-k // group)
  if n_groups * group != k:  # zero products change neither a sum nor a maximum exponent
    a2 = jnp.pad(a2, [(0, 0), (0, n_groups * group - k)])
    b2 = jnp.pad(b2, [(0, n_groups * group - k), (0, 0)])
  a_g = a2.reshape(-1, n_groups, group).transpose(1, 0, 2)  # [n_groups, M, group]
  b_g = b2.reshape(n_groups, group, n)  # [n_groups, group, N]
  per_promotion = None if promotion_interval is None else promotion_interval // group

  def step(carry, inputs):
    fp32, acc, i = carry
    a_i, b_i = inputs
    acc = _tensor_core_group_add(acc, a_i[:, :, None] * b_i[None, :, :], mantissa_bits,
                                 rounding)
    if per_promotion is not None:
      promote = (i + 1) % per_promotion == 0
      fp32 = jnp.where(promote, fp32 + acc, fp32)
      acc = jnp.where(promote, 0.0, acc)
    return (fp32, acc, i + 1), None

  zeros = jnp.zeros((a2.shape[0], n), jnp.float32)
  (fp32, acc, _), _ = jax.lax.scan(step, (zeros, zeros, jnp.int32(0)), (a_g, b_g))
  return (fp32 + acc).reshape(*lead, n)
