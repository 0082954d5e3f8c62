"""LogFMT-nBit: logarithmic per-tile quantization for communication ("Insights into
DeepSeek-V3", arXiv 2505.09343 §3.2).

Per 1 x `tile` tile along the last axis (1 x 128 in the paper):

* take log|x| of the nonzero elements and their minimum `min` and maximum `max`; `min` is
  clamped to at least `max - log(2^32)`, so a tile spans at most 2^32 (about the range of a
  5-exponent-bit float);
* an n-bit code is one sign bit and an (n-1)-bit magnitude code k: k = 0 is zero, k = 1 is
  exp(min), k = 2^(n-1) - 1 is exp(max), and in between the levels are equally spaced in log
  space with step = (max - min) / (2^(n-1) - 2): level(k) = exp(min + step * (k - 1));
* each nonzero |x| is rounded to one of its two neighbouring levels, and the choice is made in
  *linear* space, not log space. The paper: "we find it important to round in the original
  linear space, instead of the log space, for unbiased activation quantization". Rounding the
  log to the nearest step picks the upper level whenever |x| exceeds the geometric mean of
  the two levels, which is below their arithmetic mean, so every value in between is rounded
  up: an upward bias of about eps^2 / 8 relative (levels lo and hi = lo (1 + eps)) when |x| is
  locally uniform. Rounding to the level nearest in linear space (threshold at the arithmetic
  mean) is the paper's choice and the default ("nearest"): it is exactly unbiased for a locally
  uniform density and leaves only a term proportional to the density's slope within one step,
  about (f'(x) / f(x)) * (eps x)^2 / 24. For decreasing densities that term is negative and not
  always smaller than the log-rounding bias: measured on N(0, 1) tiles, relative magnitude bias
  -1.5e-4 (nearest) vs +1.7e-4 (log) at n = 8, against a 1.4e-2 RMS error; on U(-1, 1) tiles
  +1e-5 vs +2.5e-4. For a decode that is unbiased for every input, E[decode(x)] = x per
  element, "stochastic" rounds up with probability (|x| - lo) / (hi - lo), the linear
  distance (at sqrt(2) times the RMS error of "nearest"). "log" (round the log) is the
  ablation the paper argues against.

Logs are taken in base 2 (the base only rescales min, max and step; the 2^32 clamp is
`max - 32` in log2). Elements below exp2(min) (only possible after the clamp) round in linear
space between 0 and exp2(min). The encoding keeps the per-tile min and max (log2, float32) as
the side information.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

LOGFMT_ROUNDINGS = ("nearest", "stochastic", "log")
LOG2_RANGE = 32.0  # min >= max - log2(2^32)


def _check_args(bits, tile, rounding, key) -> tuple[int, int]:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 4 <= bits <= 16:
    raise ValueError(f"bits must be an int from 4 to 16, got {bits!r}")
  if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
    raise ValueError(f"tile must be a positive integer, got {tile!r}")
  if rounding not in LOGFMT_ROUNDINGS:
    raise ValueError(f"rounding must be one of {LOGFMT_ROUNDINGS}, got {rounding!r}")
  if rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' needs a PRNG key (key=None given)")
  return int(bits), int(tile)


def code_dtype(bits: int):
  """Smallest unsigned dtype holding an n-bit code: uint8 for n <= 8, else uint16."""
  return jnp.uint8 if bits <= 8 else jnp.uint16


def _levels(mn: jax.Array, step: jax.Array, k: jax.Array) -> jax.Array:
  """|value| of magnitude code k >= 1 (float32); the one formula shared by encode and decode."""
  return jnp.exp2(mn + step * (k.astype(jnp.float32) - 1.0))


def _step(mn: jax.Array, mx: jax.Array, bits: int) -> jax.Array:
  return (mx - mn) / float(2 ** (bits - 1) - 2)


@functools.partial(jax.jit, static_argnames=("bits", "tile", "rounding"))
def logfmt_encode(x, *, bits: int = 8, tile: int = 128, rounding: str = "nearest",
                  key: Optional[jax.Array] = None) -> dict:
  """Encodes x in LogFMT-nBit, per 1 x `tile` tile of the last axis (arXiv 2505.09343 §3.2).

  Args:
    x: [..., K] any float dtype, finite. A last axis that is not a multiple of `tile` gets a
      ragged last tile whose min/max come from its own elements.
    bits: n, total bits per element including the sign, 4..16.
    tile: tile length along the last axis.
    rounding: "nearest" (level nearest in linear space; the paper's choice), "stochastic"
      (up with probability given by the linear distance; exactly unbiased, needs `key`) or
      "log" (nearest in log space; biased, for ablations).
    key: PRNG key for "stochastic".

  Returns:
    dict with "codes" [..., K] (uint8 for n <= 8, uint16 above; bit n-1 = sign, low n-1 bits
    = magnitude code, 0 = zero), "min" and "max" [..., ceil(K / tile)] float32, the per-tile
    log2 range (an all-zero tile has min = max = 0 and all codes 0).

  Raises:
    ValueError: bits outside 4..16, bad tile or rounding, missing key, non-float or 0-d x.
  """
  bits, tile = _check_args(bits, tile, rounding, key)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
    raise ValueError(f"x must be a float array with at least 1 dimension, got {x.dtype} "
                     f"{x.shape}")
  *lead, k = x.shape
  nt = -(-k // tile)
  x32 = x.astype(jnp.float32)
  if nt * tile != k:
    x32 = jnp.pad(x32, [(0, 0)] * len(lead) + [(0, nt * tile - k)])
  xt = x32.reshape(*lead, nt, tile)
  a = jnp.abs(xt)
  nonzero = a > 0
  la = jnp.log2(jnp.where(nonzero, a, 1.0))
  mx = jnp.max(jnp.where(nonzero, la, -jnp.inf), axis=-1)
  mn = jnp.min(jnp.where(nonzero, la, jnp.inf), axis=-1)
  empty = ~jnp.any(nonzero, axis=-1)
  mx = jnp.where(empty, 0.0, mx)
  mn = jnp.where(empty, 0.0, jnp.maximum(mn, mx - LOG2_RANGE))
  step = _step(mn, mx, bits)
  kmax = 2 ** (bits - 1) - 1
  mn_, step_ = mn[..., None], step[..., None]

  # Continuous code position; step = 0 (one distinct magnitude) puts every element on k = 1.
  t = jnp.where(step_ > 0, (la - mn_) / jnp.where(step_ > 0, step_, 1.0), 0.0) + 1.0
  if rounding == "log":
    kq = jnp.clip(jnp.round(t), 1, kmax).astype(jnp.int32)
  else:
    k_lo = jnp.clip(jnp.floor(t), 0, kmax).astype(jnp.int32)
    k_hi = jnp.minimum(k_lo + 1, kmax)
    v_lo = jnp.where(k_lo == 0, 0.0, _levels(mn_, step_, jnp.maximum(k_lo, 1)))
    v_hi = _levels(mn_, step_, k_hi)
    if rounding == "nearest":
      up = (a - v_lo) > (v_hi - a)
    else:
      gap = v_hi - v_lo
      p_up = jnp.clip((a - v_lo) / jnp.where(gap > 0, gap, 1.0), 0.0, 1.0)
      up = jax.random.uniform(key, a.shape) < jnp.where(gap > 0, p_up, 0.0)
    kq = jnp.where(up, k_hi, k_lo)
  kq = jnp.where(nonzero, kq, 0)
  sign = ((xt < 0) & (kq > 0)).astype(jnp.int32)
  codes = (kq | (sign << (bits - 1))).astype(code_dtype(bits))
  codes = codes.reshape(*lead, nt * tile)[..., :k]
  return {"codes": codes, "min": mn, "max": mx}


@functools.partial(jax.jit, static_argnames=("bits", "tile", "dtype"))
def logfmt_decode(enc: dict, *, bits: int = 8, tile: int = 128, dtype=jnp.float32) -> jax.Array:
  """Decodes `logfmt_encode`'s output: sign * exp2(min + step * (k - 1)), 0 for k = 0.

  Args:
    enc: dict with "codes" [..., K] unsigned ints, "min" and "max" [..., ceil(K/tile)] float32.
    bits: n used to encode, 4..16.
    tile: tile length used to encode.
    dtype: output dtype.

  Returns:
    [..., K] in `dtype`.

  Raises:
    ValueError: bits outside 4..16, bad tile, missing keys or inconsistent shapes.
  """
  bits, tile = _check_args(bits, tile, "nearest", None)
  missing = {"codes", "min", "max"} - set(enc)
  if missing:
    raise ValueError(f"enc is missing {sorted(missing)}; expected keys codes, min, max")
  codes = jnp.asarray(enc["codes"]).astype(jnp.int32)
  mn = jnp.asarray(enc["min"], jnp.float32)
  mx = jnp.asarray(enc["max"], jnp.float32)
  *lead, k = codes.shape
  nt = -(-k // tile)
  if mn.shape != (*lead, nt) or mx.shape != (*lead, nt):
    raise ValueError(f"enc['min'] and enc['max'] must have shape {(*lead, nt)} for codes "
                     f"{codes.shape} and tile {tile}, got {mn.shape} and {mx.shape}")
  if nt * tile != k:
    codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, nt * tile - k)])
  codes = codes.reshape(*lead, nt, tile)
  kq = codes & (2 ** (bits - 1) - 1)
  negative = (codes >> (bits - 1)) & 1
  step = _step(mn, mx, bits)
  mag = jnp.where(kq == 0, 0.0, _levels(mn[..., None], step[..., None], jnp.maximum(kq, 1)))
  x = jnp.where(negative == 1, -mag, mag)
  return x.reshape(*lead, nt * tile)[..., :k].astype(dtype)


@functools.partial(jax.jit, static_argnames=("bits", "tile", "rounding"))
def logfmt_qdq(x, bits: int = 8, tile: int = 128, *, rounding: str = "nearest",
               key: Optional[jax.Array] = None) -> jax.Array:
  """Encode-decode round trip; [..., K] in, [..., K] out in x.dtype (see `logfmt_encode`).

  Not differentiable through the rounding; `dsv3_jax.quant.codec.LogFmtCodec.qdq` wraps it in
  a straight-through estimator.
  """
  enc = logfmt_encode(x, bits=bits, tile=tile, rounding=rounding, key=key)
  return logfmt_decode(enc, bits=bits, tile=tile, dtype=jnp.asarray(x).dtype)
