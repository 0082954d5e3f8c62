"""Memory cost models: KV cache bytes per token and parameter counts (total and activated).

KV cache (Insights §2.1.2, Table 1): per token and per layer a cache stores
  MHA: 2 * num_attention_heads * head_dim elements (a key and a value per head);
  GQA: 2 * num_key_value_heads * head_dim;
  MQA: 2 * head_dim (one shared key/value head);
  MLA: kv_lora_rank + qk_rope_head_dim (the compressed latent c_KV and the shared RoPE key k_R,
       DeepSeek-V2 report §2.1.2-2.1.3, V3 report §2.1.1, eq. 1-5).
Bytes follow from the cache precision (16 bits for BF16; 8 or 4 for a quantized cache, plus one
scale per `quant_group_size` elements). KB = 1000 bytes, as in Table 1.

Parameter counts follow the Hugging Face module layout (SwiGLU MLPs with three matrices, RMSNorm
weights, router weights), so they can be compared with checkpoint sizes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from dsv3_jax.analysis._spec import ModelSpec

KB = 1000  # bytes, the unit of Insights Table 1
ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")


def _check_positive(name: str, value: Any, integer: bool = True) -> None:
  ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else \
      isinstance(value, (int, float)) and not isinstance(value, bool)
  if not ok or value <= 0:
    kind = "a positive integer" if integer else "> 0"
    raise ValueError(f"{name} must be {kind}, got {value!r}")


def bytes_per_element(cache_bits: float = 16, quant_group_size: Optional[int] = None,
                      scale_bits: float = 32) -> float:
  """Storage per cached element, in bytes, including quantization scales.

  Args:
    cache_bits: bits per element (16 = BF16, 8 = FP8/INT8, 4 = INT4...).
    quant_group_size: elements sharing one scale; None for no scales (BF16, or per-tensor scales).
    scale_bits: bits of one scale (32 for an FP32 scale).

  Returns:
    Bytes per element (float).

  Raises:
    ValueError: if `cache_bits` is not in (0, 32], or a group size / scale width is not positive.
  """
  if not isinstance(cache_bits, (int, float)) or not 0 < cache_bits <= 32:
    raise ValueError(f"cache_bits must be in (0, 32], got {cache_bits!r}")
  size = cache_bits / 8
  if quant_group_size is not None:
    _check_positive("quant_group_size", quant_group_size)
    _check_positive("scale_bits", scale_bits, integer=False)
    size += scale_bits / 8 / quant_group_size
  return size


def kv_elements_per_token_per_layer(kind: str, *, num_heads: int = 0, num_kv_heads: int = 0,
                                    head_dim: int = 0, kv_lora_rank: int = 0,
                                    qk_rope_head_dim: int = 0) -> int:
  """Cached elements per token in one layer for an attention kind.

  Args:
    kind: "mha", "gqa", "mqa" or "mla".
    num_heads: attention heads (MHA).
    num_kv_heads: key/value heads (GQA).
    head_dim: per-head dimension (MHA/GQA/MQA).
    kv_lora_rank: MLA latent dimension d_c.
    qk_rope_head_dim: MLA decoupled RoPE key dimension d_h^R (one key shared by all heads).

  Returns:
    Element count (int).

  Raises:
    ValueError: for an unknown kind or a non-positive size the kind needs.
  """
  if kind == "mha":
    _check_positive("num_heads", num_heads)
    _check_positive("head_dim", head_dim)
    return 2 * num_heads * head_dim
  if kind == "gqa":
    _check_positive("num_kv_heads", num_kv_heads)
    _check_positive("head_dim", head_dim)
    return 2 * num_kv_heads * head_dim
  if kind == "mqa":
    _check_positive("head_dim", head_dim)
    return 2 * head_dim
  if kind == "mla":
    _check_positive("kv_lora_rank", kv_lora_rank)
    _check_positive("qk_rope_head_dim", qk_rope_head_dim)
    return kv_lora_rank + qk_rope_head_dim
  raise ValueError(f"kind={kind!r}; allowed: {ATTENTION_KINDS}")


def attention_kind(model: ModelSpec) -> str:
  """"mla", or "mha" / "mqa" / "gqa" from the key/value head count of a GQA model.

  Args:
    model: a `ModelSpec`.
  """
  if model.attention == "mla":
    return "mla"
  if model.num_key_value_heads == model.num_attention_heads:
    return "mha"
  if model.num_key_value_heads == 1:
    return "mqa"
  return "gqa"


def kv_cache_bytes_per_token(model: Any, cache_bits: float = 16,
                             quant_group_size: Optional[int] = None,
                             scale_bits: float = 32) -> float:
  """KV cache bytes one token occupies across all layers (no sliding window).

  Insights Table 1: DeepSeek-V3 (512 + 64) * 61 layers * 2 bytes = 70,272 B; Qwen2.5-72B
  2 * 8 * 128 * 80 * 2 = 327,680 B; LLaMA-3.1-405B 2 * 8 * 128 * 126 * 2 = 516,096 B.

  Args:
    model: a `ModelSpec`, a config name, or a config (see `ModelSpec.from_config`). The MTP
      module's layer is not counted (it is not part of decoding's main stack).
    cache_bits, quant_group_size, scale_bits: cache precision, see `bytes_per_element`.

  Returns:
    Bytes per token (float; an integer for 16/8-bit caches without scales).

  Raises:
    ValueError: on invalid precision arguments or config sizes.
  """
  spec = ModelSpec.from_config(model)
  kind = attention_kind(spec)
  elements = kv_elements_per_token_per_layer(
      kind, num_heads=spec.num_attention_heads, num_kv_heads=spec.num_key_value_heads,
      head_dim=spec.head_dim, kv_lora_rank=spec.kv_lora_rank,
      qk_rope_head_dim=spec.qk_rope_head_dim)
  return elements * spec.num_hidden_layers * bytes_per_element(cache_bits, quant_group_size,
                                                                scale_bits)


def kv_cache_bytes(model: Any, context_len: int, batch_size: int = 1,
                   sliding_window: Optional[int] = None, window_layers: Optional[int] = None,
                   cache_bits: float = 16, quant_group_size: Optional[int] = None,
                   scale_bits: float = 32) -> float:
  """KV cache bytes for `batch_size` sequences of `context_len` tokens.

  With a sliding window of W tokens (Mistral / Gemma style; Insights §2.1.3 "windowed KV"), a
  windowed layer keeps only the last W tokens; `window_layers` of the layers are windowed (all by
  default), the others keep the full context.

  Args:
    model: `ModelSpec`, config name or config.
    context_len: tokens per sequence (positive int).
    batch_size: sequences (positive int).
    sliding_window: window W in tokens, 1 <= W <= context_len; None for full attention.
    window_layers: how many layers use the window (0..num_hidden_layers); None = all.
    cache_bits, quant_group_size, scale_bits: cache precision, see `bytes_per_element`.

  Returns:
    Bytes (float).

  Raises:
    ValueError: for non-positive sizes, a window larger than the context, or `window_layers`
      outside 0..num_hidden_layers.
  """
  spec = ModelSpec.from_config(model)
  _check_positive("context_len", context_len)
  _check_positive("batch_size", batch_size)
  per_token_layer = kv_cache_bytes_per_token(spec, cache_bits, quant_group_size, scale_bits) / \
      spec.num_hidden_layers
  layers = spec.num_hidden_layers
  if sliding_window is None:
    if window_layers is not None:
      raise ValueError("window_layers is set but sliding_window is None; set both or neither")
    return batch_size * layers * context_len * per_token_layer
  _check_positive("sliding_window", sliding_window)
  if sliding_window > context_len:
    raise ValueError(f"sliding_window={sliding_window} is larger than context_len={context_len}; "
                     f"allowed: 1..{context_len}")
  windowed = layers if window_layers is None else window_layers
  if not isinstance(windowed, int) or not 0 <= windowed <= layers:
    raise ValueError(f"window_layers must be an integer in 0..{layers}, got {window_layers!r}")
  tokens = windowed * sliding_window + (layers - windowed) * context_len
  return batch_size * tokens * per_token_layer


# --------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class ParameterCounts:
  """Parameter counts of a model (element counts).

  Attributes:
    total: every parameter of the main model (embedding, layers, final norm, head); the MTP
      module is excluded (DeepSeek-V3's 671B excludes its 14B MTP module, V3 report §1).
    activated: parameters one token computes with: attention, norms, the dense MLP or the router
      + `num_experts_per_tok` routed + all shared experts (DeepSeekMoE), and the output head. The
      input embedding table is excluded (a token reads one row of it); with this convention the
      counts round to the published 37B (V3), 21B (V2) and 2.4B (V2-Lite).
    embedding: the input embedding table.
    head: the output projection (0 if tied).
    attention: all layers' attention parameters (projections + their norms).
    dense_mlp: all dense MLP layers.
    experts_total: all MoE layers' routed + shared experts + routers.
    experts_activated: the MoE part one token touches.
    norms: layer and final RMSNorm weights (excluding attention-internal norms).
    mtp: the multi-token-prediction modules, counting their projection, norms and transformer
      block (embedding and head are shared with the main model).
  """

  total: int
  activated: int
  embedding: int
  head: int
  attention: int
  dense_mlp: int
  experts_total: int
  experts_activated: int
  norms: int
  mtp: int


def attention_params_per_layer(model: Any) -> int:
  """Parameters of one attention block (projections, MLA's internal RMSNorms, GQA biases).

  MLA (V3 report §2.1.1): W^{DQ} [h, d_c'] + q norm + W^{UQ}/W^{QR} [d_c', n_h (d_h + d_h^R)]
  (or a plain [h, n_h (d_h + d_h^R)] without `q_lora_rank`), W^{DKV}/W^{KR} [h, d_c + d_h^R] + kv
  norm, W^{UK}/W^{UV} [d_c, n_h (d_h + d_v)], W^O [n_h d_v, h]. GQA: W_Q, W_K, W_V, W_O (+ q/k/v
  biases when `attention_bias`).

  Raises:
    ValueError: on invalid configs.
  """
  s = ModelSpec.from_config(model)
  h = s.hidden_size
  if s.attention == "mla":
    qk = s.num_attention_heads * s.qk_head_dim
    if s.q_lora_rank:
      q = h * s.q_lora_rank + s.q_lora_rank + s.q_lora_rank * qk
    else:
      q = h * qk
    kv = h * (s.kv_lora_rank + s.qk_rope_head_dim) + s.kv_lora_rank
    kv += s.kv_lora_rank * s.num_attention_heads * (s.qk_nope_head_dim + s.v_head_dim)
    o = s.num_attention_heads * s.v_head_dim * h
    return q + kv + o
  q_out = s.num_attention_heads * s.head_dim
  kv_out = s.num_key_value_heads * s.head_dim
  bias = (q_out + 2 * kv_out) if s.attention_bias else 0
  return h * q_out + 2 * h * kv_out + q_out * h + bias


def expert_params(model: Any) -> int:
  """Parameters of one routed/shared expert: a SwiGLU MLP, 3 * hidden * moe_intermediate_size.

  Raises:
    ValueError: on invalid configs.
  """
  s = ModelSpec.from_config(model)
  return 3 * s.hidden_size * s.moe_intermediate_size


def parameter_counts(model: Any) -> ParameterCounts:
  """Total and per-token activated parameters (Insights Table 2, V3 report §1, V2 report Table 1).

  Args:
    model: `ModelSpec`, config name or config.

  Returns:
    `ParameterCounts` (element counts, ints).

  Raises:
    ValueError: on invalid configs.
  """
  s = ModelSpec.from_config(model)
  h = s.hidden_size
  embedding = s.vocab_size * h
  head = 0 if s.tie_word_embeddings else s.vocab_size * h
  attn = attention_params_per_layer(s)
  dense = 3 * h * s.intermediate_size
  norms_per_layer = 2 * h
  router = s.n_routed_experts * h + (s.n_routed_experts if s.gate_bias else 0)
  moe_total = (s.n_routed_experts + s.n_shared_experts) * expert_params(s) + router if s.is_moe \
      else 0
  moe_active = (s.num_experts_per_tok + s.n_shared_experts) * expert_params(s) + router \
      if s.is_moe else 0
  L = s.num_hidden_layers
  attention = L * attn
  dense_mlp = s.num_dense_layers * dense
  experts_total = s.num_moe_layers * moe_total
  experts_activated = s.num_moe_layers * moe_active
  norms = L * norms_per_layer + h
  total = embedding + head + attention + dense_mlp + experts_total + norms
  activated = head + attention + dense_mlp + experts_activated + norms
  # MTP module k (V3 report §2.2): RMSNorm(h) x2, projection M_k [2h, h], one transformer block
  # (MoE when the main model's last layer is), and the final norm of its shared head.
  block = attn + norms_per_layer + (moe_total if s.is_moe else dense)
  mtp = s.num_nextn_predict_layers * (2 * h + 2 * h * h + block + h)
  return ParameterCounts(total=total, activated=activated, embedding=embedding, head=head,
                         attention=attention, dense_mlp=dense_mlp, experts_total=experts_total,
                         experts_activated=experts_activated, norms=norms, mtp=mtp)


# --------------------------------------------------------------------------- local inference
def weight_bytes(params: float, weight_bits: float = 4.0) -> float:
  """Bytes to store `params` parameters at `weight_bits` bits each (scales folded into the bits).

  Raises:
    ValueError: if `params` < 0 or `weight_bits` is not in (0, 32].
  """
  if not isinstance(params, (int, float)) or params < 0:
    raise ValueError(f"params must be >= 0, got {params!r}")
  if not isinstance(weight_bits, (int, float)) or not 0 < weight_bits <= 32:
    raise ValueError(f"weight_bits must be in (0, 32], got {weight_bits!r}")
  return params * weight_bits / 8


def decode_tokens_per_second(activated_params: float, memory_bandwidth: float,
                             weight_bits: float = 4.0, efficiency: float = 1.0,
                             kv_bytes_read: float = 0.0) -> float:
  """Batch-1 decode speed of a memory-bandwidth-bound device (Insights §2.2.2).

  Every decoded token reads its activated weights (and the KV cache it attends to) once from
  memory: tokens/s = efficiency * bandwidth / (activated_params * weight_bits / 8 + kv_bytes_read).
  A MoE with ~21B activated parameters (DeepSeek-V2) at 4 bits on a 256 GB/s PC-class AI SoC:
  256e9 / 10.4e9 ~ 24 tokens/s; a dense 70B model at the same precision: ~7 tokens/s.

  Args:
    activated_params: parameters read per token (use `ParameterCounts.activated`).
    memory_bandwidth: B/s (> 0).
    weight_bits: bits per weight (16 BF16, 8 FP8/INT8, 4 INT4...).
    efficiency: achieved fraction of `memory_bandwidth`, in (0, 1].
    kv_bytes_read: KV cache bytes read per token (context * bytes per token), >= 0.

  Returns:
    Tokens per second (an upper bound when efficiency = 1).

  Raises:
    ValueError: for non-positive params or bandwidth, or out-of-range bits / efficiency.
  """
  if not isinstance(activated_params, (int, float)) or activated_params <= 0:
    raise ValueError(f"activated_params must be > 0, got {activated_params!r}")
  if not isinstance(memory_bandwidth, (int, float)) or memory_bandwidth <= 0:
    raise ValueError(f"memory_bandwidth must be > 0 B/s, got {memory_bandwidth!r}")
  if not isinstance(efficiency, (int, float)) or not 0 < efficiency <= 1:
    raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}")
  if not isinstance(kv_bytes_read, (int, float)) or kv_bytes_read < 0:
    raise ValueError(f"kv_bytes_read must be >= 0, got {kv_bytes_read!r}")
  return efficiency * memory_bandwidth / (weight_bytes(activated_params, weight_bits) +
                                          kv_bytes_read)


# --------------------------------------------------------------------------- optimizer state
def trained_parameter_split(model: Any) -> tuple[int, int]:
  """(replicated, routed) parameter counts the optimizer trains, by where they live on an
  expert-parallel mesh (`parallel.mesh.shard_model`).

  Routed: every routed expert of every MoE layer, the MTP modules' included (split over the EP
  group). Replicated: everything else (embedding, head, attention, norms, dense MLPs, routers,
  shared experts, MTP projections). The routers' `e_score_correction_bias` is excluded: it is
  set by the auxiliary-loss-free update (V3 report §2.1.2), not by the optimizer.

  Args:
    model: `ModelSpec`, config name or config.

  Returns:
    (replicated, routed) element counts.

  Raises:
    ValueError: on invalid configs.
  """
  s = ModelSpec.from_config(model)
  c = parameter_counts(s)
  mtp_moe = s.num_nextn_predict_layers if s.is_moe else 0
  moe_layers = s.num_moe_layers + mtp_moe
  routed = moe_layers * s.n_routed_experts * expert_params(s)
  bias = moe_layers * s.n_routed_experts if s.gate_bias else 0
  return c.total + c.mtp - routed - bias, routed


def optimizer_state_bytes_per_device(replicated_params: int, routed_params: int, *,
                                     devices: int, ep_size: int, zero1: bool,
                                     states_per_param: int = 2, state_bytes: int = 4,
                                     scalar_bytes: int = 8) -> int:
  """Optimizer-state bytes one device holds, with or without ZeRO-1.

  ZeRO stage 1 (Rajbhandari et al., arXiv 1910.02054, §5.1, P_os: K Psi / N_d bytes of
  optimizer state per device) over the devices that hold the same parameters, as DeepSeek-V3
  trains (V3 report §3.2): replicated parameters are held by all `devices`, routed experts by
  the `devices / ep_size` expert-parallel replicas (one slice of the experts per EP rank).

    without ZeRO-1: K b (Psi_r + Psi_e / EP)
    ZeRO-1:         K b (Psi_r / N + Psi_e / (EP * N / EP)) = K b (Psi_r + Psi_e) / N

  plus `scalar_bytes` of replicated scalars (optax AdamW: two int32 step counts). Exact when
  every partitioned dimension divides by its device count (`train.zero1.leaf_plan`; true of
  configs/orion_4x8.py on 4 x 8); a leaf that does not divide keeps more copies.

  Args:
    replicated_params, routed_params: element counts (`trained_parameter_split`).
    devices: N, devices of the data-parallel x expert-parallel mesh.
    ep_size: EP, devices of one expert-parallel group (divides N and the routed experts).
    zero1: partitioned (True) or replicated (False) optimizer state.
    states_per_param: K, state elements per parameter (Adam: 2 moments; 3 with a separate
      float32 master copy of low-precision parameters; here parameters are the float32 master
      weights).
    state_bytes: b, bytes per state element (4: float32).
    scalar_bytes: bytes of the replicated scalars.

  Returns:
    Bytes per device (int).

  Raises:
    ValueError: non-positive sizes, or `ep_size` not dividing `devices` or the routed params.
  """
  for name, v in (("devices", devices), ("ep_size", ep_size),
                  ("states_per_param", states_per_param), ("state_bytes", state_bytes)):
    _check_positive(name, v)
  for name, v in (("replicated_params", replicated_params), ("routed_params", routed_params),
                  ("scalar_bytes", scalar_bytes)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
  if devices % ep_size or routed_params % ep_size:
    raise ValueError(f"ep_size={ep_size} must divide devices={devices} and "
                     f"routed_params={routed_params}")
  per_param = states_per_param * state_bytes
  elements = ((replicated_params + routed_params) / devices if zero1 else
              replicated_params + routed_params / ep_size)
  return int(round(per_param * elements)) + scalar_bytes
