"""Absorbed MLA decoding over the paged latent cache (DeepSeek-V2 §2.1.2 and appendix C;
Insights §2.1.2).

Per head h the materialised form scores q_h . [W_UK,h c_j ; k^R_j] and returns
o_h = sum_j p_hj W_UV,h c_j. Matrix associativity lets W_UK be folded into the query,
q~_h = W_UK,h^T q_h^nope (kv_lora_rank values), and W_UV into the output,
o_h = W_UV,h (sum_j p_hj c_j), so decoding never materialises per-head keys or values: the
scores are one dot product of [q~_h | q^R_h] with the cached entry [c_j | k^R_j], and the
weighted sum runs over the latent itself. Softmax is float32. Keys a query may not see (beyond
its position, unused rows of the last page, padding slots) are masked to a finite -1e30, and
rows past a sequence's length are never read from the pool (the row gather fills them with
0), so neither garbage nor NaN in a page can leak into a valid output, and a slot with no keys
at all yields exactly 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.infer import cache as cache_lib
from dsv3_jax.model.mla import MultiHeadLatentAttention

_NEG = -1e30


def absorbed_weights(attn: MultiHeadLatentAttention) -> tuple[jax.Array, jax.Array]:
  """W_UK [kv_lora_rank, heads, qk_nope_head_dim] and W_UV [kv_lora_rank, heads, v_head_dim],
  views of `kv_b_proj` (its per-head layout is [k_nope | v]), in the compute dtype."""
  c = attn.config
  w = attn.kv_b_proj.kernel[...].astype(jnp.dtype(c.dtype))
  w = w.reshape(c.kv_lora_rank, c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim)
  return w[..., :c.qk_nope_head_dim], w[..., c.qk_nope_head_dim:]


def latent_attention(q_lat: jax.Array, q_rope: jax.Array, kv: jax.Array, kv_len: jax.Array, *,
                     scale: float, sanitize: bool = True) -> jax.Array:
  """softmax over cached latents with per-query visible lengths (the absorbed core).

  Args:
    q_lat: [B, T, H, r] queries with W_UK absorbed (r = kv_lora_rank).
    q_rope: [B, T, H, dr] rotated rope queries.
    kv: [B, K, r + dr] cache rows [c_KV | k_rope] of each sequence, in page-table order; rows
      at or past max_t kv_len[b, t] must be finite (`cache.read_rows` zero-fills them, and
      `sanitize` zeroes them here for any other source).
    kv_len: [B, T] int32, query t sees rows [0, kv_len[b, t]) (0 = nothing: output 0).
    scale: softmax scale (`rope.softmax_scale`).
    sanitize: zero the rows no query sees before any product (needed when kv may hold garbage
      there, e.g. a plain page gather).

  Returns:
    [B, T, H, r] latent outputs sum_j p_j c_j in q_lat.dtype.
  """
  r = q_lat.shape[-1]
  k_rows = kv.shape[1]
  pos = jnp.arange(k_rows, dtype=jnp.int32)
  visible = pos[None, None, :] < kv_len[:, :, None]  # [B, T, K]
  kv = kv.astype(q_lat.dtype)
  if sanitize:
    seen = pos[None, :] < jnp.max(kv_len, axis=1)[:, None]  # [B, K]: some query sees the row
    kv = jnp.where(seen[:, :, None], kv, jnp.zeros((), q_lat.dtype))
  q = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], axis=-1)
  s = jnp.einsum("bthc,bkc->bthk", q, kv, preferred_element_type=jnp.float32) * scale
  s = jnp.where(visible[:, :, None, :], s, _NEG)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  p = e / jnp.sum(e, axis=-1, keepdims=True)
  # over the whole row (latent and rope part), then keep the latent: cheaper than slicing kv
  return jnp.einsum("bthk,bkc->bthc", p.astype(q_lat.dtype), kv)[..., :r]


def mla_decode(attn: MultiHeadLatentAttention, x: jax.Array, cos: jax.Array, sin: jax.Array,
               pool: jax.Array, page_table: jax.Array, positions: jax.Array, valid: jax.Array,
               page_size: int) -> tuple[jax.Array, jax.Array]:
  """T new tokens per sequence: write their latents into the pool, attend (absorbed) over the
  sequence's pages (its earlier tokens and, causally, the new ones).

  T = 1 is ordinary decoding; T > 1 verifies several tokens at once (speculative decoding).

  Args:
    attn: the layer's MLA module (weights).
    x: [B, T, hidden] normed hidden states of the new tokens.
    cos, sin: [B, T, qk_rope_head_dim // 2] float32 rotary tables at `positions`.
    pool: [num_pages, page_size, kv_lora_rank + qk_rope_head_dim] this layer's pool.
    page_table: [B, P] int32 page ids; only these P pages per sequence are read.
    positions: [B, T] int32 token positions (token t of sequence b at positions[b, t]); the
      sequence's cache holds positions [0, positions[b, 0]) already.
    valid: [B, T] bool; invalid tokens write nothing and see nothing (output 0 before o_proj).
    page_size: rows per page.

  Returns:
    (out [B, T, hidden] in the compute dtype, updated pool).
  """
  q_nope, q_rope = attn.queries(x, cos, sin)
  c_kv, k_rope = attn.latent_kv(x, cos, sin)
  slots = cache_lib.slot_ids(page_table, positions, valid, page_size)
  pool = cache_lib.write_latents(pool, slots, jnp.concatenate([c_kv, k_rope], axis=-1))
  kv_len = jnp.where(valid, positions + 1, 0)
  kv = cache_lib.read_rows(pool, page_table, jnp.max(kv_len, axis=1))  # zero past the length
  w_uk, w_uv = absorbed_weights(attn)
  q_lat = jnp.einsum("bthd,rhd->bthr", q_nope, w_uk)
  o_lat = latent_attention(q_lat, q_rope, kv, kv_len, scale=attn.scale, sanitize=False)
  out = jnp.einsum("bthr,rhv->bthv", o_lat, w_uv)
  b, t = x.shape[:2]
  return attn.o_proj(out.reshape(b, t, -1)), pool
