"""Paged latent KV cache for MLA decoding (DeepSeek-V2 §2.1; Insights §2.1.2).

MLA caches, per token and layer, only the normalised joint latent c_KV (`kv_lora_rank` values)
and the rotated decoupled key k^R (`qk_rope_head_dim` values, one shared by every head): nothing
per head. Each layer owns one pool

    pool[num_pages, page_size, kv_lora_rank + qk_rope_head_dim]   (entry = [c_KV | k_rope])

and every sequence owns a list of pages (its page table, vLLM-style): token position p of a
sequence lives at row p % page_size of page page_table[p // page_size]. Pages are handed out by
a host-side `PageAllocator`; a full pool is never overwritten silently: `allocate` raises
`CacheFullError`, and the engine only admits a sequence once the pages it may need are reserved
(so a running sequence can never run out; later requests wait).

On an expert-parallel mesh attention is data parallel (each device attends for its own
sequences, as DeepSeek's DP attention): the pools are sharded over every mesh axis along
`num_pages`, each device (shard) holding `pages_per_shard` pages of its own sequences, and page
ids in a page table are local to the shard. `gather_pages` / `scatter_pages` read and write whole
pages by global id, which is what moving the latent cache between two meshes needs (part 2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.model.config import ModelConfig


class CacheFullError(RuntimeError):
  """No free page left in a shard's pool (raised instead of overwriting a page in use)."""


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Shape of the paged latent cache.

  Attributes:
    num_layers: decoder layers with a cache (the main stack; MTP blocks are not cached here).
    pages_per_shard: pages in each shard's pool (the whole pool on one device).
    page_size: token rows per page.
    width: kv_lora_rank + qk_rope_head_dim, the values cached per token and layer.
    kv_lora_rank: leading part of `width` (c_KV); the rest is k_rope.
    dtype: cache element dtype name ("float32", "bfloat16").
    num_shards: devices the pool is split over (1 without a mesh).
  """

  num_layers: int
  pages_per_shard: int
  page_size: int
  width: int
  kv_lora_rank: int
  dtype: str = "float32"
  num_shards: int = 1

  @classmethod
  def for_model(cls, config: ModelConfig, *, pages_per_shard: int, page_size: int = 16,
                dtype: Optional[str] = None, num_shards: int = 1) -> "CacheSpec":
    """The cache of `config`'s main stack.

    Args:
      config: model config.
      pages_per_shard: pool pages per shard (`cache.num_pages`), >= 1.
      page_size: tokens per page (`cache.page_size`), >= 1.
      dtype: element dtype; defaults to the model's compute dtype (`config.dtype`).
      num_shards: shards (devices) the pool is split over.

    Raises:
      ValueError: a non-positive size, naming the setting.
    """
    for name, v in (("cache.num_pages", pages_per_shard), ("cache.page_size", page_size),
                    ("num_shards", num_shards)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    dtype = jnp.dtype(dtype or config.dtype).name
    if dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"cache dtype {dtype!r}; allowed: ('float32', 'bfloat16', 'float16')")
    return cls(num_layers=config.num_hidden_layers, pages_per_shard=int(pages_per_shard),
               page_size=int(page_size), width=config.kv_lora_rank + config.qk_rope_head_dim,
               kv_lora_rank=config.kv_lora_rank, dtype=dtype, num_shards=int(num_shards))

  @property
  def pool_shape(self) -> tuple[int, int, int]:
    """[num_shards * pages_per_shard, page_size, width], one layer's pool (global)."""
    return (self.num_shards * self.pages_per_shard, self.page_size, self.width)

  def pages_for(self, tokens: int) -> int:
    """Pages holding `tokens` cached positions."""
    return -(-int(tokens) // self.page_size)


def init_pools(spec: CacheSpec, sharding=None) -> tuple[jax.Array, ...]:
  """One zero pool per layer, [num_shards * pages_per_shard, page_size, width] in spec.dtype.

  Works under `jax.eval_shape` (e.g. for the 671B configuration, never materialised).

  Args:
    spec: the cache shape.
    sharding: optional `jax.sharding.Sharding` for every pool (pages over the mesh axes).
  """
  make = lambda: jnp.zeros(spec.pool_shape, jnp.dtype(spec.dtype))
  if sharding is not None:
    make = jax.jit(make, out_shardings=sharding)
  return tuple(make() for _ in range(spec.num_layers))


def bytes_per_token(pools: Sequence) -> float:
  """Cache bytes one token occupies across all layers, read from the pool arrays.

  Args:
    pools: the per-layer pools (arrays or `jax.ShapeDtypeStruct`s) [pages, page_size, width].

  Returns:
    sum over layers of width * itemsize, in bytes (= pool bytes / pool token rows).
  """
  total = 0.0
  for p in pools:
    rows = p.shape[0] * p.shape[1]
    total += math.prod(p.shape) * jnp.dtype(p.dtype).itemsize / rows
  return total


class PageAllocator:
  """Host-side free list of one shard's pages, with reservations.

  `reserve(n)` promises n future pages to a sequence (admission control); `allocate()` hands
  out a page (drawing on the caller's reservation when it has one), `release(pages)` returns
  pages. Page 0 is handed out first; ids are local to the shard, in [0, num_pages).
  """

  def __init__(self, num_pages: int):
    self.num_pages = int(num_pages)
    self._free = list(range(self.num_pages - 1, -1, -1))  # pop() gives the lowest id
    self._reserved = 0

  @property
  def free(self) -> int:
    """Pages not in use."""
    return len(self._free)

  @property
  def available(self) -> int:
    """Pages neither in use nor reserved."""
    return len(self._free) - self._reserved

  @property
  def used(self) -> int:
    return self.num_pages - len(self._free)

  def can_reserve(self, n: int) -> bool:
    return n <= self.available

  def reserve(self, n: int) -> None:
    """Sets aside n pages for later `allocate(reserved=True)` calls.

    Raises:
      CacheFullError: fewer than n pages are neither used nor reserved.
    """
    if n > self.available:
      raise CacheFullError(f"cannot reserve {n} page(s): {self.available} of {self.num_pages} "
                           "are free and unreserved")
    self._reserved += n

  def unreserve(self, n: int) -> None:
    if n > self._reserved:
      raise ValueError(f"unreserve({n}) with only {self._reserved} reserved")
    self._reserved -= n

  def allocate(self, reserved: bool = False) -> int:
    """One free page id.

    Args:
      reserved: draw on an earlier `reserve` (the reservation shrinks by one).

    Raises:
      CacheFullError: no page is free (or, without a reservation, every free page is promised
        to someone else). Nothing is overwritten.
    """
    if reserved:
      if self._reserved < 1 or not self._free:
        raise CacheFullError("allocate(reserved=True) without a reservation")
      self._reserved -= 1
    elif self.available < 1:
      raise CacheFullError(f"page pool full: all {self.num_pages} pages are in use or reserved "
                           "(raise cache.num_pages, or wait for sequences to finish)")
    return self._free.pop()

  def release(self, pages: Sequence[int]) -> None:
    """Returns pages to the free list.

    Raises:
      ValueError: a page that is out of range or already free.
    """
    free = set(self._free)
    for p in pages:
      if not 0 <= p < self.num_pages or p in free:
        raise ValueError(f"release of page {p}, which is not in use")
      free.add(p)
      self._free.append(int(p))
    self._free.sort(reverse=True)


# ------------------------------------------------------------------------ traced helpers


def slot_ids(page_table: jax.Array, positions: jax.Array, valid: jax.Array,
             page_size: int) -> jax.Array:
  """Flat pool rows for token positions: page_table[b, p // page_size] * page_size + p % ps.

  Args:
    page_table: [B, P] int32 page ids (local to the shard).
    positions: [B, T] int32 token positions.
    valid: [B, T] bool; invalid tokens get -1 (their writes are dropped).

  Returns:
    [B, T] int32.
  """
  page = jnp.take_along_axis(page_table, jnp.clip(positions // page_size, 0,
                                                  page_table.shape[1] - 1), axis=1)
  return jnp.where(valid, page * page_size + positions % page_size, -1)


def write_latents(pool: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
  """Writes cache entries into a pool; slots < 0 are dropped (never written anywhere).

  Args:
    pool: [num_pages, page_size, width].
    slots: [...] int32 flat rows (`slot_ids`).
    values: [..., width] entries [c_KV | k_rope] (cast to the pool dtype).

  Returns:
    The updated pool (in place when the pool buffer is donated).
  """
  n, ps, w = pool.shape
  flat = pool.reshape(n * ps, w)
  idx = jnp.where(slots >= 0, slots, n * ps).reshape(-1)
  flat = flat.at[idx].set(values.reshape(-1, w).astype(pool.dtype), mode="drop")
  return flat.reshape(n, ps, w)


def read_pages(pool: jax.Array, page_table: jax.Array) -> jax.Array:
  """The pages a batch's page tables list, in order: [B, P * page_size, width].

  Only the listed pages are read (a gather of P pages per sequence, not the pool).
  """
  b, p = page_table.shape
  _, ps, w = pool.shape
  return pool[page_table].reshape(b, p * ps, w)


def read_rows(pool: jax.Array, page_table: jax.Array, length: jax.Array) -> jax.Array:
  """The first `length` cached rows of each sequence, zero beyond: [B, P * page_size, width].

  One gather of rows through the page table; rows at or past a sequence's length are not read
  at all (their index is out of range and the gather fills them with 0), so an unused row, or
  anything in pages the sequence does not hold, can never reach the attention (not even NaN).

  Args:
    pool: [num_pages, page_size, width].
    page_table: [B, P] int32 page ids.
    length: [B] int32 rows to read per sequence (<= P * page_size).
  """
  n, ps, w = pool.shape
  b, p = page_table.shape
  k = jnp.arange(p * ps, dtype=jnp.int32)
  rows = page_table[:, k // ps] * ps + (k % ps)[None, :]
  rows = jnp.where(k[None, :] < length[:, None], rows, n * ps)
  return jnp.take(pool.reshape(n * ps, w), rows, axis=0, mode="fill", fill_value=0)


def gather_pages(pools: Sequence[jax.Array], page_ids) -> tuple[jax.Array, ...]:
  """Copies whole pages out of every layer's pool: [L] x [n, page_size, width] (global ids)."""
  ids = jnp.asarray(page_ids, jnp.int32)
  return tuple(p[ids] for p in pools)


def scatter_pages(pools: Sequence[jax.Array], page_ids, pages: Sequence[jax.Array]
                  ) -> tuple[jax.Array, ...]:
  """Writes whole pages (from `gather_pages`) into every layer's pool at global `page_ids`."""
  ids = jnp.asarray(page_ids, jnp.int32)
  return tuple(p.at[ids].set(v.astype(p.dtype)) for p, v in zip(pools, pages))
