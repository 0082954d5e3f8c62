"""Tests for dsv3_jax.quant.fp8: fine-grained FP8 QDQ, the FP8 linear and the accumulator."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.quant import fp8

E4M3_MAX, E5M2_MAX = 448.0, 57344.0
FORMATS = [("e4m3", jnp.float8_e4m3fn, E4M3_MAX), ("e5m2", jnp.float8_e5m2, E5M2_MAX)]


def _f32(a):
  return np.asarray(a, np.float32)


# Jitted entry points: one compiled program per test instead of one per primitive.
quantize_tiles = jax.jit(fp8.quantize_tiles, static_argnames=("tile", "fmt", "pow2_scale"))
dequantize_tiles = jax.jit(fp8.dequantize_tiles, static_argnames=("tile", "dtype"))
quantize_blocks = jax.jit(fp8.quantize_blocks, static_argnames=("block", "fmt", "pow2_scale"))
dequantize_blocks = jax.jit(fp8.dequantize_blocks, static_argnames=("block", "dtype"))
qdq_tiles = jax.jit(fp8.qdq_tiles, static_argnames=("tile", "fmt", "pow2_scale", "axis"))
qdq_blocks = jax.jit(fp8.qdq_blocks, static_argnames=("block", "fmt", "pow2_scale"))
fp8_matmul = jax.jit(fp8.fp8_matmul, static_argnums=2)


# --- quantize / dequantize -------------------------------------------------------------------


def test_plain_cast_overflows_to_nan_but_quantize_clips():
  # The reason for clipping: XLA's cast does not saturate.
  assert np.isnan(_f32(jnp.float32(465.0).astype(jnp.float8_e4m3fn)))
  # amax / (amax / 448) lands above 448 in float32 for some amax; find such values and check
  # that they quantize to exactly 448, not NaN.
  cands = np.float32(1.0) + np.arange(1, 20000, dtype=np.float32) * np.float32(1.37e-4)
  over = cands[cands / (cands / np.float32(448.0)) > np.float32(448.0)]
  assert over.size > 0, "no amax exercising the clip was found"
  for fmt, _, fmax in FORMATS:
    tiles = np.zeros((over.size, 4), np.float32)
    tiles[:, 0] = over
    tiles[:, 1] = -over
    q, s = quantize_tiles(jnp.asarray(tiles), tile=4, fmt=fmt)
    qa = _f32(q)
    if fmt == "e4m3":
      np.testing.assert_array_equal(qa[:, 0], 448.0)
      np.testing.assert_array_equal(qa[:, 1], -448.0)
    assert np.all(np.isfinite(qa))
    np.testing.assert_allclose(_f32(dequantize_tiles(q, s, tile=4))[:, 0], over, rtol=1e-6)


def test_hand_computed_tiles():
  # amax 7 -> scale 7/448 = 2^-6 exactly; every value is representable.
  x = jnp.array([[0.5, -1.0, 3.0, 7.0]])
  q, s = quantize_tiles(x, tile=4)
  np.testing.assert_array_equal(_f32(s), [[2.0 ** -6]])
  np.testing.assert_array_equal(_f32(q), [[32.0, -64.0, 192.0, 448.0]])
  np.testing.assert_array_equal(_f32(dequantize_tiles(q, s, tile=4)), _f32(x))
  # [1.0, 0.3]: scale 1/448, 0.3 * 448 = 134.4 -> E4M3 grid step 16 in [128, 256) -> 128.
  q, s = quantize_tiles(jnp.array([1.0, 0.3]), tile=2)
  np.testing.assert_allclose(_f32(s), [1.0 / 448.0], rtol=1e-7)
  np.testing.assert_array_equal(_f32(q), [448.0, 128.0])
  np.testing.assert_allclose(_f32(dequantize_tiles(q, s, tile=2)), [1.0, 128.0 / 448.0],
                             rtol=1e-6)
  # E5M2: scale 1/57344; 0.3 * 57344 = 17203.2, grid step 4096 in [16384, 32768) -> 16384.
  q, s = quantize_tiles(jnp.array([1.0, 0.3]), tile=2, fmt="e5m2")
  np.testing.assert_array_equal(_f32(q), [57344.0, 16384.0])


def test_all_zero_and_huge_tiles_are_finite():
  fmax32 = float(np.finfo(np.float32).max)
  x = np.zeros((3, 256), np.float32)
  x[1, :128] = np.linspace(-fmax32, fmax32, 128, dtype=np.float32)  # amax = float32 max
  x[1, 128:] = 1.0
  x[2] = np.float32(3.0e38)
  for fmt, _, _ in FORMATS:
    for pow2 in (False, True):
      q, s = quantize_tiles(jnp.asarray(x), fmt=fmt, pow2_scale=pow2)
      y = _f32(dequantize_tiles(q, s))
      assert np.all(np.isfinite(_f32(q))) and np.all(np.isfinite(_f32(s))) and np.all(
          np.isfinite(y)), (fmt, pow2)
      np.testing.assert_array_equal(y[0], 0.0)
      np.testing.assert_array_equal(_f32(s)[0], 1.0)  # all-zero tile: scale 1
      np.testing.assert_allclose(y[1, [0, 127]], [-fmax32, fmax32], rtol=1e-6)
      np.testing.assert_array_equal(y[1, 128:], 1.0)  # the neighbouring tile is unaffected
      np.testing.assert_allclose(y[2], 3.0e38, rtol=2.0 ** -3)
  for fmt, _, _ in FORMATS:
    qw, sw = quantize_blocks(jnp.asarray(x[1:].T), fmt=fmt, pow2_scale=fmt == "e4m3")
    assert np.all(np.isfinite(_f32(dequantize_blocks(qw, sw))))


def test_ragged_last_tile_is_scaled_from_its_own_elements():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 200)).astype(np.float32) * 1e-3
  x[:, 0] = 1000.0  # a huge first tile must not affect the ragged tile's scale
  q, s = quantize_tiles(jnp.asarray(x))
  assert q.shape == (5, 200) and s.shape == (5, 2)
  np.testing.assert_allclose(_f32(s)[:, 1], np.abs(x[:, 128:]).max(-1) / 448.0, rtol=1e-6)
  y = _f32(dequantize_tiles(q, s))
  np.testing.assert_array_less(np.abs(y[:, 128:] - x[:, 128:]),
                               2.0 ** -4 * np.abs(x[:, 128:]) + 2.0 ** -10 * _f32(s)[:, 1:])
  # Same result as quantizing an explicitly zero-padded array.
  xp = np.pad(x, [(0, 0), (0, 56)])
  qp, sp = quantize_tiles(jnp.asarray(xp))
  np.testing.assert_array_equal(_f32(sp), _f32(s))
  np.testing.assert_array_equal(_f32(qp)[:, :200], _f32(q))


def test_blocks_shapes_and_scales():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((2, 300, 200)).astype(np.float32)
  q, s = quantize_blocks(jnp.asarray(w))
  assert q.shape == w.shape and q.dtype == jnp.float8_e4m3fn and s.shape == (2, 3, 2)
  for i, ks in enumerate([slice(0, 128), slice(128, 256), slice(256, 300)]):
    for j, ns in enumerate([slice(0, 128), slice(128, 200)]):
      np.testing.assert_allclose(_f32(s)[:, i, j], np.abs(w[:, ks, ns]).max((-2, -1)) / 448.0,
                                 rtol=1e-6)
  y = _f32(dequantize_blocks(q, s))
  smax = np.repeat(np.repeat(_f32(s), 128, 1), 128, 2)[:, :300, :200]
  assert np.all(np.abs(y - w) <= 2.0 ** -4 * np.abs(w) + 2.0 ** -10 * smax)


@pytest.mark.parametrize("fmt,rel,sub", [("e4m3", 2.0 ** -4, 2.0 ** -10),
                                         ("e5m2", 2.0 ** -3, 2.0 ** -17)])
@pytest.mark.parametrize("pow2", [False, True])
def test_round_trip_error_bound(fmt, rel, sub, pow2):
  # Half a unit in the last place: 2^-(m+1) relative in the normal range, half the
  # subnormal spacing (times the scale) below it.
  rng = np.random.default_rng(2)
  x = (rng.standard_normal((64, 384)) * np.exp(rng.uniform(-6, 6, (64, 1)))).astype(np.float32)
  q, s = quantize_tiles(jnp.asarray(x), fmt=fmt, pow2_scale=pow2)
  y = _f32(dequantize_tiles(q, s))
  scale = np.repeat(_f32(s), 128, -1)
  assert np.all(np.abs(y - x) <= rel * np.abs(x) + sub * scale * (1 + 1e-6))
  rms = np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2))
  assert 0.2 * rel < rms < rel  # the typical error is a fraction of the bound, not zero


def test_pow2_scales_are_powers_of_two_with_headroom_below_2x():
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((32, 256)) * np.exp(rng.uniform(-20, 20, (32, 1)))).astype(np.float32)
  x[0, :128] = 448.0 * 2.0 ** -5  # an exact power of two keeps its value
  for fmt, _, fmax in FORMATS:
    _, s = quantize_tiles(jnp.asarray(x), fmt=fmt, pow2_scale=True)
    s = _f32(s)
    mant, _ = np.frexp(s)
    np.testing.assert_array_equal(mant, 0.5)
    ratio = np.abs(x).reshape(32, 2, 128).max(-1) / s
    assert np.all((ratio > fmax / 2) & (ratio <= fmax))
  _, s = quantize_tiles(jnp.asarray(x[:1, :128]), pow2_scale=True)
  np.testing.assert_array_equal(_f32(s), [[2.0 ** -5]])


def test_round_to_grid_is_bit_exact_with_the_cast():
  for fmt, dtype, fmax in FORMATS:
    ml = ml_dtypes.float8_e4m3fn if fmt == "e4m3" else ml_dtypes.float8_e5m2
    grid = np.arange(256, dtype=np.uint8).view(ml).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid)])
    mids = (grid[1:] + grid[:-1]) / 2
    v = np.concatenate([grid, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
    v = np.clip(v, -fmax, fmax).astype(np.float32)
    got = _f32(fp8.round_to_fp8_grid(jnp.asarray(v), fmt))
    want = _f32(jnp.asarray(v).astype(dtype))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, v.astype(ml).astype(np.float32))


@pytest.mark.parametrize("fmt,pow2", [("e4m3", False), ("e5m2", True)])
def test_qdq_equals_quantize_then_dequantize(fmt, pow2):
  rng = np.random.default_rng(4)
  x = (rng.standard_normal((3, 70, 300)) * np.exp(rng.uniform(-8, 8, (3, 70, 1)))).astype(
      np.float32)
  q, s = quantize_tiles(jnp.asarray(x), fmt=fmt, pow2_scale=pow2)
  np.testing.assert_array_equal(
      _f32(qdq_tiles(jnp.asarray(x), fmt=fmt, pow2_scale=pow2)),
      _f32(dequantize_tiles(q, s)))
  qb, sb = quantize_blocks(jnp.asarray(x), fmt=fmt, pow2_scale=pow2)
  np.testing.assert_array_equal(
      _f32(qdq_blocks(jnp.asarray(x), fmt=fmt, pow2_scale=pow2)),
      _f32(dequantize_blocks(qb, sb)))
  # Tiles along another axis = tiles along the last axis of the transpose.
  x2 = jnp.asarray(x[0])
  np.testing.assert_array_equal(
      _f32(qdq_tiles(x2, axis=0, fmt=fmt, pow2_scale=pow2)),
      _f32(qdq_tiles(x2.T, fmt=fmt, pow2_scale=pow2)).T)
  # dtype preserved
  assert qdq_tiles(x2.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_jit_matches_eager():
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 130)).astype(np.float32))
  q1, s1 = quantize_tiles(x, pow2_scale=True)
  q2, s2 = jax.jit(lambda x: quantize_tiles(x, pow2_scale=True))(x)
  np.testing.assert_array_equal(_f32(q1), _f32(q2))
  np.testing.assert_array_equal(_f32(s1), _f32(s2))


def test_bad_arguments_raise():
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match="fmt"):
    fp8.quantize_tiles(x, fmt="e3m4")
  with pytest.raises(ValueError, match="tile"):
    fp8.quantize_tiles(x, tile=0)
  with pytest.raises(ValueError, match="block"):
    fp8.quantize_blocks(x, block=-1)
  with pytest.raises(ValueError, match="w"):
    fp8.quantize_blocks(jnp.ones((8,)))
  with pytest.raises(ValueError, match="x"):
    fp8.quantize_tiles(jnp.ones((2, 8), jnp.int32))
  with pytest.raises(ValueError, match="scale"):
    fp8.dequantize_tiles(jnp.ones((2, 200)), jnp.ones((2, 1)))
  with pytest.raises(ValueError, match="scale"):
    fp8.dequantize_blocks(jnp.ones((200, 200)), jnp.ones((1, 2)))
  with pytest.raises(ValueError, match="axis"):
    fp8.qdq_tiles(x, axis=2)
  with pytest.raises(ValueError, match="fmt_forward"):
    fp8.Fp8Recipe(fmt_forward="e4m3fnuz")
  with pytest.raises(ValueError, match="fmt_backward"):
    fp8.Fp8Recipe(fmt_backward="bf16")
  with pytest.raises(ValueError, match="mantissa_bits"):
    fp8.Fp8Recipe(accumulator_mantissa_bits=30)
  with pytest.raises(ValueError, match="promotion_interval"):
    fp8.Fp8Recipe(accumulator_mantissa_bits=13, promotion_interval=48)
  with pytest.raises(ValueError, match="rounding"):
    fp8.accumulate_dot(x, jnp.ones((8, 2)), mantissa_bits=13, promotion_interval=None,
                       rounding="stochastic")
  with pytest.raises(ValueError, match="K"):
    fp8.fp8_matmul(jnp.ones((2, 8)), jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="recipe"):
    fp8.fp8_matmul(x, jnp.ones((8, 3)), recipe="e4m3")


# --- accumulator -----------------------------------------------------------------------------


def test_accumulator_stalls_without_promotion():
  # 32768 products of 1: once the FP22 accumulator reaches 2^14, an addend of 1 is below its
  # last retained bit (2^(14-13) = 2) and is truncated away; promotion every 128 restores it.
  ones = jnp.ones((1, 32768))
  kw = dict(mantissa_bits=13)
  assert float(fp8.accumulate_dot(ones, ones.T, promotion_interval=None, **kw)[0, 0]) == 16384
  assert float(fp8.accumulate_dot(ones, ones.T, promotion_interval=128, **kw)[0, 0]) == 32768
  assert float(fp8.accumulate_dot(ones, ones.T, mantissa_bits=None,
                                  promotion_interval=None)[0, 0]) == 32768


def test_accumulator_alignment_truncates_small_products():
  # One group of 32: 1.0 and 31 x 0.75 * 2^-13. Aligned to the max exponent (0), the last
  # retained bit is 2^-13: truncation drops every small addend, nearest rounds each up.
  a = jnp.concatenate([jnp.ones((1, 1)), jnp.full((1, 31), 0.75 * 2.0 ** -13)], axis=1)
  b = jnp.ones((32, 1))
  trunc = fp8.accumulate_dot(a, b, mantissa_bits=13, promotion_interval=None)
  near = fp8.accumulate_dot(a, b, mantissa_bits=13, promotion_interval=None, rounding="nearest")
  assert float(trunc[0, 0]) == 1.0
  assert float(near[0, 0]) == 1.0 + 31 * 2.0 ** -13
  exact = fp8.accumulate_dot(a, b, mantissa_bits=None, promotion_interval=None)
  np.testing.assert_allclose(float(exact[0, 0]), 1.0 + 31 * 0.75 * 2.0 ** -13, rtol=1e-7)


def test_accumulator_normalisation_rounding():
  # (1 + 3 * 2^-13) + 1 = 2 + 3 * 2^-13 needs 15 significant bits; 14 are kept (2^-12 step):
  # truncation gives 2 + 2^-12, round-to-nearest-even gives 2 + 2^-11 (tie, 8193 is odd).
  a = jnp.array([[1.0 + 3 * 2.0 ** -13, 1.0]])
  b = jnp.ones((2, 1))
  kw = dict(mantissa_bits=13, promotion_interval=None, group=2)
  assert float(fp8.accumulate_dot(a, b, **kw)[0, 0]) == 2.0 + 2.0 ** -12
  assert float(fp8.accumulate_dot(a, b, rounding="nearest", **kw)[0, 0]) == 2.0 + 2.0 ** -11
  # Negative sums truncate toward zero.
  assert float(fp8.accumulate_dot(-a, b, **kw)[0, 0]) == -(2.0 + 2.0 ** -12)


def test_accumulator_promotion_is_chunked_sum():
  rng = np.random.default_rng(6)
  a = jnp.asarray(rng.standard_normal((3, 256)).astype(np.float32))
  b = jnp.asarray(rng.standard_normal((256, 2)).astype(np.float32))
  kw = dict(mantissa_bits=10)
  full = fp8.accumulate_dot(a, b, promotion_interval=128, **kw)
  c1 = fp8.accumulate_dot(a[:, :128], b[:128], promotion_interval=None, **kw)
  c2 = fp8.accumulate_dot(a[:, 128:], b[128:], promotion_interval=None, **kw)
  np.testing.assert_array_equal(_f32(full), _f32(c1 + c2))
  # 23 mantissa bits with rounding to nearest is float32-accurate.
  hi = fp8.accumulate_dot(a, b, mantissa_bits=23, promotion_interval=128, rounding="nearest")
  ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  np.testing.assert_allclose(_f32(hi), ref, rtol=1e-5, atol=1e-5)


def test_accumulation_error_grows_without_promotion():
  # Report §3.3.2: limited accumulation error grows with K; promotion every 128 bounds it.
  rng = np.random.default_rng(7)
  a = qdq_tiles(jnp.asarray(rng.standard_normal((16, 4096)).astype(np.float32)))
  b = qdq_blocks(jnp.asarray(rng.standard_normal((4096, 16)).astype(np.float32)))
  ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64)

  def err(**kw):
    y = np.asarray(fp8.accumulate_dot(a, b, mantissa_bits=13, **kw), np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)

  no_promo, promo = err(promotion_interval=None), err(promotion_interval=128)
  assert 1e-3 < no_promo < 2e-2
  assert promo < no_promo / 3
  fp32 = np.asarray(fp8.accumulate_dot(a, b, mantissa_bits=None, promotion_interval=None))
  assert np.linalg.norm(fp32 - ref) / np.linalg.norm(ref) < promo / 100


# --- fp8_matmul ------------------------------------------------------------------------------


def _np_qdq_tiles(x, fmt="e4m3", axis=-1):
  return np.asarray(qdq_tiles(jnp.asarray(x, jnp.float32), fmt=fmt, axis=axis), np.float64)


def test_recipe_is_hashable_and_static():
  r1, r2 = fp8.Fp8Recipe(), fp8.Fp8Recipe()
  assert r1 == r2 and hash(r1) == hash(r2)
  assert fp8.Fp8Recipe(accumulator_mantissa_bits=13) != r1
  f = jax.jit(fp8.fp8_matmul, static_argnums=2)
  y = f(jnp.ones((2, 8)), jnp.ones((8, 3)), r1)
  np.testing.assert_array_equal(_f32(y), 8.0)


def _value_and_vjp(x, w, gy, recipe=None):
  y, vjp = jax.vjp(lambda a, b: fp8.fp8_matmul(a, b, recipe), x, w)
  return (y, *vjp(gy))


def test_fp8_matmul_forward_and_gradients_match_reference():
  rng = np.random.default_rng(8)
  x = rng.standard_normal((2, 100, 192)).astype(np.float32)  # T = 200 tokens (ragged)
  w = (rng.standard_normal((192, 160)) / 14).astype(np.float32)
  gy = rng.standard_normal((2, 100, 160)).astype(np.float32)
  y, dx, dw = jax.jit(_value_and_vjp)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(gy))
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  xq = _np_qdq_tiles(x.reshape(200, 192))
  wq = np.asarray(qdq_blocks(jnp.asarray(w)), np.float64)
  np.testing.assert_allclose(_f32(y).reshape(200, 160), xq @ wq, rtol=1e-4, atol=1e-4)
  g2 = gy.reshape(200, 160)
  dx_ref = _np_qdq_tiles(g2) @ wq.T  # dY tiles along N
  dw_ref = _np_qdq_tiles(xq, axis=0).T @ _np_qdq_tiles(g2, axis=0)  # tiles along tokens
  np.testing.assert_allclose(_f32(dx).reshape(200, 192), dx_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(_f32(dw), dw_ref, rtol=1e-4, atol=1e-3)
  # Against the float32 gradient: within E4M3's error (a few percent in norm, not more).
  for got, want in [(dx, gy @ w.T), (dw, x.reshape(200, 192).T @ g2)]:
    rel = np.linalg.norm(_f32(got).reshape(want.shape) - want) / np.linalg.norm(want)
    assert 0.005 < rel < 0.08, rel
  # E5M2 gradients are coarser than E4M3 ones.
  _, dx5, _ = jax.jit(_value_and_vjp, static_argnums=3)(
      jnp.asarray(x), jnp.asarray(w), jnp.asarray(gy), fp8.Fp8Recipe(fmt_backward="e5m2"))
  dx5 = _f32(dx5)
  want = gy @ w.T
  assert np.linalg.norm(dx5 - want) > 1.3 * np.linalg.norm(_f32(dx) - want)


def test_fp8_matmul_dtypes_follow_the_primals():
  x = jnp.ones((4, 256), jnp.bfloat16)
  w = jnp.full((256, 8), 0.5, jnp.float32)
  y, dx, dw = jax.jit(_value_and_vjp)(x, w, jnp.ones((4, 8), jnp.bfloat16))
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  np.testing.assert_array_equal(_f32(y), 128.0)
  np.testing.assert_array_equal(_f32(dw), 4.0)


def test_fp8_matmul_with_emulated_accumulator():
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal((4, 256)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((256, 8)).astype(np.float32))
  recipe = fp8.Fp8Recipe(accumulator_mantissa_bits=13, promotion_interval=None)
  y = fp8_matmul(x, w, recipe)
  want = fp8.accumulate_dot(qdq_tiles(x), qdq_blocks(w), mantissa_bits=13,
                            promotion_interval=None)
  np.testing.assert_array_equal(_f32(y), _f32(want))
  dx, dw = jax.jit(jax.grad(lambda a, b: jnp.sum(fp8.fp8_matmul(a, b, recipe) ** 2),
                            (0, 1)))(x, w)
  assert np.all(np.isfinite(_f32(dx))) and np.all(np.isfinite(_f32(dw)))


def test_short_fp8_training_run_learns():
  # Two-layer MLP regression with both matmuls in FP8; float32 master weights.
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.standard_normal((256, 64)).astype(np.float32))
  y_true = jnp.tanh(x @ jnp.asarray(rng.standard_normal((64, 16)).astype(np.float32)) / 8)
  params = {"w1": jnp.asarray(rng.standard_normal((64, 128)).astype(np.float32) / 8),
            "w2": jnp.asarray(rng.standard_normal((128, 16)).astype(np.float32) / 11)}

  def loss(p):
    h = jax.nn.gelu(fp8.fp8_matmul(x, p["w1"]))
    return jnp.mean((fp8.fp8_matmul(h, p["w2"]) - y_true) ** 2)

  @jax.jit
  def step(p):
    l, g = jax.value_and_grad(loss)(p)
    return jax.tree.map(lambda a, b: a - 0.5 * b, p, g), l, g

  losses = []
  for _ in range(60):
    params, l, g = step(params)
    losses.append(float(l))
  assert all(np.isfinite(losses))
  assert g["w1"].dtype == jnp.float32
  assert losses[-1] < 0.5 * losses[0], losses[::10]
