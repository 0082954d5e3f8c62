"""The FP8 linear of DeepSeek-V3 (report §3.3, Figure 6): `Fp8Recipe`, `gemm`, `fp8_matmul`.

Forward Fprop and the backward Dgrad / Wgrad GEMMs run on 1x128-tile activations and 128x128-block
weights quantized by `dsv3_jax.quant.fp8` (custom VJP), accumulated in float32 or through the
emulated tensor-core accumulator of `dsv3_jax.quant.accumulation`. Re-exported by
`dsv3_jax.quant.fp8`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from dsv3_jax.vma import match_varying_axes

from dsv3_jax.quant.accumulation import _accumulate_dot, _check_accumulator
from dsv3_jax.quant.fp8 import (FP8_FORMATS, _check_float_array, _check_positive_int, qdq_blocks,
                               qdq_tiles)


# ------------------------------------------------------------------------------------------
# FP8 linear.


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
  """Settings of `fp8_matmul` (hashable; pass it as a static argument).

  Attributes:
    fmt_forward: format of the forward activation and weight, "e4m3" (report) or "e5m2".
    fmt_backward: format of the output gradient, "e4m3" (report: E4M3 on all tensors, made
      possible by the fine-grained scaling) or "e5m2" (the usual hybrid recipe).
    tile: activation / gradient tile length along the contraction dimension (1 x 128).
    block: weight block edge (128 x 128).
    pow2_scale: power-of-two scales everywhere.
    accumulator_mantissa_bits: `None` = exact FP32 accumulation of the FP8 products (the
      fast path); an int emulates the tensor-core accumulator with that many fraction bits
      (13 = FP22, arXiv 2505.09343 §3.1) via `accumulate_dot` in all three GEMMs.
    promotion_interval: N_C, products per promotion to FP32 (report: 128; `None` = never);
      used only when `accumulator_mantissa_bits` is set.
    accumulator_group: products aligned together per accumulator update (32 = one FP8 WGMMA).
    accumulator_rounding: "truncate" (hardware) or "nearest".

  Raises:
    ValueError: from __init__ if any field is outside its allowed values.
  """

  fmt_forward: str = "e4m3"
  fmt_backward: str = "e4m3"
  tile: int = 128
  block: int = 128
  pow2_scale: bool = False
  accumulator_mantissa_bits: Optional[int] = None
  promotion_interval: Optional[int] = 128
  accumulator_group: int = 32
  accumulator_rounding: str = "truncate"

  def __post_init__(self):
    if self.fmt_forward not in FP8_FORMATS:
      raise ValueError(
          f"fmt_forward must be one of {sorted(FP8_FORMATS)}, got {self.fmt_forward!r}")
    if self.fmt_backward not in FP8_FORMATS:
      raise ValueError(
          f"fmt_backward must be one of {sorted(FP8_FORMATS)}, got {self.fmt_backward!r}")
    _check_positive_int(self.tile, "tile")
    _check_positive_int(self.block, "block")
    if not isinstance(self.pow2_scale, bool):
      raise ValueError(f"pow2_scale must be a bool, got {self.pow2_scale!r}")
    if self.accumulator_mantissa_bits is not None:
      _check_accumulator(self.accumulator_mantissa_bits, self.promotion_interval,
                         self.accumulator_group, self.accumulator_rounding)
    elif self.promotion_interval is not None:
      _check_positive_int(self.promotion_interval, "promotion_interval")


def gemm(a: jax.Array, b: jax.Array, recipe: Fp8Recipe) -> jax.Array:
  """a [M, K] @ b [K, N] -> [M, N] float32 with the recipe's accumulation (the FP8 GEMM core).

  a and b must be quantize-dequantized values of the recipe (as every caller passes). With
  power-of-two scales such a value is an FP8 number times 2^k: at most 4 significant bits, so
  it is exactly a bfloat16 number, and the bfloat16 x bfloat16 product accumulated in float32
  is the same computation as the float32 dot (exact products, float32 sums), done on the
  CPU's BF16 matrix units where it has them (about 4x faster than a float32 dot on AMX).
  """
  if recipe.accumulator_mantissa_bits is None:
    if recipe.pow2_scale:
      return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                     preferred_element_type=jnp.float32)
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
  return _accumulate_dot(a, b, recipe.accumulator_mantissa_bits, recipe.promotion_interval,
                         recipe.accumulator_group, recipe.accumulator_rounding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul(x, w, recipe):
  return _fp8_matmul_fwd(x, w, recipe)[0]


def _fp8_matmul_fwd(x, w, recipe):
  k, n = w.shape
  xd = qdq_tiles(x.astype(jnp.float32).reshape(-1, k), tile=recipe.tile,
                 fmt=recipe.fmt_forward, pow2_scale=recipe.pow2_scale)  # [T, K]
  wd = qdq_blocks(w.astype(jnp.float32), block=recipe.block, fmt=recipe.fmt_forward,
                  pow2_scale=recipe.pow2_scale)  # [K, N]
  y = gemm(xd, wd, recipe).reshape(*x.shape[:-1], n).astype(x.dtype)
  # The residuals are the dequantized FP8 activation and weight, held in float32: the same
  # numbers as the report's cached FP8 codes + scales (the memory saving is not emulated).
  # The zero-size arrays carry the primal dtypes.
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return y, (xd, wd, dtypes)


def _fp8_matmul_bwd(recipe, residuals, g):
  xd, wd, (x_like, w_like) = residuals
  n = wd.shape[1]
  lead = g.shape[:-1]
  g2 = g.reshape(-1, n).astype(jnp.float32)  # [T, N]
  q = functools.partial(qdq_tiles, tile=recipe.tile, pow2_scale=recipe.pow2_scale)
  # dgrad dX = dY W^T, contraction over N: dY in 1 x tile tiles along N, the forward's FP8 W.
  dx = gemm(q(g2, fmt=recipe.fmt_backward), wd.T, recipe)
  # wgrad dW = X^T dY, contraction over the T tokens: the cached FP8 activation is
  # dequantized and re-quantized in tiles along T (the 128x1 tiles of the report's §3.5.2
  # transposed-GEMM discussion), and dY is quantized in tiles along T as well.
  xq_t = q(xd, fmt=recipe.fmt_forward, axis=0)  # [T, K]
  gq_t = q(g2, fmt=recipe.fmt_backward, axis=0)  # [T, N]
  dw = gemm(xq_t.T, gq_t, recipe)
  return dx.reshape(*lead, wd.shape[0]).astype(x_like.dtype), dw.astype(w_like.dtype)


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def fp8_matmul(x, w, recipe: Optional[Fp8Recipe] = None) -> jax.Array:
  """FP8 linear y = x @ w with the DeepSeek-V3 fine-grained recipe (report §3.3, Figure 6).

  Forward: x is quantized in 1 x tile tiles along K, w in block x block blocks, and the
  product of the dequantized values is accumulated in FP32 (or in the emulated tensor-core
  accumulator with promotion every N_C products, see `Fp8Recipe`). Backward (`custom_vjp`):
  the output gradient dY is quantized in 1 x tile tiles along N for dgrad (dX = dY W^T, with
  the forward's FP8 weight), and the cached FP8 activation and dY are quantized in tiles along
  the token dimension for wgrad (dW = X^T dY). Gradients come back in the primal dtypes, so a
  float32 master weight gets a float32 gradient and the optimizer never sees FP8.

  Args:
    x: [..., K] float activations (any leading dims are tokens).
    w: [K, N] float weight (typically float32 master weight).
    recipe: `Fp8Recipe`; default `Fp8Recipe()` (E4M3, 128 tiles/blocks, FP32 accumulation).

  Returns:
    y: [..., N] in x.dtype.

  Raises:
    ValueError: if shapes mismatch (w not 2-D or K differs) or dtypes are not floating.
  """
  recipe = Fp8Recipe() if recipe is None else recipe
  if not isinstance(recipe, Fp8Recipe):
    raise ValueError(f"recipe must be an Fp8Recipe or None, got {type(recipe).__name__}")
  x = _check_float_array(x, "x", 1)
  w = _check_float_array(w, "w", 2)
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"x [..., K] and w [K, N] must agree on K, got {x.shape} and {w.shape}")
  x, w = match_varying_axes(x, w)
  return _fp8_matmul(x, w, recipe)
