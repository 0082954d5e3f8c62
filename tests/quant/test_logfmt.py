"""Tests for dsv3_jax.quant.logfmt (LogFMT-nBit, arXiv 2505.09343 §3.2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.quant import logfmt

encode = jax.jit(logfmt.logfmt_encode, static_argnames=("bits", "tile", "rounding"))
decode = jax.jit(logfmt.logfmt_decode, static_argnames=("bits", "tile", "dtype"))
qdq = jax.jit(logfmt.logfmt_qdq, static_argnames=("bits", "tile", "rounding"))


def _f32(a):
  return np.asarray(a, np.float32)


def test_hand_computed_four_bit_tile():
  # bits = 4: magnitude codes 1..7, log2 range [0, 3], step = 3 / (2^3 - 2) = 0.5, levels
  # 2^(0.5 (k - 1)) = 1, 1.414, 2, 2.828, 4, 5.657, 8.
  x = jnp.array([[1.0, -2.0, 4.0, 8.0, 0.0, 3.39, -3.0, 6.0]])
  enc = encode(x, bits=4, tile=8)
  np.testing.assert_array_equal(_f32(enc["min"]), [[0.0]])
  np.testing.assert_array_equal(_f32(enc["max"]), [[3.0]])
  # 3.39 lies between 2^1.5 = 2.828 and 4: above their geometric mean 3.364 (log rounding
  # would go up to 4) but below the arithmetic mean 3.414, so linear-space rounding goes down.
  # 6.0 is nearer 5.657 than 8. Sign is bit 3 (8).
  np.testing.assert_array_equal(np.asarray(enc["codes"]), [[1, 8 | 3, 5, 7, 0, 4, 8 | 4, 6]])
  assert enc["codes"].dtype == jnp.uint8
  y = _f32(decode(enc, bits=4, tile=8))
  np.testing.assert_allclose(y, [[1.0, -2.0, 4.0, 8.0, 0.0, 2 ** 1.5, -(2 ** 1.5), 2 ** 2.5]],
                             rtol=1e-6)
  log_codes = np.asarray(encode(x, bits=4, tile=8, rounding="log")["codes"])
  assert log_codes[0, 5] == 5  # log-space rounding picks 4 for 3.39


def test_min_is_clamped_to_max_minus_32_and_small_values_round_linearly():
  x = jnp.array([[2.0 ** 10, 2.0 ** -30, 2.0 ** -22.5, 2.0 ** -23.5, 2.0 ** -22]])
  enc = encode(x, bits=8, tile=5)
  np.testing.assert_array_equal(_f32(enc["min"]), [[10.0 - 32.0]])
  y = _f32(decode(enc, bits=8, tile=5))
  # Below exp2(min) = 2^-22 the choice is between 0 and 2^-22, in linear space:
  # 2^-22.5 = 0.707 * 2^-22 -> 2^-22;  2^-23.5 = 0.354 * 2^-22 -> 0;  2^-30 -> 0.
  np.testing.assert_allclose(y, [[2.0 ** 10, 0.0, 2.0 ** -22, 0.0, 2.0 ** -22]], rtol=1e-5)


def test_zero_tiles_single_magnitude_and_ragged_shapes():
  x = np.zeros((3, 200), np.float32)
  x[1, :] = -0.75  # one distinct magnitude: step 0, exact
  x[2, 150] = 5.0  # only the ragged tile is nonzero
  for bits in (4, 16):
    enc = encode(jnp.asarray(x), bits=bits)
    assert enc["codes"].shape == (3, 200) and enc["min"].shape == (3, 2)
    y = _f32(decode(enc, bits=bits))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(_f32(enc["min"])))
    np.testing.assert_array_equal(np.asarray(enc["codes"])[0], 0)
    np.testing.assert_allclose(y, x, rtol=1e-6)
  assert encode(jnp.asarray(x), bits=9)["codes"].dtype == jnp.uint16


@pytest.mark.parametrize("bits", [5, 8, 12])
def test_nearest_is_nearest_level_in_linear_space(bits):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((8, 128)) * np.exp(rng.uniform(-3, 3, (8, 1)))).astype(np.float32)
  enc = encode(jnp.asarray(x), bits=bits)
  y = _f32(decode(enc, bits=bits))
  mn, mx = _f32(enc["min"]), _f32(enc["max"])
  step = (mx - mn) / (2 ** (bits - 1) - 2)
  k = np.arange(1, 2 ** (bits - 1))
  levels = np.exp2(mn + step * (k - 1))  # [8, K]
  levels = np.concatenate([np.zeros((8, 1)), levels], axis=1)
  best = np.abs(np.abs(x)[:, :, None] - levels[:, None, :]).min(-1)
  # float32 levels vs float64 levels differ by ~1e-7 relative.
  assert np.all(np.abs(np.abs(y) - np.abs(x)) <= best + 2e-6 * np.abs(x))
  np.testing.assert_array_equal(np.sign(y), np.sign(x))
  # Error bound: at most half the gap to the next level, (2^step - 1) / 2 relative.
  rel = np.abs(y - x) / np.abs(x)
  assert np.all(rel <= (np.exp2(step) - 1) / 2 + 2e-6)  # + float32 level precision


@pytest.mark.parametrize("bits,max_rms", [(4, 0.35), (6, 0.07), (8, 0.02), (10, 0.005),
                                          (16, 1e-4)])
def test_round_trip_error_per_width(bits, max_rms):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((256, 256)).astype(np.float32))
  y = qdq(x, bits=bits)
  rms = float(jnp.sqrt(jnp.mean((y - x) ** 2) / jnp.mean(x ** 2)))
  assert max_rms / 5 < rms < max_rms


def test_linear_rounding_removes_the_log_rounding_bias():
  # Locally uniform magnitudes (U(-1, 1) tiles): linear-space nearest is unbiased, log-space
  # rounding is biased upward by ~eps^2 / 8.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.uniform(-1, 1, (2048, 128)).astype(np.float32))

  def bias(rounding):
    y = qdq(x, bits=6, rounding=rounding)
    return float(jnp.mean((y - x) * jnp.sign(x)) / jnp.mean(jnp.abs(x)))

  near, log = bias("nearest"), bias("log")
  assert abs(near) < 5e-4
  assert log > 2e-3


def test_stochastic_rounding_is_unbiased_per_element():
  rng = np.random.default_rng(3)
  x = jnp.asarray((rng.standard_normal((4, 128)) * 3).astype(np.float32))
  keys = jax.random.split(jax.random.key(0), 2000)
  f = jax.jit(jax.vmap(lambda x, k: logfmt.logfmt_qdq(x, 5, rounding="stochastic", key=k),
                       in_axes=(None, 0)))
  draws = _f32(f(x, keys)).astype(np.float64)  # [2000, 4, 128]
  mean, std = draws.mean(0), draws.std(0)
  xn = np.asarray(x, np.float64)
  # Every element: E[decode] = x within 5 standard errors.
  assert np.all(np.abs(mean - xn) <= 5 * std / np.sqrt(len(keys)) + 1e-6 * np.abs(xn))
  # Each element takes at most its two neighbouring levels.
  assert max(len(np.unique(draws[:, i, j])) for i in range(4) for j in range(128)) <= 2
  near = _f32(qdq(x, bits=5)).astype(np.float64)
  assert np.abs(mean - xn).mean() < 0.2 * np.abs(near - xn).mean()


def test_bad_arguments_raise():
  x = jnp.ones((2, 8))
  for bits in (3, 17, 8.0, True):
    with pytest.raises(ValueError, match="bits"):
      logfmt.logfmt_encode(x, bits=bits)
  with pytest.raises(ValueError, match="bits"):
    logfmt.logfmt_decode(logfmt.logfmt_encode(x), bits=2)
  with pytest.raises(ValueError, match="tile"):
    logfmt.logfmt_encode(x, tile=0)
  with pytest.raises(ValueError, match="rounding"):
    logfmt.logfmt_encode(x, rounding="up")
  with pytest.raises(ValueError, match="key"):
    logfmt.logfmt_encode(x, rounding="stochastic")
  with pytest.raises(ValueError, match="x"):
    logfmt.logfmt_encode(jnp.ones((2, 8), jnp.int32))
  with pytest.raises(ValueError, match="min"):
    logfmt.logfmt_decode({"codes": jnp.zeros((2, 8), jnp.uint8), "min": jnp.zeros((2, 2)),
                          "max": jnp.zeros((2, 2))}, tile=128)
