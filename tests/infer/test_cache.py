"""The paged latent cache: bytes per token from the pool arrays equal the cost model (tiny and,
abstractly, 671B), page allocation never hands out a page twice, dropped writes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import deepseek_v3_671b, tiny
from dsv3_jax.analysis.memory import kv_cache_bytes_per_token
from dsv3_jax.infer import cache as cache_lib
from dsv3_jax.model.config import ModelConfig


@pytest.mark.parametrize("dtype,bits", [("float32", 32), ("bfloat16", 16)])
def test_bytes_per_token_from_pools_equal_the_formula_at_tiny_dims(dtype, bits):
  cfg = ModelConfig.from_dict(tiny.get_config().model.to_dict())
  spec = cache_lib.CacheSpec.for_model(cfg, pages_per_shard=8, page_size=16, dtype=dtype)
  pools = cache_lib.init_pools(spec)
  assert len(pools) == cfg.num_hidden_layers
  assert pools[0].shape == (8, 16, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
  measured = cache_lib.bytes_per_token(pools)
  # read straight from the arrays: pool bytes / token rows
  assert measured == sum(p.nbytes for p in pools) / (8 * 16)
  assert measured == kv_cache_bytes_per_token(tiny.get_config(), cache_bits=bits)
  assert measured == (64 + 32) * 4 * bits / 8


def test_671b_cache_built_abstractly_is_70272_bytes_per_token():
  cfg = ModelConfig.from_dict(deepseek_v3_671b.get_config().model.to_dict())
  spec = cache_lib.CacheSpec.for_model(cfg, pages_per_shard=4096, page_size=64)
  pools = jax.eval_shape(lambda: cache_lib.init_pools(spec))
  assert isinstance(pools[0], jax.ShapeDtypeStruct)
  assert pools[0].shape == (4096, 64, 512 + 64) and pools[0].dtype == jnp.bfloat16
  assert len(pools) == 61
  assert cache_lib.bytes_per_token(pools) == 70272
  assert cache_lib.bytes_per_token(pools) == kv_cache_bytes_per_token(
      deepseek_v3_671b.get_config())


def test_allocator_never_hands_out_a_page_twice_and_a_full_pool_raises():
  a = cache_lib.PageAllocator(4)
  pages = [a.allocate() for _ in range(4)]
  assert sorted(pages) == [0, 1, 2, 3]
  with pytest.raises(cache_lib.CacheFullError, match="pool full"):
    a.allocate()
  a.release([pages[1]])
  assert a.allocate() == pages[1]
  with pytest.raises(ValueError, match="not in use"):
    a.release([7])
  # reservations: promised pages are not available to others
  b = cache_lib.PageAllocator(3)
  b.reserve(2)
  assert b.available == 1
  b.allocate()
  with pytest.raises(cache_lib.CacheFullError):
    b.allocate()
  assert b.allocate(reserved=True) is not None
  with pytest.raises(cache_lib.CacheFullError):
    b.reserve(2)


def test_writes_land_on_the_page_table_and_invalid_writes_are_dropped():
  pool = jnp.full((3, 2, 4), jnp.nan)
  table = jnp.array([[2, 0]], jnp.int32)
  pos = jnp.array([[0, 1, 2, 3]], jnp.int32)
  valid = jnp.array([[True, True, True, False]])
  slots = cache_lib.slot_ids(table, pos, valid, 2)
  np.testing.assert_array_equal(slots, [[4, 5, 0, -1]])
  vals = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4)
  out = np.asarray(cache_lib.write_latents(pool, slots, vals))
  np.testing.assert_array_equal(out[2], vals[0, :2])
  np.testing.assert_array_equal(out[0, 0], vals[0, 2])
  assert np.isnan(out[0, 1]).all() and np.isnan(out[1]).all()  # nothing else written
  got = cache_lib.read_pages(jnp.asarray(out), table)
  np.testing.assert_array_equal(got[0, :3], vals[0, :3])


def test_pages_move_between_pools_unchanged():
  src = tuple(jnp.arange(2 * 6 * 2 * 3, dtype=jnp.float32).reshape(2, 6, 2, 3))
  dst = tuple(jnp.zeros((4, 2, 3)) for _ in range(2))
  moved = cache_lib.gather_pages(src, [5, 1])
  dst = cache_lib.scatter_pages(dst, [0, 3], moved)
  for s, d in zip(src, dst):
    np.testing.assert_array_equal(d[0], s[5])
    np.testing.assert_array_equal(d[3], s[1])


def test_bad_cache_settings_name_the_setting():
  cfg = ModelConfig()
  with pytest.raises(ValueError, match="cache.num_pages"):
    cache_lib.CacheSpec.for_model(cfg, pages_per_shard=0)
  with pytest.raises(ValueError, match="cache.page_size"):
    cache_lib.CacheSpec.for_model(cfg, pages_per_shard=4, page_size=0)
