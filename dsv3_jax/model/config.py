"""DeepSeek-V3 model configuration.

Field names follow the Hugging Face ``DeepseekV3Config`` (``config.json``), so a checkpoint's
config maps one-to-one; the execution settings that Hugging Face does not have (``dtype``,
``dispatch``, ``capacity_factor``, the payload formats and the FP8 recipe ``fp8*``) come last.

`ModelConfig.validate` checks every constraint the modules rely on and raises `ValueError`
naming the offending setting and the allowed values, before any parameter is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

COMPUTE_DTYPES = ("float32", "bfloat16")
# Layer families that `fp8=True` can run in FP8 (DeepSeek-V3 report §3.3.1, Figure 6: the GEMMs
# of the MLA projections and of the dense, shared and routed expert MLPs). The embedding, output
# head, router, norms and the attention core (softmax(q k^T) v) are never FP8.
FP8_LAYER_FAMILIES = ("attention_projections", "dense_mlp", "shared_experts", "routed_experts")
FP8_FORMATS = ("e4m3", "e5m2")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """YaRN context extension (Peng et al. 2023; DeepSeek-V3 report §4.3).

  Attributes:
    factor: context extension factor s (new length / original length).
    original_max_position_embeddings: the pre-extension context length L.
    beta_fast: rotations at which interpolation stops (high-frequency end), alpha in YaRN.
    beta_slow: rotations at which interpolation is complete (low-frequency end), beta in YaRN.
    mscale: the attention-temperature coefficient used for the cos/sin amplitude.
    mscale_all_dim: the coefficient used for the softmax scale (DeepSeek sets both to 1.0
      for V3, 0.707 for V2).
  """

  factor: float
  original_max_position_embeddings: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0
  type: str = "yarn"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a DeepSeek-V3-style model (technical report §2, arXiv 2412.19437).

  Sizes are counts (not bytes). The defaults are the tiny model of `configs/tiny.py`.
  """

  vocab_size: int = 256
  hidden_size: int = 256
  intermediate_size: int = 512  # dense MLP width (first `first_k_dense_replace` layers)
  moe_intermediate_size: int = 128  # width of one routed / shared expert
  num_hidden_layers: int = 4
  num_attention_heads: int = 8
  # Multi-head Latent Attention (report §2.1.1).
  q_lora_rank: Optional[int] = 128  # None: plain q_proj, as in DeepSeek-V2-Lite
  kv_lora_rank: int = 64
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 32
  v_head_dim: int = 32
  # DeepSeekMoE (report §2.1.2).
  n_routed_experts: int = 32
  n_shared_experts: int = 1
  num_experts_per_tok: int = 4  # K_r
  n_group: int = 4  # expert groups; = nodes of the expert-parallel group for node-limited routing
  topk_group: int = 2  # M: groups (nodes) a token may reach
  routed_scaling_factor: float = 2.5
  norm_topk_prob: bool = True
  first_k_dense_replace: int = 1
  # Multi-token prediction depth D (report §2.2); 0 disables it.
  num_nextn_predict_layers: int = 1
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_interleave: bool = True
  rope_scaling: Optional[RopeScaling] = None
  max_position_embeddings: int = 256
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02  # std of every projection's initial weights
  # std of the initial token embeddings. 1.0 (as T5 / Mesh-TensorFlow) rather than 0.02: with a
  # small embedding, the position-averaged attention output is nearly the same vector for every
  # token at initialisation, so every token picks the same experts (routing collapse before
  # the first step); with 1.0 tokens start out routed by their own identity.
  embedding_init_std: float = 1.0
  # Execution settings (not part of the Hugging Face config).
  dtype: str = "float32"  # activation / matmul dtype; parameters are always float32
  dispatch: str = "flat"  # expert-parallel schedule, one of parallel.dispatch.SCHEDULE_NAMES
  capacity_factor: float = 1.25  # initial per-destination buffer size / balanced load
  # Wire format of the MoE all_to_all payloads (quant.codec.codec_from_name): "compute" (the
  # compute dtype), "bf16", "fp8" (E4M3 + 1x128 power-of-two scales, report §3.3.2), "logfmtN".
  dispatch_payload: str = "compute"
  combine_payload: str = "compute"
  # FP8 training (report §3.3; `quant.fp8.Fp8Recipe`). With `fp8` set, the GEMMs of the layer
  # families in `fp8_layers` (a subset of FP8_LAYER_FAMILIES; default all four, the report's
  # set) quantize their activations per 1 x 128 tile, their weights per 128 x 128 block and, in
  # the backward pass, their output gradients per 1 x 128 tile; master weights, gradients and
  # optimizer state stay float32. Embedding, head, router, norms and attention core never do.
  fp8: bool = False
  fp8_layers: tuple = FP8_LAYER_FAMILIES
  fp8_format: str = "e4m3"  # forward activations and weights (report: E4M3 everywhere)
  fp8_grad_format: str = "e4m3"  # backward output gradients ("e5m2" = the usual hybrid recipe)
  # Power-of-two scales (exact dequantization by an exponent shift; the report uses them for
  # the dispatched MoE inputs, §3.3.3). With them, FP8 dispatch followed by the experts' own
  # tile quantization rounds each value once, not twice.
  fp8_pow2_scale: bool = True
  # Emulate the tensor-core accumulator (`quant.fp8.accumulate_dot`): None = exact FP32
  # accumulation of the FP8 products (the fast default); an int = fraction bits kept (13 =
  # FP22), promoted to FP32 every `fp8_promotion_interval` products (N_C = 128; None = never).
  fp8_accumulator_mantissa_bits: Optional[int] = None
  fp8_promotion_interval: Optional[int] = 128

  def __post_init__(self):
    # JSON (a run's config.json) and ConfigDict hand sequences back as lists; the config must
    # stay hashable (modules keep it as static metadata).
    if isinstance(self.fp8_layers, list):
      object.__setattr__(self, "fp8_layers", tuple(self.fp8_layers))

  # ------------------------------------------------------------------ derived sizes
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def experts_per_group(self) -> int:
    return self.n_routed_experts // self.n_group

  @property
  def mtp_depth(self) -> int:
    return self.num_nextn_predict_layers

  def fp8_recipe(self, family: str):
    """The `quant.fp8.Fp8Recipe` of layer family `family`, or None when it is not FP8.

    Args:
      family: one of FP8_LAYER_FAMILIES.

    Raises:
      ValueError: an unknown family.
    """
    if family not in FP8_LAYER_FAMILIES:
      raise ValueError(f"FP8 layer family {family!r}; allowed: {FP8_LAYER_FAMILIES}")
    if not self.fp8 or family not in self.fp8_layers:
      return None
    from dsv3_jax.quant.fp8 import Fp8Recipe
    return Fp8Recipe(fmt_forward=self.fp8_format, fmt_backward=self.fp8_grad_format,
                     pow2_scale=self.fp8_pow2_scale,
                     accumulator_mantissa_bits=self.fp8_accumulator_mantissa_bits,
                     promotion_interval=self.fp8_promotion_interval)

  def is_moe_layer(self, layer: int) -> bool:
    """Whether decoder layer `layer` (0-based; MTP blocks count after the main stack) is MoE."""
    return layer >= self.first_k_dense_replace

  # ------------------------------------------------------------------ validation
  def validate(self) -> "ModelConfig":
    """Checks every constraint; returns self.

    Raises:
      ValueError: naming the setting, its value and what is allowed.
    """
    positive = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
        "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group",
        "topk_group", "max_position_embeddings")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
    if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or
                                         self.q_lora_rank <= 0):
      raise ValueError(f"model.q_lora_rank must be a positive integer or None, "
                       f"got {self.q_lora_rank!r}")
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"model.qk_rope_head_dim must be even (RoPE rotates pairs), "
                       f"got {self.qk_rope_head_dim}")
    for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ValueError(f"model.{name} must be a non-negative integer, got {value!r}")
    if self.n_routed_experts % self.n_group:
      raise ValueError(
          f"model.n_routed_experts={self.n_routed_experts} must be divisible by "
          f"model.n_group={self.n_group}")
    if self.topk_group > self.n_group:
      raise ValueError(f"model.topk_group={self.topk_group} must be <= "
                       f"model.n_group={self.n_group} (allowed: 1..{self.n_group})")
    reachable = self.topk_group * self.experts_per_group
    if self.num_experts_per_tok > reachable:
      raise ValueError(
          f"model.num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in the "
          f"allowed groups (topk_group * n_routed_experts / n_group = {reachable}); allowed: "
          f"1..{reachable}")
    if self.experts_per_group < 2:
      raise ValueError(
          f"model.n_routed_experts / model.n_group = {self.experts_per_group}: group scores "
          "sum each group's top-2 experts, so every group needs at least 2 experts")
    if self.routed_scaling_factor <= 0:
      raise ValueError(f"model.routed_scaling_factor must be > 0, "
                       f"got {self.routed_scaling_factor}")
    if self.dtype not in COMPUTE_DTYPES:
      raise ValueError(f"model.dtype={self.dtype!r}; allowed: {COMPUTE_DTYPES}")
    from dsv3_jax.parallel.dispatch import SCHEDULE_NAMES
    if self.dispatch not in SCHEDULE_NAMES:
      raise ValueError(f"model.dispatch={self.dispatch!r}; allowed: {SCHEDULE_NAMES}")
    from dsv3_jax.quant.codec import codec_from_name
    for name in ("dispatch_payload", "combine_payload"):
      try:
        codec_from_name(getattr(self, name))
      except ValueError as e:
        raise ValueError(f"model.{name}: {e}") from None
    self._validate_fp8()
    if not (isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0):
      raise ValueError(f"model.capacity_factor must be > 0, got {self.capacity_factor!r}")
    if self.rope_scaling is not None:
      rs = self.rope_scaling
      if rs.type != "yarn":
        raise ValueError(f"model.rope_scaling.type={rs.type!r}; allowed: ('yarn',)")
      if rs.factor < 1:
        raise ValueError(f"model.rope_scaling.factor must be >= 1, got {rs.factor}")
      if rs.original_max_position_embeddings <= 0:
        raise ValueError("model.rope_scaling.original_max_position_embeddings must be > 0, "
                         f"got {rs.original_max_position_embeddings}")
    return self

  def _validate_fp8(self) -> None:
    for name in ("fp8", "fp8_pow2_scale"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"model.{name} must be True or False, got {getattr(self, name)!r}")
    layers = self.fp8_layers
    if (not isinstance(layers, tuple) or not all(isinstance(f, str) for f in layers)
        or len(set(layers)) != len(layers)):
      raise ValueError(f"model.fp8_layers must be a tuple of distinct names, got {layers!r}; "
                       f"allowed names: {FP8_LAYER_FAMILIES}")
    bad = [f for f in layers if f not in FP8_LAYER_FAMILIES]
    if bad:
      raise ValueError(f"model.fp8_layers has unknown name(s) {bad}; allowed: "
                       f"{FP8_LAYER_FAMILIES}")
    for name in ("fp8_format", "fp8_grad_format"):
      if getattr(self, name) not in FP8_FORMATS:
        raise ValueError(f"model.{name}={getattr(self, name)!r}; allowed: {FP8_FORMATS}")
    bits, interval = self.fp8_accumulator_mantissa_bits, self.fp8_promotion_interval
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)
                             or not 1 <= bits <= 23):
      raise ValueError(f"model.fp8_accumulator_mantissa_bits must be None or an int in "
                       f"[1, 23] (13 = FP22), got {bits!r}")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int)
                                 or interval < 1 or (bits is not None and interval % 32)):
      raise ValueError(f"model.fp8_promotion_interval must be None or a positive integer (a "
                       f"multiple of the 32 products aligned per accumulator update when "
                       f"model.fp8_accumulator_mantissa_bits is set), got {interval!r}")

  # ------------------------------------------------------------------ (de)serialisation
  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a flat mapping of this class's field names (e.g. a ConfigDict).

    Raises:
      ValueError: on a key that is not a field (the message lists the allowed keys).
    """
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown model setting(s) {unknown}; allowed: {sorted(names)}")
    rs = d.get("rope_scaling")
    if rs is not None and not isinstance(rs, RopeScaling):
      rs = dict(rs)
      rs_names = {f.name for f in dataclasses.fields(RopeScaling)}
      bad = sorted(set(rs) - rs_names)
      if bad:
        raise ValueError(f"unknown model.rope_scaling setting(s) {bad}; allowed: "
                         f"{sorted(rs_names)}")
      d["rope_scaling"] = RopeScaling(**rs)
    return cls(**d).validate()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes).validate()


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN attention temperature 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0
