"""Tests for dsv3_jax.quant.codec: all_to_all payload codecs (FP8, LogFMT, BF16 identity)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.quant import codec as codec_lib
from dsv3_jax.quant import fp8, logfmt
from dsv3_jax.quant.codec import Fp8Codec, IdentityCodec, LogFmtCodec

CODECS = [IdentityCodec(), IdentityCodec("float32"), Fp8Codec(), Fp8Codec(fmt="e5m2", tile=64),
          LogFmtCodec(), LogFmtCodec(bits=10), LogFmtCodec(bits=5, tile=32)]


def _f32(a):
  return np.asarray(a, np.float32)


def test_bytes_per_row_hand_values():
  # DeepSeek-V3 hidden size 7168 = 56 tiles of 128.
  assert IdentityCodec().bytes_per_row(7168) == 2 * 7168
  assert IdentityCodec("float32").bytes_per_row(7168) == 4 * 7168
  assert Fp8Codec().bytes_per_row(7168) == 7168 + 4 * 56  # 7392
  assert Fp8Codec().bytes_per_row(200) == 200 + 4 * 2
  assert LogFmtCodec(bits=8).bytes_per_row(7168) == 7168 + 8 * 56  # 7616
  assert LogFmtCodec(bits=10).bytes_per_row(7168) == 8960 + 8 * 56  # 9408
  assert LogFmtCodec(bits=5).bytes_per_row(3) == 2 + 8  # ceil(15 / 8) + one tile


@pytest.mark.parametrize("codec", CODECS, ids=repr)
@pytest.mark.parametrize("d", [200, 37])
def test_wire_leaves_match_bytes_per_row_and_round_trip(codec, d):
  rng = np.random.default_rng(d)
  x = jnp.asarray(rng.standard_normal((6, d)).astype(np.float32))
  enc = jax.jit(codec.encode)(x)
  assert all(v.shape[0] == 6 for v in enc.values())
  assert sum(v.nbytes for v in enc.values()) == 6 * codec.bytes_per_row(d)
  y = _f32(jax.jit(codec.decode, static_argnums=(1, 2))(enc, jnp.float32, d))
  assert y.shape == (6, d)
  # The round trip equals the underlying op.
  if isinstance(codec, Fp8Codec):
    want = fp8.qdq_tiles(x, tile=codec.tile, fmt=codec.fmt, pow2_scale=True)
  elif isinstance(codec, LogFmtCodec):
    want = logfmt.logfmt_qdq(x, codec.bits, codec.tile)
  else:
    want = x.astype(codec.wire_dtype).astype(jnp.float32)
  # (LogFMT levels come from exp2, whose last bit can differ between compiled programs.)
  np.testing.assert_allclose(y, _f32(want), rtol=1e-6 if isinstance(codec, LogFmtCodec) else 0)


def test_round_trip_error_by_codec():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32))

  def rms(codec):
    y = codec.decode(codec.encode(x))
    return float(jnp.sqrt(jnp.mean((y - x) ** 2) / jnp.mean(x ** 2)))

  assert rms(IdentityCodec("float32")) == 0.0
  assert 5e-4 < rms(IdentityCodec()) < 3e-3  # BF16: 8 significant bits
  assert 1e-2 < rms(Fp8Codec()) < 5e-2  # E4M3
  assert 5e-3 < rms(LogFmtCodec(bits=8)) < 2e-2  # LogFMT-8 beats E4M3 on Gaussian rows
  assert rms(LogFmtCodec(bits=8)) < rms(Fp8Codec())
  assert rms(LogFmtCodec(bits=10)) < 5e-3


def test_pack_unpack_bits():
  rng = np.random.default_rng(0)
  pack = jax.jit(codec_lib.pack_bits, static_argnums=1)
  unpack = jax.jit(codec_lib.unpack_bits, static_argnums=(1, 2))
  for bits, d in [(4, 131), (5, 1), (7, 131), (8, 131), (10, 131), (13, 8), (16, 131)]:
    codes = jnp.asarray(rng.integers(0, 2 ** bits, (3, d)), logfmt.code_dtype(bits))
    packed = pack(codes, bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, -(-bits * d // 8))
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits, d)), np.asarray(codes))
  # MSB first: the 4-bit codes 0b1010, 0b0011 pack into the byte 0b10100011; a 16-bit code
  # 0x1234 into the bytes 0x12, 0x34; the 10-bit codes 1023, 1 give the bit stream
  # 11111111 11000000 0001(0000 padding) = 0xFF, 0xC0, 0x10.
  packed = codec_lib.pack_bits(jnp.array([[10, 3]], jnp.uint8), 4)
  np.testing.assert_array_equal(np.asarray(packed), [[0b10100011]])
  packed = codec_lib.pack_bits(jnp.array([[0x1234]], jnp.uint16), 16)
  np.testing.assert_array_equal(np.asarray(packed), [[0x12, 0x34]])
  packed = codec_lib.pack_bits(jnp.array([[1023, 1]], jnp.uint16), 10)
  np.testing.assert_array_equal(np.asarray(packed), [[0xFF, 0xC0, 0x10]])


def test_logfmt_width_inference():
  x = jnp.ones((2, 200))
  c5 = LogFmtCodec(bits=5)
  enc = c5.encode(x)
  with pytest.raises(ValueError, match="ambiguous"):  # ceil(5 * 199 / 8) = ceil(5 * 200 / 8)
    c5.decode(enc)
  assert c5.decode(enc, d=200).shape == (2, 200)
  with pytest.raises(ValueError, match="inconsistent"):
    c5.decode(enc, d=150)
  c8 = LogFmtCodec(bits=8)
  assert c8.decode(c8.encode(x)).shape == (2, 200)  # unique for bits >= 8


@pytest.mark.parametrize("codec", [CODECS[0], CODECS[2], CODECS[4]], ids=repr)
def test_straight_through_gradients(codec):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((8, 160)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((8, 160)).astype(np.float32))
  g = jax.grad(lambda x: jnp.sum(w * codec.qdq(x)))(x)
  np.testing.assert_array_equal(_f32(g), _f32(w))
  # transport through a linear row permutation (a stand-in for the all_to_all): forward is
  # the permuted round trip, backward the BF16 cotangent permuted back.
  perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
  comm = lambda a: a[perm]  # pylint: disable=unnecessary-lambda-assignment
  y, vjp = jax.vjp(lambda x: codec.transport(x, comm), x)
  np.testing.assert_allclose(_f32(y), _f32(codec.decode(codec.encode(x), d=160))[perm],
                             rtol=1e-6)
  (gx,) = vjp(w)
  want = np.zeros_like(_f32(w))
  want[perm] = _f32(w.astype(jnp.bfloat16))
  np.testing.assert_array_equal(_f32(gx), want)
  assert gx.dtype == x.dtype


@pytest.mark.parametrize("codec", [Fp8Codec(), LogFmtCodec()], ids=repr)
def test_differentiating_through_wire_arrays_raises(codec):
  with pytest.raises(ValueError, match="transport"):
    jax.grad(lambda x: jnp.sum(codec.decode(codec.encode(x))))(jnp.ones((2, 8)))


def test_identity_codec_gradient_flows_in_wire_dtype():
  c = IdentityCodec()
  g = jax.grad(lambda x: jnp.sum(c.decode(c.encode(x)) * 3.0))(jnp.ones((2, 8)))
  np.testing.assert_array_equal(_f32(g), 3.0)


def test_codecs_are_hashable_static_and_validated():
  assert hash(Fp8Codec()) == hash(Fp8Codec()) and Fp8Codec() != Fp8Codec(pow2_scale=False)
  f = jax.jit(lambda x, c: c.qdq(x), static_argnums=1)
  assert f(jnp.ones((2, 8)), LogFmtCodec()).shape == (2, 8)
  with pytest.raises(ValueError, match="wire_dtype"):
    IdentityCodec("float16")
  with pytest.raises(ValueError, match="fmt"):
    Fp8Codec(fmt="e4m3fnuz")
  with pytest.raises(ValueError, match="tile"):
    Fp8Codec(tile=0)
  with pytest.raises(ValueError, match="bits"):
    LogFmtCodec(bits=3)
  with pytest.raises(ValueError, match="rounding"):
    LogFmtCodec(rounding="floor")
  with pytest.raises(ValueError, match="x"):
    Fp8Codec().encode(jnp.ones((2, 3, 4)))
  with pytest.raises(ValueError, match="d"):
    Fp8Codec().bytes_per_row(-1)


def _all_to_all_check():
  """Transport through a real all_to_all over 4 devices under shard_map."""
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((4,), ("ep",))
  spec = P("ep")
  rng = np.random.default_rng(0)

  def put(a):
    return jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))

  def comm(a):
    return jax.lax.all_to_all(a, "ep", 0, 0, tiled=True)

  def smap(f):
    return jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec)

  x = put(rng.standard_normal((16, 256)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((16, 256)).astype(np.float32))
  plain = jax.jit(smap(comm))
  x_np = np.asarray(x)
  for codec in (Fp8Codec(), LogFmtCodec(bits=10)):
    f = smap(lambda a, codec=codec: codec.transport(a, comm))
    y = np.asarray(jax.jit(f)(x))
    # Rows are exchanged whole, so the result is the exchanged local round trip.
    want = np.asarray(plain(put(np.asarray(codec.qdq(jnp.asarray(x_np))))))
    np.testing.assert_allclose(y, want, rtol=1e-6)
    gx = np.asarray(jax.jit(jax.grad(lambda a: jnp.sum(f(a) * w)))(x))
    g_want = np.asarray(jax.jit(jax.grad(lambda a: jnp.sum(plain(a) * w.astype(jnp.bfloat16)
                                                           .astype(jnp.float32))))(x))
    np.testing.assert_array_equal(gx, g_want)
    # The lowered program sends the wire dtypes: uint8 payload + float32 side information.
    hlo = jax.jit(f).lower(x).as_text()
    a2a = [line for line in hlo.splitlines() if "all_to_all" in line]
    assert any("xui8>" in line or "xi8>" in line for line in a2a), a2a
    assert not any("f16" in line or "bf16" in line for line in a2a), a2a


def test_transport_through_all_to_all():
  if jax.device_count() >= 4:
    _all_to_all_check()
    return
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  code = ("import sys; sys.path.insert(0, %r); import test_codec; "
          "test_codec._all_to_all_check(); print('ok')" % os.path.dirname(__file__))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=False)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
