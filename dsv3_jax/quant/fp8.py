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

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.vma import match_varying_axes

# name -> (dtype, largest finite magnitude). E4M3 is the OCP "fn" variant (no Inf, max 448).
FP8_FORMATS = {
    "e4m3": (jnp.float8_e4m3fn, 448.0),
    "e5m2": (jnp.float8_e5m2, 57344.0),
}
ACCUMULATOR_ROUNDINGS = ("truncate", "nearest")
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
