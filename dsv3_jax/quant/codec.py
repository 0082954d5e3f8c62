"""Payload codecs for the MoE dispatch / combine all_to_all (DeepSeek-V3 report §3.3.2, §3.4;
arXiv 2505.09343 §3.2).

A codec turns rows x [R, D] into a dict of wire arrays, each with leading dim R so that every
leaf can be sent through the same `all_to_all` along axis 0, and back:

* `IdentityCodec`: the rows themselves, in BF16 by default (the report's combine precision).
* `Fp8Codec`: E4M3 values plus one float32 scale per 1 x 128 tile (power-of-two scales by
  default), the report's FP8 dispatch.
* `LogFmtCodec`: LogFMT-nBit codes bit-packed to n bits each, plus the per-tile log2 min and
  max (two float32 per tile).

The leaves are the real wire dtypes (FP8 bit patterns and packed LogFMT codes as uint8, float32
scales), so their `nbytes` sum to `bytes_per_row(D) * R`, as does the all_to_all in the lowered
(pre-optimisation) HLO. Note that XLA:CPU's compiled HLO widens bfloat16 (and float8) collectives
to float32 (f16), so byte counts must come from `bytes_per_row` or the lowered HLO, not from the
CPU-compiled HLO.

Gradients. The dispatch is differentiated; as in the report, the backward all_to_all carries
BF16 gradients and the quantization is a straight-through estimator (d decode(encode(x)) / dx =
identity). A gradient cannot flow through the FP8 / integer wire leaves themselves (their
cotangent would be FP8 or nothing), so:

* `codec.transport(x, comm)` is the differentiable path: forward decode(comm(encode(x))),
  backward the transpose of `comm` applied to the cotangent cast to BF16 (`comm` must be linear
  and act on the leading axis, e.g. a tiled `jax.lax.all_to_all` along axis 0);
* `codec.qdq(x)` is the local straight-through round trip (no communication);
* differentiating through `decode(encode(x))` of an FP8 or LogFMT codec directly raises a
  `ValueError` at trace time instead of silently returning a wrong gradient. (The identity
  codec's leaf is a float, so its gradient does flow, in the wire dtype.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.quant import fp8 as fp8_lib
from dsv3_jax.quant import logfmt as logfmt_lib

_GRAD_DTYPE = jnp.bfloat16  # the report's precision for the backward all_to_all


@jax.custom_vjp
def _wire(leaf):
  return leaf


def _wire_fwd(leaf):
  return leaf, None


def _wire_bwd(_, g):
  del g
  raise ValueError(
      "gradients do not flow through an FP8/LogFMT codec's wire arrays; use "
      "codec.transport(x, comm) (straight-through, BF16 backward) or codec.qdq(x)")


_wire.defvjp(_wire_fwd, _wire_bwd)


def _guard(enc: dict) -> dict:
  return {k: _wire(v) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in enc.items()}


def _check_rows(x) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a float [R, D] array, got {x.dtype} {x.shape}")
  return x


def _check_width(d) -> int:
  if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
    raise ValueError(f"d must be a non-negative integer, got {d!r}")
  return int(d)


def _check_decoded_width(d, width: int) -> None:
  if d is not None and d != width:
    raise ValueError(f"d={d} does not match the payload width {width}")


class _Codec:
  """Shared straight-through helpers; subclasses define encode, decode and bytes_per_row."""

  def qdq(self, x: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
    """Local round trip decode(encode(x)) in x.dtype with an identity gradient (STE).

    Args:
      x: [R, D] float.
      key: PRNG key, used only by a stochastic-rounding `LogFmtCodec`.

    Raises:
      ValueError: if x is not a float [R, D] array.
    """
    x = _check_rows(x)
    y = self.decode(self._encode(x, key), x.dtype, d=x.shape[1])
    return x + jax.lax.stop_gradient(y - x)

  def transport(self, x: jax.Array, comm: Optional[Callable[[jax.Array], jax.Array]] = None,
                dtype=None, key: Optional[jax.Array] = None,
                grad_dtype=_GRAD_DTYPE) -> jax.Array:
    """decode(comm(encode(x))) with a straight-through, BF16 backward through `comm`.

    Forward: every wire leaf goes through `comm`. Backward: the cotangent is cast to
    `grad_dtype` (BF16, as in the report), sent back through the transpose of `comm` (for a
    tiled all_to_all, the reverse all_to_all), and cast to x.dtype: the quantization is
    treated as identity.

    Args:
      x: [R, D] float rows (inside `shard_map`: this device's rows).
      comm: linear map on arrays acting on the leading axis only, the same for every dtype
        and trailing shape (e.g. `lambda a: jax.lax.all_to_all(a, "ep", 0, 0, tiled=True)`),
        taking [R, ...] to [R', ...]; `None` = no communication.
      dtype: output dtype (default x.dtype).
      key: PRNG key, used only by a stochastic-rounding `LogFmtCodec`.
      grad_dtype: dtype of the backward communication (float32 for an exact backward).

    Returns:
      [R', D] in `dtype`.

    Raises:
      ValueError: if x is not a float [R, D] array.
    """
    x = _check_rows(x)
    out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    comm = (lambda a: a) if comm is None else comm

    @jax.custom_vjp
    def send(x):
      enc = self._encode(x, key)
      return self.decode({k: comm(v) for k, v in enc.items()}, out_dtype, d=x.shape[1])

    def send_fwd(x):
      return send(x), x

    def send_bwd(x, g):
      # `comm` is linear, so its VJP does not depend on the primal values; x is passed only
      # for its type (under shard_map it carries the varying manual axes).
      _, comm_vjp = jax.vjp(comm, x.astype(grad_dtype))
      (gx,) = comm_vjp(g.astype(grad_dtype))
      return (gx.astype(x.dtype),)

    send.defvjp(send_fwd, send_bwd)
    return send(x)


@dataclasses.dataclass(frozen=True)
class IdentityCodec(_Codec):
  """Uncompressed payload, cast to `wire_dtype` (BF16: the report's combine, and its dispatch
  baseline).

  Attributes:
    wire_dtype: "bfloat16" (2 bytes per value) or "float32" (4 bytes; exact for float32 x).

  Raises:
    ValueError: from __init__ for any other wire_dtype.
  """

  wire_dtype: str = "bfloat16"

  def __post_init__(self):
    if self.wire_dtype not in ("bfloat16", "float32"):
      raise ValueError(f"wire_dtype must be 'bfloat16' or 'float32', got {self.wire_dtype!r}")

  def _encode(self, x, key=None):
    del key
    return {"x": x.astype(self.wire_dtype)}

  @functools.partial(jax.jit, static_argnames=("self",))
  def encode(self, x: jax.Array) -> dict:
    """x [R, D] float -> {"x": [R, D] in wire_dtype}. Differentiable (gradient in wire dtype).

    Raises:
      ValueError: if x is not a float [R, D] array.
    """
    return self._encode(_check_rows(x))

  @functools.partial(jax.jit, static_argnames=("self", "dtype", "d"))
  def decode(self, enc: dict, dtype=jnp.float32, d: Optional[int] = None) -> jax.Array:
    """{"x": [R, D]} -> [R, D] in `dtype` (`d`, if given, must equal D).

    Raises:
      ValueError: if d is given and differs from the payload width.
    """
    _check_decoded_width(d, enc["x"].shape[-1])
    return enc["x"].astype(dtype)

  def bytes_per_row(self, d: int) -> int:
    """Wire bytes for one row of width d: 2 d (BF16) or 4 d (float32)."""
    return _check_width(d) * jnp.dtype(self.wire_dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Fp8Codec(_Codec):
  """FP8 dispatch payload: values in `fmt` plus one float32 scale per 1 x `tile` tile
  (report §3.3.2: dispatch activations quantized to FP8 with power-of-two scales).

  Attributes:
    fmt: "e4m3" or "e5m2".
    tile: tile length along D.
    pow2_scale: power-of-two scales (default True, as in the report / DeepEP).

  Raises:
    ValueError: from __init__ for a bad fmt or tile.
  """

  fmt: str = "e4m3"
  tile: int = 128
  pow2_scale: bool = True

  def __post_init__(self):
    fp8_lib.fp8_format(self.fmt)
    fp8_lib._check_positive_int(self.tile, "tile")  # pylint: disable=protected-access

  def _encode(self, x, key=None):
    del key
    q, scale = fp8_lib.quantize_tiles(x, tile=self.tile, fmt=self.fmt,
                                      pow2_scale=self.pow2_scale)
    # The FP8 bytes travel as uint8: XLA:CPU would otherwise widen a float8 all_to_all to f16.
    return {"q": jax.lax.bitcast_convert_type(q, jnp.uint8), "scale": scale}

  @functools.partial(jax.jit, static_argnames=("self",))
  def encode(self, x: jax.Array) -> dict:
    """x [R, D] float -> {"q": [R, D] uint8 (the FP8 bit patterns), "scale": [R, ceil(D / tile)]
    float32}.

    Not differentiable (see the module docstring; use `transport` or `qdq`).

    Raises:
      ValueError: if x is not a float [R, D] array.
    """
    return _guard(self._encode(_check_rows(x)))

  @functools.partial(jax.jit, static_argnames=("self", "dtype", "d"))
  def decode(self, enc: dict, dtype=jnp.float32, d: Optional[int] = None) -> jax.Array:
    """{"q", "scale"} -> [R, D] in `dtype` (q * scale per tile; `d`, if given, must equal D).

    Raises:
      ValueError: if d is given and differs from the payload width, or shapes disagree.
    """
    _check_decoded_width(d, enc["q"].shape[-1])
    q = jax.lax.bitcast_convert_type(enc["q"], fp8_lib.fp8_format(self.fmt)[0])
    return fp8_lib.dequantize_tiles(q, enc["scale"], tile=self.tile, dtype=dtype)

  def bytes_per_row(self, d: int) -> int:
    """Wire bytes for one row of width d: d (one byte per value) + 4 ceil(d / tile)."""
    d = _check_width(d)
    return d + 4 * (-(-d // self.tile))


@dataclasses.dataclass(frozen=True)
class LogFmtCodec(_Codec):
  """LogFMT-nBit payload (arXiv 2505.09343 §3.2), e.g. for the combine.

  Wire format per row of width d: the n-bit codes bit-packed, most significant bit first,
  into ceil(n d / 8) bytes (uint8), plus the per-tile log2 min and max as two float32 (8 bytes
  per tile).

  Attributes:
    bits: n, 4..16.
    tile: tile length along D.
    rounding: "nearest" (linear-space nearest, the paper's) or "log"; "stochastic" needs a
      key passed to `encode`.

  Raises:
    ValueError: from __init__ for bits outside 4..16, a bad tile or rounding.
  """

  bits: int = 8
  tile: int = 128
  rounding: str = "nearest"

  def __post_init__(self):
    logfmt_lib._check_args(self.bits, self.tile, self.rounding,  # pylint: disable=protected-access
                           key=0)

  def _encode(self, x, key=None):
    enc = logfmt_lib.logfmt_encode(x, bits=self.bits, tile=self.tile, rounding=self.rounding,
                                   key=key)
    return {"codes": pack_bits(enc["codes"], self.bits), "min": enc["min"], "max": enc["max"]}

  @functools.partial(jax.jit, static_argnames=("self",))
  def encode(self, x: jax.Array, key: Optional[jax.Array] = None) -> dict:
    """x [R, D] float -> {"codes": [R, ceil(bits D / 8)] uint8, "min", "max":
    [R, ceil(D / tile)] float32}. Not differentiable (use `transport` or `qdq`).

    Raises:
      ValueError: if x is not a float [R, D] array, or rounding="stochastic" without key.
    """
    return _guard(self._encode(_check_rows(x), key))

  @functools.partial(jax.jit, static_argnames=("self", "dtype", "d"))
  def decode(self, enc: dict, dtype=jnp.float32, d: Optional[int] = None) -> jax.Array:
    """{"codes", "min", "max"} -> [R, D] in `dtype`.

    Args:
      enc: the (communicated) output of `encode`.
      dtype: output dtype.
      d: row width D. Inferred from the packed length and tile count when that is unique
        (always for bits >= 8); required otherwise.

    Raises:
      ValueError: if d is needed but not given, or is inconsistent with enc.
    """
    n_bytes = enc["codes"].shape[-1]
    n_tiles = enc["min"].shape[-1]
    candidates = [w for w in range(max(0, (n_tiles - 1) * self.tile),
                                   n_tiles * self.tile + 1)
                  if -(-w * self.bits // 8) == n_bytes and -(-w // self.tile) == n_tiles]
    if d is None:
      if len(candidates) != 1:
        raise ValueError(f"d is ambiguous for {n_bytes} packed bytes and {n_tiles} tiles at "
                         f"bits={self.bits} (candidates {candidates}); pass d")
      d = candidates[0]
    elif d not in candidates:
      raise ValueError(f"d={d} is inconsistent with {n_bytes} packed bytes and {n_tiles} tiles "
                       f"(possible: {candidates})")
    codes = unpack_bits(enc["codes"], self.bits, d)
    return logfmt_lib.logfmt_decode({"codes": codes, "min": enc["min"], "max": enc["max"]},
                                    bits=self.bits, tile=self.tile, dtype=dtype)

  def bytes_per_row(self, d: int) -> int:
    """Wire bytes for one row of width d: ceil(bits d / 8) + 8 ceil(d / tile)."""
    d = _check_width(d)
    return -(-self.bits * d // 8) + 8 * (-(-d // self.tile))


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
  """Packs unsigned n-bit codes [..., D] into [..., ceil(n D / 8)] uint8, MSB first.

  The byte stream is the concatenation of the codes' bits, most significant first, zero-padded
  at the end (the layout of `jnp.packbits`). n = 8 and 16 are plain byte copies.

  Args:
    codes: [..., D] unsigned integers below 2^bits.
    bits: n, 1..16.
  """
  if bits == 8:
    return codes.astype(jnp.uint8)
  c = codes.astype(jnp.uint16)
  if bits == 16:
    pairs = jnp.stack([(c >> 8).astype(jnp.uint8), (c & 0xFF).astype(jnp.uint8)], axis=-1)
    return pairs.reshape(*codes.shape[:-1], 2 * codes.shape[-1])
  shifts = jnp.arange(bits - 1, -1, -1, dtype=jnp.uint16)
  planes = ((c[..., None] >> shifts) & 1).astype(jnp.uint8)  # [..., D, n]
  flat = planes.reshape(*codes.shape[:-1], codes.shape[-1] * bits)
  return jnp.packbits(flat, axis=-1)


def unpack_bits(packed: jax.Array, bits: int, d: int) -> jax.Array:
  """Inverse of `pack_bits`: [..., ceil(n d / 8)] uint8 -> [..., d] codes (uint8 / uint16)."""
  out = logfmt_lib.code_dtype(bits)
  if bits == 8:
    return packed[..., :d].astype(out)
  if bits == 16:
    pairs = packed[..., :2 * d].reshape(*packed.shape[:-1], d, 2).astype(jnp.uint16)
    return ((pairs[..., 0] << 8) | pairs[..., 1]).astype(out)
  flat = jnp.unpackbits(packed, axis=-1, count=d * bits)
  planes = flat.reshape(*packed.shape[:-1], d, bits).astype(jnp.uint16)
  weights = (1 << jnp.arange(bits - 1, -1, -1, dtype=jnp.uint16)).astype(jnp.uint16)
  return jnp.sum(planes * weights, axis=-1, dtype=jnp.uint16).astype(out)


PAYLOAD_FORMATS = ("compute", "bf16", "fp8", "logfmt4 .. logfmt16")


def codec_from_name(name: str):
  """The wire codec for a config name: "compute" (None: the compute dtype, no codec), "bf16",
  "fp8" (E4M3, 1x128 tiles, power-of-two scales: the report's dispatch), "logfmtN" (N = 4..16).

  Raises:
    ValueError: any other name (lists the allowed ones).
  """
  if name == "compute":
    return None
  if name == "bf16":
    return IdentityCodec("bfloat16")
  if name == "fp8":
    return Fp8Codec(fmt="e4m3", tile=128, pow2_scale=True)
  if isinstance(name, str) and name.startswith("logfmt") and name[6:].isdigit():
    bits = int(name[6:])
    if 4 <= bits <= 16:
      return LogFmtCodec(bits=bits)
  raise ValueError(f"payload format {name!r}; allowed: {PAYLOAD_FORMATS}")
