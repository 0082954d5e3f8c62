"""Absorbed MLA decoding on the paged cache equals the materialised MLA of model/mla.py for
every cached length (page boundaries included), reads nothing outside a sequence's pages, and
never leaks an unused slot (unused pages are filled with NaN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.infer import cache as cache_lib
from dsv3_jax.infer.attention import mla_decode
from dsv3_jax.model.config import ModelConfig, RopeScaling
from dsv3_jax.model.mla import MultiHeadLatentAttention
from dsv3_jax.model.rope import rope_cos_sin, rope_frequencies

SMALL = dict(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
             n_group=4, topk_group=2, num_experts_per_tok=2, initializer_range=0.2,
             max_position_embeddings=64)
CONFIGS = {
    "q_lora": ModelConfig(**SMALL),
    "no_q_lora_rotate_half_yarn": ModelConfig(**{**SMALL, "q_lora_rank": None},
                                              rope_interleave=False,
                                              rope_scaling=RopeScaling(
                                                  factor=4.0, original_max_position_embeddings=16,
                                                  mscale=1.0, mscale_all_dim=1.0)),
}
N, PAGE = 21, 4  # lengths 0..20 cross the page boundaries 4, 8, 12, 16, 20


def _decode(attn, *args):
  """mla_decode, jitted as a whole (eager dispatch compiles every op separately)."""
  graphdef, state = nnx.split(attn)
  fn = jax.jit(lambda st, *a: mla_decode(nnx.merge(graphdef, st), *a, PAGE))
  return fn(state, *args)


def _tables(cfg, s):
  inv, scale = rope_frequencies(cfg)
  return rope_cos_sin(jnp.arange(s), jnp.asarray(inv), scale)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
  cfg = CONFIGS[request.param]
  attn = MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(1), (1, N, cfg.hidden_size))
  cos, sin = _tables(cfg, N)
  graphdef, state = nnx.split(attn)
  want, c_kv, k_rope = jax.jit(lambda st: (nnx.merge(graphdef, st)(x, cos, sin),
                                           *nnx.merge(graphdef, st).latent_kv(x, cos, sin)))(state)
  want = np.asarray(want)[0]  # materialised, causal: output at every position
  latents = np.asarray(jnp.concatenate([c_kv, k_rope], -1))[0]  # [N, r + dr]
  return cfg, attn, x, cos, sin, want, latents


def _pool_and_tables(cfg, latents, lengths, seed=0):
  """Every sequence b holds positions [0, lengths[b]) on its own pages (scrambled order);
  every other row of the pool, and every unused page, is NaN."""
  pages_per_seq = -(-N // PAGE)
  n_pages = len(lengths) * pages_per_seq + 3
  perm = np.random.default_rng(seed).permutation(n_pages)
  pool = np.full((n_pages, PAGE, latents.shape[1]), np.nan, np.float32)
  table = np.zeros((len(lengths), pages_per_seq), np.int32)
  held = []
  for b, length in enumerate(lengths):
    own = perm[b * pages_per_seq:(b + 1) * pages_per_seq]
    need = -(-(length + 1) // PAGE)  # pages for the cached tokens plus the new one
    table[b, :need] = own[:need]
    table[b, need:] = own[0]  # padding entries repeat a page the sequence holds
    held.append(set(own[:need].tolist()))
    for p in range(length):
      pool[own[p // PAGE], p % PAGE] = latents[p]
  return pool, table, held


def test_absorbed_decode_equals_materialised_mla_at_every_length(case):
  cfg, attn, x, cos, sin, want, latents = case
  lengths = np.arange(N)  # sequence b has b cached tokens and decodes token b
  pool, table, _ = _pool_and_tables(cfg, latents, lengths)
  pos = jnp.asarray(lengths[:, None], jnp.int32)
  xs = x[0][:, None, :]  # token b of the sequence, as a batch of N one-token steps
  cos_b, sin_b = cos[pos], sin[pos]
  out, new_pool = _decode(attn, xs, cos_b, sin_b, jnp.asarray(pool), jnp.asarray(table), pos,
                          jnp.ones((N, 1), bool))
  out = np.asarray(out)[:, 0]
  assert np.isfinite(out).all()
  scale = np.abs(want).max()
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * scale)
  # the new token's latent went to position `length` of the sequence's own pages
  new_pool = np.asarray(new_pool)
  for b in (0, 3, 4, 20):
    page = table[b, b // PAGE]
    np.testing.assert_allclose(new_pool[page, b % PAGE], latents[b], rtol=1e-6, atol=1e-6)


def test_several_new_tokens_at_once_are_causal(case):
  """T > 1 (the speculative verifier's shape): tokens L..L+2 of a sequence in one call."""
  cfg, attn, x, cos, sin, want, latents = case
  starts = np.array([0, 3, 7, 14])
  t = 3
  pool, table, _ = _pool_and_tables(cfg, latents, starts + t - 1)
  # only positions < start are in the cache; the call writes start .. start + t - 1
  for b, s in enumerate(starts):
    for p in range(s, s + t):
      pool[table[b, p // PAGE], p % PAGE] = np.nan
  pos = jnp.asarray(starts[:, None] + np.arange(t)[None, :], jnp.int32)
  xs = x[0][pos]
  out, _ = _decode(attn, xs, cos[pos], sin[pos], jnp.asarray(pool), jnp.asarray(table), pos,
                   jnp.ones(pos.shape, bool))
  np.testing.assert_allclose(np.asarray(out), want[np.asarray(pos)], rtol=0,
                             atol=1e-5 * np.abs(want).max())


def test_an_empty_slot_sees_nothing_writes_nothing_and_outputs_zero(case):
  cfg, attn, x, cos, sin, _, latents = case
  pool, table, _ = _pool_and_tables(cfg, latents, [5, 0])
  pos = jnp.array([[5], [0]], jnp.int32)
  valid = jnp.array([[True], [False]])
  out, new_pool = _decode(attn, x[0][jnp.array([[5], [9]])], cos[pos], sin[pos],
                          jnp.asarray(pool), jnp.asarray(table), pos, valid)
  out = np.asarray(out)
  assert np.isfinite(out).all()
  # an invalid row attends to nothing: the attention output is o_proj(0) = 0
  np.testing.assert_array_equal(out[1], 0.0)
  changed = ~np.isclose(np.asarray(new_pool), pool, equal_nan=True)
  assert changed.any(axis=(1, 2)).sum() == 1  # only the valid token's page changed
  assert changed[table[0, 1]].any()
