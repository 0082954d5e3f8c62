"""The DeepSeek-V3 decoder: embedding -> [MLA -> dense MLP or DeepSeekMoE] x L -> norm -> head,
plus multi-token prediction modules (report §2.2).

Module and parameter names mirror Hugging Face `DeepseekV3ForCausalLM`
(`embed_tokens`, `layers[i].self_attn`, `layers[i].mlp`, `input_layernorm`,
`post_attention_layernorm`, `norm`, `lm_head`) so that `convert.hf` is a direct mapping.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.layers import MLP, Linear, normal_init
from dsv3_jax.model.mla import MultiHeadLatentAttention
from dsv3_jax.model.moe import DeepSeekMoE, MoEStats
from dsv3_jax.model.norms import RMSNorm
from dsv3_jax.model.rope import rope_cos_sin, rope_frequencies


def recomputed(module: nnx.Module, *args, **kwargs):
  """`module(*args, **kwargs)` under `jax.checkpoint`: the backward pass reruns the module's
  forward from its inputs instead of keeping its intermediates (activation recomputation; the
  V3 report §3.2.3 recomputes RMSNorm and the MLA up-projections this way, here a whole block).

  The module is split into its graph and state and merged inside the checkpointed function, so
  that jax.checkpoint sees only arrays (`nnx.remat` cannot lift the router's bias variable).
  The module must not update its own state in the call (true of every training forward here).
  `kwargs` (capacity, mask) reach the call as they are, closed over.

  Returns:
    What `module(*args, **kwargs)` returns, the same values; gradients through it are the same
    up to float rounding of the recomputed forward (bit-identical on CPU in tests).
  """
  graphdef, state = nnx.split(module)

  def run(state, *args):
    return nnx.merge(graphdef, state)(*args, **kwargs)

  return jax.checkpoint(run)(state, *args)


class DecoderLayer(nnx.Module):
  """Pre-norm block: h += MLA(norm(h)); h += FFN(norm(h)), FFN dense or DeepSeekMoE."""

  def __init__(self, config: ModelConfig, layer_idx: int, *, mesh: Optional[Mesh] = None,
               rngs: nnx.Rngs):
    c = config
    self.is_moe = c.is_moe_layer(layer_idx)
    self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
    self.self_attn = MultiHeadLatentAttention(c, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
    if self.is_moe:
      self.mlp = DeepSeekMoE(c, mesh=mesh, rngs=rngs)
    else:
      self.mlp = MLP(c.hidden_size, c.intermediate_size, dtype=jnp.dtype(c.dtype),
                     init_std=c.initializer_range, fp8_recipe=c.fp8_recipe("dense_mlp"),
                     rngs=rngs)

  def __call__(self, h, cos, sin, *, mask=None, capacity=None):
    """h: [B, S, D] -> ([B, S, D], MoEStats or None)."""
    h = h + self.self_attn(self.input_layernorm(h), cos, sin)
    x = self.post_attention_layernorm(h)
    if self.is_moe:
      y, stats = self.mlp(x, mask, capacity)
    else:
      y, stats = self.mlp(x), None
    return h + y, stats


class MultiTokenPrediction(nnx.Module):
  """One MTP module k (report eq. 21-23): h'_i = M_k [RMSNorm(h_i^{k-1}); RMSNorm(Emb(t_{i+k}))],
  then a transformer block; the output head and embedding are shared with the main model.

  Hugging Face / DeepSeek checkpoint names: `enorm`, `hnorm`, `eh_proj`, the block's usual
  names, and `shared_head.norm` (the final norm before the shared head).
  """

  def __init__(self, config: ModelConfig, layer_idx: int, *, mesh: Optional[Mesh] = None,
               rngs: nnx.Rngs):
    c = config
    self.enorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
    self.hnorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
    # Not an FP8 family: the report's FP8 list (§3.3.1) names the MLA and MLP GEMMs only.
    self.eh_proj = Linear(2 * c.hidden_size, c.hidden_size, dtype=jnp.dtype(c.dtype),
                          init_std=c.initializer_range, rngs=rngs)
    self.block = DecoderLayer(c, layer_idx, mesh=mesh, rngs=rngs)
    self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

  def __call__(self, h_prev, emb_next, cos, sin, *, mask=None, capacity=None):
    """h_prev: [B, S, D] previous depth's hidden states; emb_next: [B, S, D] = Emb(t_{i+k}).

    Returns (h_k [B, S, D] before the shared norm, normed h_k, MoEStats or None).
    """
    x = self.eh_proj(jnp.concatenate([self.hnorm(h_prev), self.enorm(emb_next)], axis=-1))
    h, stats = self.block(x, cos, sin, mask=mask, capacity=capacity)
    return h, self.norm(h), stats


class ModelOutput(NamedTuple):
  """Forward results.

  logits: [B, S, V] float32 next-token logits.
  mtp_logits: tuple of D arrays [B, S, V] float32; depth d at position i predicts t[i+d+1].
  moe_stats: tuple of `MoEStats`, one per MoE layer (main stack first, then MTP blocks).
  hidden_states: tuple of [B, S, D] (embedding output and every layer's output) when requested,
    else ().
  """

  logits: jax.Array
  mtp_logits: tuple
  moe_stats: tuple
  hidden_states: tuple


class Transformer(nnx.Module):
  """DeepSeek-V3 causal LM with optional multi-token prediction.

  `model(input_ids)` returns logits [batch, seq, vocab] (float32); `model.forward` returns the
  full `ModelOutput` for training.
  """

  def __init__(self, config: ModelConfig, *, mesh: Optional[Mesh] = None, rngs: nnx.Rngs):
    c = config.validate()
    self.config = c
    self.embed_tokens = nnx.Param(normal_init(c.embedding_init_std)(
        rngs.params(), (c.vocab_size, c.hidden_size), jnp.float32))
    self.layers = nnx.List([DecoderLayer(c, i, mesh=mesh, rngs=rngs)
                            for i in range(c.num_hidden_layers)])
    self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
    if not c.tie_word_embeddings:
      self.lm_head = Linear(c.hidden_size, c.vocab_size, dtype=jnp.float32,
                            init_std=c.initializer_range, rngs=rngs)
    self.mtp = nnx.List([MultiTokenPrediction(c, c.num_hidden_layers + d, mesh=mesh, rngs=rngs)
                         for d in range(c.mtp_depth)])
    inv_freq, self.rope_attention_scaling = rope_frequencies(c)
    self.rope_inv_freq = tuple(float(f) for f in inv_freq)  # static, hashable

  @property
  def moe_layers(self) -> list[DeepSeekMoE]:
    """Every DeepSeekMoE module, in the order of `ModelOutput.moe_stats`."""
    blocks = list(self.layers) + [m.block for m in self.mtp]
    return [b.mlp for b in blocks if b.is_moe]

  def embed(self, tokens: jax.Array) -> jax.Array:
    return self.embed_tokens[...][tokens].astype(jnp.dtype(self.config.dtype))

  def head(self, h: jax.Array) -> jax.Array:
    """[B, S, D] normed hidden -> [B, S, V] float32 logits (head kept in float32, report §3.3)."""
    if self.config.tie_word_embeddings:
      return jnp.dot(h.astype(jnp.float32), self.embed_tokens[...].T)
    return self.lm_head(h.astype(jnp.float32))

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """input_ids: [B, S] int -> logits [B, S, V] float32 (no MTP, dropless)."""
    return self.forward(input_ids, with_mtp=False).logits

  def forward(self, input_ids: jax.Array, *, mtp_tokens: Optional[jax.Array] = None,
              mask: Optional[jax.Array] = None, capacity: Optional[tuple[int, ...]] = None, with_mtp: bool = True,
              output_hidden_states: bool = False, remat: bool = False) -> ModelOutput:
    """Full forward pass.

    Args:
      input_ids: [B, S] int32 tokens t_0..t_{S-1}.
      mtp_tokens: [B, S + D] int32, the window t_0..t_{S+D-1} from which depth d takes
        Emb(t_{i+d}); defaults to input_ids padded with 0 (those positions are never
        supervised by the trainer).
      mask: [B, S] bool, False for padding (excluded from expert counts and routing).
      capacity: static MoE buffer capacity per hop (None = dropless worst case).
      with_mtp: also run the MTP modules.
      output_hidden_states: also return every layer's output.
      remat: recompute each decoder block (and each MTP module) in the backward pass instead
        of keeping its activations (`recomputed`; train.remat): only the blocks' inputs stay
        live between the forward and the backward pass. Same values; changes nothing without
        a gradient.

    Returns:
      `ModelOutput`.
    """
    c = self.config
    b, s = input_ids.shape
    cos, sin = rope_cos_sin(jnp.arange(s), jnp.asarray(self.rope_inv_freq, jnp.float32),
                            self.rope_attention_scaling)
    h = self.embed(input_ids)
    hidden = [h] if output_hidden_states else []
    stats = []
    kw = dict(mask=mask, capacity=capacity)
    call = (lambda m, *a: recomputed(m, *a, **kw)) if remat else (lambda m, *a: m(*a, **kw))
    for layer in self.layers:
      h, st = call(layer, h, cos, sin)
      if st is not None:
        stats.append(st)
      if output_hidden_states:
        hidden.append(h)
    logits = self.head(self.norm(h))

    mtp_logits = []
    if with_mtp and c.mtp_depth:
      d_max = c.mtp_depth
      if mtp_tokens is None:
        mtp_tokens = jnp.pad(input_ids, ((0, 0), (0, d_max)))
      if mtp_tokens.shape != (b, s + d_max):
        raise ValueError(f"mtp_tokens must be [batch, seq + mtp_depth] = {(b, s + d_max)}, "
                         f"got {mtp_tokens.shape}")
      h_prev = h
      for d, module in enumerate(self.mtp, start=1):
        emb = self.embed(mtp_tokens[:, d:d + s])
        h_prev, normed, st = call(module, h_prev, emb, cos, sin)
        if st is not None:
          stats.append(st)
        mtp_logits.append(self.head(normed))
    return ModelOutput(logits, tuple(mtp_logits), tuple(stats), tuple(hidden))


def abstract_model(config: ModelConfig, mesh: Optional[Mesh] = None) -> Transformer:
  """The model with jax.ShapeDtypeStruct leaves instead of arrays (nothing is allocated).

  Used for the 671B configuration: parameter counts and shapes via `jax.eval_shape`.
  """
  return nnx.eval_shape(lambda: Transformer(config, mesh=mesh, rngs=nnx.Rngs(0)))
