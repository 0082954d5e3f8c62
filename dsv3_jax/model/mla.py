"""Multi-head Latent Attention (DeepSeek-V2 §2.1; DeepSeek-V3 report §2.1.1, eqs. 1-11).

Keys and values are generated from a joint latent c_KV = W_DKV h of `kv_lora_rank` dims (what
an inference engine caches) plus one decoupled RoPE key k^R of `qk_rope_head_dim` dims shared
by all heads. Queries come from their own low-rank latent when `q_lora_rank` is set.

Layouts follow Hugging Face `DeepseekV3Attention`:
  q_b_proj / q_proj out, per head: [q_nope (qk_nope_head_dim) | q_rope (qk_rope_head_dim)]
  kv_a_proj_with_mqa out:          [c_KV (kv_lora_rank) | k_rope (qk_rope_head_dim)]
  kv_b_proj out, per head:         [k_nope (qk_nope_head_dim) | v (v_head_dim)]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.model.attention import dot_product_attention
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.layers import Linear
from dsv3_jax.model.norms import RMSNorm
from dsv3_jax.model.rope import apply_rope, softmax_scale

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


class MultiHeadLatentAttention(nnx.Module):
  """Causal MLA self-attention (training / prefill form: keys and values are up-projected)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    dtype = jnp.dtype(c.dtype)
    # The projections run in FP8 when `attention_projections` is an FP8 family (report §3.3);
    # the attention core (softmax(q k^T) v) never does.
    kw = dict(dtype=dtype, init_std=c.initializer_range,
              fp8_recipe=c.fp8_recipe("attention_projections"), rngs=rngs)
    h = c.num_attention_heads
    if c.q_lora_rank is None:
      self.q_proj = Linear(c.hidden_size, h * c.qk_head_dim, **kw)
    else:
      self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, **kw)
      self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=LATENT_NORM_EPS)
      self.q_b_proj = Linear(c.q_lora_rank, h * c.qk_head_dim, **kw)
    self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, **kw)
    self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=LATENT_NORM_EPS)
    self.kv_b_proj = Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), **kw)
    self.o_proj = Linear(h * c.v_head_dim, c.hidden_size, **kw)
    self.scale = softmax_scale(c)

  def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-head queries (report eqs. 6-9).

    Args:
      x: [batch, seq, hidden].
      cos, sin: [seq, qk_rope_head_dim // 2] or [batch, seq, qk_rope_head_dim // 2] float32.

    Returns:
      q_nope [batch, seq, heads, qk_nope_head_dim] and the rotated q_rope [batch, seq, heads,
      qk_rope_head_dim] (rotate-half layout, `rope.apply_rope`), in the compute dtype.
    """
    c = self.config
    b, s, _ = x.shape
    h = c.num_attention_heads
    if c.q_lora_rank is None:
      q = self.q_proj(x)
    else:
      q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
    q = q.reshape(b, s, h, c.qk_head_dim)
    q_nope, q_rope = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
    return q_nope, apply_rope(q_rope, cos, sin, interleave=c.rope_interleave)

  def latent_kv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What an inference engine caches (report eqs. 1-3, Insights §2.1.2).

    Args:
      x: [batch, seq, hidden].
      cos, sin: [seq, qk_rope_head_dim // 2] or [batch, seq, qk_rope_head_dim // 2] float32.

    Returns:
      c_kv [batch, seq, kv_lora_rank], already normalised by `kv_a_layernorm`, and the rotated
      shared key k_rope [batch, seq, qk_rope_head_dim] (one for all heads), compute dtype.
    """
    c = self.config
    kv_a = self.kv_a_proj_with_mqa(x)
    c_kv, k_rope = kv_a[..., :c.kv_lora_rank], kv_a[..., c.kv_lora_rank:]
    k_rope = apply_rope(k_rope[:, :, None, :], cos, sin, interleave=c.rope_interleave)[:, :, 0]
    return self.kv_a_layernorm(c_kv), k_rope

  def attend(self, q_nope: jax.Array, q_rope: jax.Array, c_kv: jax.Array,
             k_rope: jax.Array) -> jax.Array:
    """Causal attention with up-projected keys and values, then the output projection.

    Args:
      q_nope, q_rope: [batch, seq, heads, *] from `queries`.
      c_kv, k_rope: [batch, seq, *] from `latent_kv`.

    Returns:
      [batch, seq, hidden] in the compute dtype.
    """
    c = self.config
    b, s, h, _ = q_nope.shape
    kv = self.kv_b_proj(c_kv).reshape(b, s, h, c.qk_nope_head_dim + c.v_head_dim)
    k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
    # Keys: per-head k_nope next to the one rope key shared by all heads (report eq. 5).
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], (b, s, h,
                                                                         c.qk_rope_head_dim))],
                        axis=-1)
    heads_first = lambda t: t.transpose(0, 2, 1, 3).reshape(b * h, s, t.shape[-1])
    out = dot_product_attention(heads_first(q), heads_first(k), heads_first(v), scale=self.scale)
    out = out.reshape(b, h, s, c.v_head_dim).transpose(0, 2, 1, 3).reshape(b, s, h * c.v_head_dim)
    return self.o_proj(out)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Causal self-attention (`queries`, `latent_kv`, then `attend`).

    Args:
      x: [batch, seq, hidden].
      cos, sin: [seq, qk_rope_head_dim // 2] float32 rotary tables (`rope.rope_cos_sin`).

    Returns:
      [batch, seq, hidden] in the compute dtype.
    """
    q_nope, q_rope = self.queries(x, cos, sin)
    c_kv, k_rope = self.latent_kv(x, cos, sin)
    return self.attend(q_nope, q_rope, c_kv, k_rope)
