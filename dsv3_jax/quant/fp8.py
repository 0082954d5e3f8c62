"""Fine-grained FP8 quantize-dequantize ops and an FP8 linear (DeepSeek-V3 report §3.3).

The recipe of the DeepSeek-V3 technical report (arXiv 2412.19437, §3.3.2, Figure 7):

* activations and activation gradients are scaled per 1x128 *tile* (one scale per token per
  128 channels of the contraction dimension); weights per 128x128 *block*;
* each scale comes from the online max-abs of its tile/block, so the largest magnitude maps to
  the largest finite value of the format (448 for E4M3, 57344 for E5M2);
* the FP8 GEMM accumulates partial sums in the tensor cores' limited-precision accumulator
  (about 14 retained bits on H800, report §3.3.2; FP22 = 1 sign, 8 exponent, 13 mantissa bits,
  "Insights into DeepSeek-V3", arXiv 2505.09343 §3.1) and *promotes* them to FP32 registers on
  the CUDA cores every N_C = 128 products, where the per-group scales are applied.

All functions here are pure `jax.numpy` (jitted, with the format and sizes static) and run
under `jit`, `vmap` and `shard_map`. `quantize_*` return real `float8_e4m3fn` / `float8_e5m2`
arrays (XLA's cast, round to nearest even, after clipping); `qdq_*` and `fp8_matmul` round to the
same FP8 grid with a bit-exact float32 emulation (`round_to_fp8_grid`, ~4x faster than the cast
on XLA:CPU). The matmuls run on the dequantized values in float32 (what FP8 x FP8 products summed
in FP32 compute exactly), or through `accumulate_dot`, which emulates the tensor-core
accumulator under the model documented there.

Inputs are assumed finite: an Inf or NaN in a tile makes that tile's scale non-finite.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


# name -> (dtype, largest finite magnitude). E4M3 is the OCP "fn" variant (no Inf, max 448).
FP8_FORMATS = {
    "e4m3": (jnp.float8_e4m3fn, 448.0),
    "e5m2": (jnp.float8_e5m2, 57344.0),
}
_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32, 2^-126
_F32_MAX = float(np.finfo(np.float32).max)


def _dequant(q32: jax.Array, scale: jax.Array) -> jax.Array:
  # q * s can exceed the float32 range by rounding alone: amax = 3.4e38 with a power-of-two
  # scale 2^120 quantizes to q = 256 (rounded up from 255.9), and 256 * 2^120 = 2^128 = inf.
  # Saturate instead.
  return jnp.clip(q32 * scale, -_F32_MAX, _F32_MAX)


def fp8_format(fmt: str) -> tuple[jnp.dtype, float]:
  """Returns (dtype, max finite value) of an FP8 format name.

  Args:
    fmt: "e4m3" (`float8_e4m3fn`, max 448) or "e5m2" (`float8_e5m2`, max 57344).

  Raises:
    ValueError: if `fmt` is not one of those names.
  """
  if fmt not in FP8_FORMATS:
    raise ValueError(f"fmt must be one of {sorted(FP8_FORMATS)}, got {fmt!r}")
  return FP8_FORMATS[fmt]


def _check_positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def _check_float_array(x, name: str, min_ndim: int) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
  if x.ndim < min_ndim:
    raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {x.shape}")
  return x


def _scale_from_amax(amax: jax.Array, fmax: float, pow2_scale: bool) -> jax.Array:
  """Per-group dequantization scale s with amax / s <= fmax; float32, finite, > 0.

  An all-zero group gets s = 1 (its values quantize to 0). s is floored at the smallest normal
  float32 so that x / s never divides by zero (an amax below ~1e-36 then quantizes lossily,
  but finitely). With `pow2_scale`, s = 2^ceil(log2(amax / fmax)) computed exactly from the
  binary exponent (no log2 rounding), so amax / s lies in (fmax / 2, fmax].
  """
  ratio = (amax / fmax).astype(jnp.float32)
  if pow2_scale:
    # Round up to a power of two on the bits: keep an exact power, else bump the exponent and
    # clear the mantissa. (Subnormal ratios are floored to 2^-126 below anyway.)
    bits = jax.lax.bitcast_convert_type(ratio, jnp.uint32)
    biased_exp = bits >> 23
    up = jax.lax.bitcast_convert_type((biased_exp + 1) << 23, jnp.float32)
    ratio = jnp.where((bits & 0x7FFFFF) == 0, ratio, up)
  scale = jnp.where(amax > 0, ratio, 1.0)
  return jnp.maximum(scale, _F32_TINY).astype(jnp.float32)


def _cast_fp8(scaled: jax.Array, dtype, fmax: float) -> jax.Array:
  # Clip first: a plain cast of 465 to float8_e4m3fn is NaN, not 448 (no saturation in XLA).
  return jnp.clip(scaled, -fmax, fmax).astype(dtype)


@functools.partial(jax.jit, static_argnames=("tile", "fmt", "pow2_scale"))
def quantize_tiles(x, *, tile: int = 128, fmt: str = "e4m3", pow2_scale: bool = False):
  """Tile-wise FP8 quantization: one scale per 1 x `tile` group along the last axis.

  The activation / activation-gradient scaling of the DeepSeek-V3 report §3.3.2 (Figure 7a):
  the last axis is the GEMM contraction dimension. A last axis that is not a multiple of
  `tile` gets a ragged last tile whose scale comes from its own elements only (zero padding
  does not change a max-abs), so it is never mis-scaled.

  Args:
    x: [..., K] any float dtype; must be finite.
    tile: tile length along the last axis (positive int).
    fmt: "e4m3" or "e5m2".
    pow2_scale: round each scale up to a power of two (exact dequantization multiply;
      used for the FP8 dispatch payload, report §3.3.2 / DeepEP).

  Returns:
    (q, scale): q [..., K] in the FP8 dtype; scale [..., ceil(K / tile)] float32 with
    x ~= q * scale (broadcast over each tile). Values are clipped to +-max (448 / 57344)
    before the cast; an all-zero tile gives scale 1 and q = 0.

  Raises:
    ValueError: bad `fmt`, non-positive `tile`, non-float or 0-d `x`.
  """
  dtype, fmax = fp8_format(fmt)
  tile = _check_positive_int(tile, "tile")
  x = _check_float_array(x, "x", 1)
  *lead, k = x.shape
  nt = -(-k // tile)
  x32 = x.astype(jnp.float32)
  if nt * tile != k:
    x32 = jnp.pad(x32, [(0, 0)] * len(lead) + [(0, nt * tile - k)])
  xt = x32.reshape(*lead, nt, tile)
  scale = _scale_from_amax(jnp.max(jnp.abs(xt), axis=-1), fmax, pow2_scale)
  q = _cast_fp8(xt / scale[..., None], dtype, fmax).reshape(*lead, nt * tile)
  return q[..., :k], scale


@functools.partial(jax.jit, static_argnames=("tile", "dtype"))
def dequantize_tiles(q, scale, *, tile: int = 128, dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize_tiles`: x = q * scale per 1 x `tile` group of the last axis.

  Args:
    q: [..., K] FP8 (or any float) values.
    scale: [..., ceil(K / tile)] float32 scales.
    tile: the tile length used to quantize.
    dtype: output dtype.

  Returns:
    [..., K] in `dtype` (the product is formed in float32, saturated to the float32 range --
    rounding up near the float32 maximum could otherwise give Inf -- then cast).

  Raises:
    ValueError: if `scale`'s shape is not q.shape[:-1] + (ceil(K / tile),), or `tile` is bad.
  """
  tile = _check_positive_int(tile, "tile")
  q = jnp.asarray(q)
  scale = jnp.asarray(scale)
  *lead, k = q.shape
  nt = -(-k // tile)
  if scale.shape != (*lead, nt):
    raise ValueError(
        f"scale must have shape {(*lead, nt)} for q {q.shape} and tile {tile}, got {scale.shape}")
  q32 = q.astype(jnp.float32)
  if nt * tile != k:
    q32 = jnp.pad(q32, [(0, 0)] * len(lead) + [(0, nt * tile - k)])
  x = _dequant(q32.reshape(*lead, nt, tile), scale.astype(jnp.float32)[..., None])
  return x.reshape(*lead, nt * tile)[..., :k].astype(dtype)


@functools.partial(jax.jit, static_argnames=("block", "fmt", "pow2_scale"))
def quantize_blocks(w, *, block: int = 128, fmt: str = "e4m3", pow2_scale: bool = False):
  """Block-wise FP8 quantization of a weight: one scale per `block` x `block` block.

  The weight scaling of the DeepSeek-V3 report §3.3.2 (Figure 7a), over the last two axes
  [K (input), N (output)]. Ragged edge blocks are scaled from their own elements only.

  Args:
    w: [..., K, N] any float dtype; must be finite.
    block: block edge (positive int), the same along K and N.
    fmt: "e4m3" or "e5m2".
    pow2_scale: round each scale up to a power of two.

  Returns:
    (q, scale): q [..., K, N] in the FP8 dtype; scale [..., ceil(K/block), ceil(N/block)]
    float32 with w ~= q * scale (broadcast over each block).

  Raises:
    ValueError: bad `fmt`, non-positive `block`, non-float `w` or `w.ndim < 2`.
  """
  dtype, fmax = fp8_format(fmt)
  block = _check_positive_int(block, "block")
  w = _check_float_array(w, "w", 2)
  *lead, k, n = w.shape
  kb, nb = -(-k // block), -(-n // block)
  w32 = w.astype(jnp.float32)
  if (kb * block, nb * block) != (k, n):
    w32 = jnp.pad(w32, [(0, 0)] * len(lead) + [(0, kb * block - k), (0, nb * block - n)])
  wb = w32.reshape(*lead, kb, block, nb, block)
  scale = _scale_from_amax(jnp.max(jnp.abs(wb), axis=(-3, -1)), fmax, pow2_scale)
  q = _cast_fp8(wb / scale[..., :, None, :, None], dtype, fmax)
  q = q.reshape(*lead, kb * block, nb * block)
  return q[..., :k, :n], scale


@functools.partial(jax.jit, static_argnames=("block", "dtype"))
def dequantize_blocks(q, scale, *, block: int = 128, dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize_blocks`: w = q * scale per `block` x `block` block.

  Args:
    q: [..., K, N] FP8 (or any float) values.
    scale: [..., ceil(K/block), ceil(N/block)] float32.
    block: the block edge used to quantize.
    dtype: output dtype.

  Returns:
    [..., K, N] in `dtype`.

  Raises:
    ValueError: if `scale` has the wrong shape for `q` and `block`, or `block` is bad.
  """
  block = _check_positive_int(block, "block")
  q = jnp.asarray(q)
  scale = jnp.asarray(scale)
  if q.ndim < 2:
    raise ValueError(f"q must have at least 2 dimensions, got shape {q.shape}")
  *lead, k, n = q.shape
  kb, nb = -(-k // block), -(-n // block)
  if scale.shape != (*lead, kb, nb):
    raise ValueError(
        f"scale must have shape {(*lead, kb, nb)} for q {q.shape} and block {block}, "
        f"got {scale.shape}")
  q32 = q.astype(jnp.float32)
  if (kb * block, nb * block) != (k, n):
    q32 = jnp.pad(q32, [(0, 0)] * len(lead) + [(0, kb * block - k), (0, nb * block - n)])
  w = _dequant(q32.reshape(*lead, kb, block, nb, block),
               scale.astype(jnp.float32)[..., :, None, :, None])
  return w.reshape(*lead, kb * block, nb * block)[..., :k, :n].astype(dtype)


# (mantissa bits, exponent of the smallest normal) of each format, for `round_to_fp8_grid`.
_FP8_GRID = {"e4m3": (3, -6), "e5m2": (2, -14)}


@functools.partial(jax.jit, static_argnames=("fmt",))
def round_to_fp8_grid(v: jax.Array, fmt: str = "e4m3") -> jax.Array:
  """Rounds float32 `v` to the nearest `fmt` value (ties to even), returned as float32.

  Bit-exact with `v.astype(float8).astype(float32)` for |v| <= the format's max (checked
  against XLA and ml_dtypes on ~8.5M values including every rounding midpoint), but about 4x
  faster on XLA:CPU: normal numbers round their float32 mantissa to 3 (E4M3) or 2 (E5M2) bits
  with the add-half-ulp-and-mask trick; FP8 subnormals (|v| < 2^-6 resp. 2^-14) round on their
  fixed grid. Callers clip to +-max first (this function does not saturate).

  Args:
    v: float32 array, |v| <= 448 (E4M3) or 57344 (E5M2).
    fmt: "e4m3" or "e5m2".

  Raises:
    ValueError: bad `fmt`.
  """
  fp8_format(fmt)
  mbits, emin = _FP8_GRID[fmt]
  v = jnp.asarray(v, jnp.float32)
  bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
  shift = 23 - mbits
  rounded = bits + jnp.uint32((1 << (shift - 1)) - 1) + ((bits >> shift) & jnp.uint32(1))
  rounded = rounded & jnp.uint32(0xFFFFFFFF ^ ((1 << shift) - 1))
  normal = jax.lax.bitcast_convert_type(rounded, jnp.float32)
  quantum = 2.0 ** (emin - mbits)
  subnormal = jnp.round(v * (1.0 / quantum)) * quantum  # both products exact (powers of two)
  return jnp.where(jnp.abs(v) < 2.0 ** emin, subnormal, normal)


def _qdq_f32(x32: jax.Array, tile_shape: tuple, fmt: str, pow2_scale: bool) -> jax.Array:
  """Quantize-dequantize float32 `x32` in groups of shape `tile_shape` (one entry per axis,
  1 = no grouping on that axis); ragged edge groups are scaled from their own elements."""
  _, fmax = fp8_format(fmt)
  shape = x32.shape
  n_groups = [-(-d // t) for d, t in zip(shape, tile_shape)]
  padded = [g * t for g, t in zip(n_groups, tile_shape)]
  if tuple(padded) != shape:
    x32 = jnp.pad(x32, [(0, p - d) for d, p in zip(shape, padded)])
  split = [d for g, t in zip(n_groups, tile_shape) for d in (g, t)]
  xg = x32.reshape(split)
  inner = tuple(range(1, 2 * len(shape), 2))
  scale = _scale_from_amax(jnp.max(jnp.abs(xg), axis=inner, keepdims=True), fmax, pow2_scale)
  y = _dequant(round_to_fp8_grid(jnp.clip(xg / scale, -fmax, fmax), fmt), scale)
  y = y.reshape(padded)
  return y[tuple(slice(0, d) for d in shape)]


@functools.partial(jax.jit, static_argnames=("tile", "fmt", "pow2_scale", "axis"))
def qdq_tiles(x, *, tile: int = 128, fmt: str = "e4m3", pow2_scale: bool = False,
              axis: int = -1) -> jax.Array:
  """Tile-wise quantize-dequantize: equal to dequantize_tiles(*quantize_tiles(x)) bit for bit.

  Computed with `round_to_fp8_grid` (no float8 array is materialised). Not differentiable
  through the rounding: use it inside a custom_vjp or with a straight-through estimator.

  Args:
    x: [..., K] any float dtype, finite.
    tile: tile length.
    fmt: "e4m3" or "e5m2".
    pow2_scale: power-of-two scales.
    axis: the axis the 1 x `tile` tiles run along (default the last; e.g. 0 quantizes a
      [T, K] activation in tiles along the tokens, for a wgrad GEMM).

  Returns:
    Same shape as x, in x.dtype.

  Raises:
    ValueError: bad `fmt`, `tile` or `axis`, non-float or 0-d `x`.
  """
  fp8_format(fmt)
  tile = _check_positive_int(tile, "tile")
  x = _check_float_array(x, "x", 1)
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis must be in [{-x.ndim}, {x.ndim}) for x of shape {x.shape}, "
                     f"got {axis}")
  tile_shape = [1] * x.ndim
  tile_shape[axis] = tile
  return _qdq_f32(x.astype(jnp.float32), tuple(tile_shape), fmt, pow2_scale).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("block", "fmt", "pow2_scale"))
def qdq_blocks(w, *, block: int = 128, fmt: str = "e4m3", pow2_scale: bool = False) -> jax.Array:
  """Block-wise quantize-dequantize, bit-equal to dequantize_blocks(*quantize_blocks(w)).

  Args:
    w: [..., K, N] any float dtype, finite.
    block: block edge.
    fmt: "e4m3" or "e5m2".
    pow2_scale: power-of-two scales.

  Returns:
    [..., K, N] in w.dtype.

  Raises:
    ValueError: bad `fmt` or `block`, non-float `w` or w.ndim < 2.
  """
  fp8_format(fmt)
  block = _check_positive_int(block, "block")
  w = _check_float_array(w, "w", 2)
  tile_shape = (1,) * (w.ndim - 2) + (block, block)
  return _qdq_f32(w.astype(jnp.float32), tile_shape, fmt, pow2_scale).astype(w.dtype)


# The accumulator emulation and the FP8 linear live in their own modules; their names stay
# importable from here (imported last: both modules use the ops above).
from dsv3_jax.quant.accumulation import (ACCUMULATOR_ROUNDINGS, accumulate_dot,  # noqa: E402,F401
                                         _accumulate_dot, _check_accumulator)
from dsv3_jax.quant.fp8_linear import (Fp8Recipe, _fp8_matmul, fp8_matmul,  # noqa: E402,F401
                                       gemm)
