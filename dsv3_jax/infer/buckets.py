"""Static shape buckets of the serving engine: batch, prompt length and pages per sequence are
rounded up to a bucket so that, after warm-up, no jitted step recompiles."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def geometric_buckets(hi: int, ratio: float = 1.25) -> tuple[int, ...]:
  """1, 2, 3, ... growing by `ratio` (at least 1), then hi: ~log_ratio(hi) buckets, padding
  at most (ratio - 1) of the size."""
  out, b = [], 1
  while b < hi:
    out.append(b)
    b = max(b + 1, math.ceil(b * ratio))
  return tuple(out) + (hi,)


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
  """lo, 2 lo, 4 lo, ... below hi, then hi."""
  out, b = [], lo
  while b < hi:
    out.append(b)
    b *= 2
  return tuple(out) + (hi,)


def check_buckets(name: str, given: Optional[Sequence[int]], default: tuple[int, ...],
             top: int) -> tuple[int, ...]:
  """Sorted shape buckets, always ending with `top` (so every size up to it has a bucket).

  Raises:
    ValueError: a bucket that is not a positive integer.
  """
  if given is None:
    return default
  vals = list(given)
  if not vals or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                     for v in vals):
    raise ValueError(f"{name} must be a non-empty list of positive integers, got {given!r}")
  return tuple(sorted({int(v) for v in vals if v < top} | {top}))


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket >= n (n itself past the last bucket)."""
  for b in buckets:
    if b >= n:
      return b
  return n  # only for sizes past the last bucket (a prompt as long as max_position)
