"""Compute cost models: training and inference FLOPs per token (Insights §2.2.1, Table 2).

Counting rules (1 multiply-add = 2 FLOPs):
  * Every weight matrix a token passes through costs 2 FLOPs per parameter in the forward pass:
    attention projections, the dense MLP or the router + activated experts, and the output head.
    The embedding is a table lookup (0 FLOPs); norms, activations, RoPE and softmax are ignored.
  * The attention core (Q K^T and the attention-weighted sum of V) costs, per layer and head,
    2 * d_qk and 2 * d_v FLOPs per attended key. With a causal mask a token at position i attends
    to i keys, so over a sequence of S tokens the mean is (S + 1) / 2 keys.
  * Training = forward + backward, with backward = 2 x forward (activation and weight gradients),
    i.e. 3 x the forward FLOPs, the 6N rule plus attention.

With these rules the training cost at sequence length 4096 comes out at 155.3 GFLOPs
(DeepSeek-V2), 250.5 (DeepSeek-V3) and 2473.2 (LLaMA-3.1-405B), against 155 / 250 / 2448 in
Table 2; see `results/flops_per_token.md` for the LLaMA and Qwen2.5-72B gaps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from dsv3_jax.analysis._spec import ModelSpec
from dsv3_jax.analysis.memory import attention_params_per_layer, expert_params

ATTENTION_PRODUCTS = ("qk", "av")


def _check_len(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive integer (tokens), got {value!r}")


def matmul_params_per_token(model: Any) -> int:
  """Weight-matrix parameters one token multiplies through (activated, embedding excluded).

  Attention projections, dense MLPs, router + (num_experts_per_tok routed + shared) experts, and
  the output head (tied or not, the head is a matmul). Bias and norm vectors are excluded.

  Raises:
    ValueError: on invalid configs.
  """
  s = ModelSpec.from_config(model)
  h = s.hidden_size
  attn = attention_params_per_layer(s)
  if s.attention == "mla":  # drop the two internal RMSNorm vectors
    attn -= (s.q_lora_rank or 0) + s.kv_lora_rank
  elif s.attention_bias:
    attn -= s.num_attention_heads * s.head_dim + 2 * s.num_key_value_heads * s.head_dim
  dense = 3 * h * s.intermediate_size
  moe = ((s.num_experts_per_tok + s.n_shared_experts) * expert_params(s) +
         s.n_routed_experts * h) if s.is_moe else 0
  head = s.vocab_size * h
  return s.num_hidden_layers * attn + s.num_dense_layers * dense + s.num_moe_layers * moe + head


def attention_core_flops_per_key(model: Any, products: Sequence[str] = ATTENTION_PRODUCTS) -> int:
  """Forward FLOPs of the attention core per attended key, summed over heads and layers.

  2 * n_h * (d_qk + d_v) * layers; for MLA d_qk = qk_nope + qk_rope (192 for V3) and d_v =
  v_head_dim (128), in the non-absorbed form used for training and prefill.

  Args:
    model: `ModelSpec`, config name or config.
    products: which of "qk" (scores) and "av" (weighted values) to count; both by default.

  Raises:
    ValueError: for an unknown product name.
  """
  s = ModelSpec.from_config(model)
  bad = [p for p in products if p not in ATTENTION_PRODUCTS]
  if bad or not products:
    raise ValueError(f"products={tuple(products)!r}; allowed: non-empty subset of "
                     f"{ATTENTION_PRODUCTS}")
  dims = (s.qk_head_dim if "qk" in products else 0) + (s.value_head_dim if "av" in products
                                                         else 0)
  return 2 * s.num_attention_heads * dims * s.num_hidden_layers


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
  """FLOPs per token, split into weight matmuls and the attention core.

  Attributes:
    matmul: FLOPs of the weight matrices.
    attention: FLOPs of Q K^T and A V.
    total: matmul + attention.
  """

  matmul: float
  attention: float

  @property
  def total(self) -> float:
    return self.matmul + self.attention


def forward_flops_per_token(model: Any, attended_keys: float,
                            products: Sequence[str] = ATTENTION_PRODUCTS) -> FlopsPerToken:
  """Forward FLOPs of one token that attends to `attended_keys` keys in every layer.

  Args:
    model: `ModelSpec`, config name or config.
    attended_keys: keys per layer (>= 0; fractional for an average over positions).
    products: attention products counted (see `attention_core_flops_per_key`).

  Raises:
    ValueError: if `attended_keys` < 0.
  """
  if not isinstance(attended_keys, (int, float)) or attended_keys < 0:
    raise ValueError(f"attended_keys must be >= 0, got {attended_keys!r}")
  return FlopsPerToken(matmul=2.0 * matmul_params_per_token(model),
                       attention=attended_keys * attention_core_flops_per_key(model, products))


def training_flops_per_token(model: Any, seq_len: int = 4096, causal: bool = True,
                             backward_factor: float = 2.0,
                             products: Sequence[str] = ATTENTION_PRODUCTS) -> FlopsPerToken:
  """Training FLOPs per token at sequence length `seq_len` (Insights Table 2 uses 4096).

  (1 + backward_factor) x forward, forward = 2 x matmul parameters + attention core over the mean
  number of attended keys ((seq_len + 1) / 2 with a causal mask, seq_len without).

  Args:
    model: `ModelSpec`, config name or config.
    seq_len: training sequence length in tokens (positive int).
    causal: count only the keys a causal mask keeps.
    backward_factor: backward / forward FLOPs ratio (2: gradients w.r.t. inputs and weights).
    products: attention products counted.

  Returns:
    `FlopsPerToken` in FLOPs.

  Raises:
    ValueError: for a non-positive `seq_len` or a negative `backward_factor`.
  """
  _check_len("seq_len", seq_len)
  if not isinstance(backward_factor, (int, float)) or backward_factor < 0:
    raise ValueError(f"backward_factor must be >= 0, got {backward_factor!r}")
  keys = (seq_len + 1) / 2 if causal else float(seq_len)
  fwd = forward_flops_per_token(model, keys, products)
  scale = 1.0 + backward_factor
  return FlopsPerToken(matmul=scale * fwd.matmul, attention=scale * fwd.attention)


def inference_flops_per_token(model: Any, context_len: int, phase: str = "decode",
                              products: Sequence[str] = ATTENTION_PRODUCTS) -> FlopsPerToken:
  """Inference (forward-only) FLOPs per token.

  Args:
    model: `ModelSpec`, config name or config.
    context_len: tokens in the sequence (positive int).
    phase: "decode": a new token at position `context_len` attends to all `context_len` cached
      keys; "prefill": the mean over a causal prompt of `context_len` tokens ((S + 1) / 2 keys).
    products: attention products counted.

  Returns:
    `FlopsPerToken` in FLOPs (MLA counted in its non-absorbed form).

  Raises:
    ValueError: for a non-positive `context_len` or an unknown `phase`.
  """
  _check_len("context_len", context_len)
  if phase == "decode":
    keys = float(context_len)
  elif phase == "prefill":
    keys = (context_len + 1) / 2
  else:
    raise ValueError(f"phase={phase!r}; allowed: ('decode', 'prefill')")
  return forward_flops_per_token(model, keys, products)
