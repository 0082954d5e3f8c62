"""The architecture facts the cost models need, read from a config file or a config dict.

`ModelSpec.from_config` accepts the ConfigDict of a file in `configs/` (with `c.model` and
`c.model_type`), its `c.model` part, or any mapping with Hugging Face field names. DeepSeek
configs (`model_type` "deepseek_v2" / "deepseek_v3", or any model with `kv_lora_rank`) are
Multi-head Latent Attention + DeepSeekMoE models; Llama / Qwen2 configs are dense
grouped-query-attention (GQA) models. `load_config` imports `configs/<name>.py` from the `configs`
package installed with dsv3_jax.

Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Mapping, Optional

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "llama", "qwen2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name: str):
  """Imports `configs/<name>.py` (the installed `configs` package) and returns its `get_config()`.

  Args:
    name: module name inside `configs/`, e.g. "deepseek_v3_671b" (a trailing ".py" is dropped).

  Returns:
    The `ml_collections.ConfigDict` the file builds.

  Raises:
    ValueError: if `configs/<name>.py` does not exist (the message lists the available names).
  """
  import configs

  name = os.path.basename(name)
  if name.endswith(".py"):
    name = name[:-3]
  config_dir = os.path.dirname(os.path.abspath(configs.__file__))
  if name.startswith("_") or not os.path.isfile(os.path.join(config_dir, name + ".py")):
    available = sorted(f[:-3] for f in os.listdir(config_dir)
                       if f.endswith(".py") and not f.startswith("_"))
    raise ValueError(f"name={name!r}: no configs/{name}.py; allowed: {available}")
  return importlib.import_module(f"configs.{name}").get_config()


def _as_dict(x: Any) -> dict:
  if hasattr(x, "to_dict"):
    return x.to_dict()
  if isinstance(x, Mapping):
    return dict(x)
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  raise ValueError(f"config must be a ConfigDict, a mapping or a dataclass; got {type(x).__name__}")


def _positive_int(d: Mapping[str, Any], key: str, default: Any = None) -> int:
  value = d.get(key, default)
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
  return value


def _non_negative_int(d: Mapping[str, Any], key: str, default: Any = None) -> int:
  value = d.get(key, default)
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ValueError(f"model.{key} must be a non-negative integer, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Architecture of a decoder-only transformer, as the cost models see it.

  All sizes are element counts (not bytes). Field names are the Hugging Face config names.

  Attributes:
    name: a label for tables.
    model_type: one of `MODEL_TYPES`.
    attention: "mla" (Multi-head Latent Attention, DeepSeek-V2 report §2.1) or "gqa" (grouped-query
      attention; MHA when `num_key_value_heads == num_attention_heads`, MQA when it is 1).
    vocab_size, hidden_size, num_hidden_layers, num_attention_heads: the usual sizes.
    num_key_value_heads, head_dim, attention_bias: GQA only (0 / False for MLA).
    q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim: MLA only
      (`q_lora_rank` None: a plain query projection, as in DeepSeek-V2-Lite).
    intermediate_size: width of a dense SwiGLU MLP.
    moe_intermediate_size, n_routed_experts, n_shared_experts, num_experts_per_tok: DeepSeekMoE
      (0 for dense models).
    first_k_dense_replace: number of leading layers with a dense MLP (all layers for dense models).
    num_nextn_predict_layers: multi-token-prediction depth (DeepSeek-V3 report §2.2).
    tie_word_embeddings: whether the output head shares the embedding matrix.
    gate_bias: whether the router has a per-expert bias (`e_score_correction_bias`, V3 only).
  """

  name: str
  model_type: str
  attention: str
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  num_key_value_heads: int = 0
  head_dim: int = 0
  attention_bias: bool = False
  q_lora_rank: Optional[int] = None
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  moe_intermediate_size: int = 0
  n_routed_experts: int = 0
  n_shared_experts: int = 0
  num_experts_per_tok: int = 0
  first_k_dense_replace: int = 0
  num_nextn_predict_layers: int = 0
  tie_word_embeddings: bool = False
  gate_bias: bool = False

  # ---------------------------------------------------------------- derived
  @property
  def is_moe(self) -> bool:
    return self.n_routed_experts > 0

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.first_k_dense_replace if self.is_moe else 0

  @property
  def num_dense_layers(self) -> int:
    return self.num_hidden_layers - self.num_moe_layers

  @property
  def qk_head_dim(self) -> int:
    """Query/key dimension per head: nope + rope for MLA, head_dim for GQA."""
    if self.attention == "mla":
      return self.qk_nope_head_dim + self.qk_rope_head_dim
    return self.head_dim

  @property
  def value_head_dim(self) -> int:
    return self.v_head_dim if self.attention == "mla" else self.head_dim

  # ---------------------------------------------------------------- construction
  @classmethod
  def from_config(cls, config: Any, name: Optional[str] = None,
                  model_type: Optional[str] = None) -> "ModelSpec":
    """Builds a spec from a `configs/*.py` ConfigDict, its `.model` part, or a mapping.

    Args:
      config: the full config (with `.model`, and optionally `.model_type` and `.name`), or the
        model mapping itself (Hugging Face field names).
      name: label; defaults to `config.name` or `model_type`.
      model_type: overrides `config.model_type`; inferred when both are absent (a model with
        `kv_lora_rank` is "deepseek_v3" if it has multi-token prediction layers, else
        "deepseek_v2"; otherwise "llama").

    Returns:
      The `ModelSpec`.

    Raises:
      ValueError: for an unknown model_type or a missing / non-positive size, naming the field.
    """
    if isinstance(config, ModelSpec):
      return config
    if isinstance(config, str):
      config = load_config(config)
    outer = _as_dict(config)
    model = outer.get("model", outer)
    if not isinstance(model, Mapping):
      model = _as_dict(model)
    model = dict(model)
    model_type = model_type or outer.get("model_type") or model.get("model_type")
    if model_type is None:
      if "kv_lora_rank" in model:
        model_type = ("deepseek_v3" if model.get("num_nextn_predict_layers", 0) else
                      "deepseek_v2")
      else:
        model_type = "llama"
    if model_type not in MODEL_TYPES:
      raise ValueError(f"model_type={model_type!r}; allowed: {MODEL_TYPES}")
    name = name or outer.get("name") or model_type
    common = dict(
        name=name,
        model_type=model_type,
        vocab_size=_positive_int(model, "vocab_size"),
        hidden_size=_positive_int(model, "hidden_size"),
        num_hidden_layers=_positive_int(model, "num_hidden_layers"),
        num_attention_heads=_positive_int(model, "num_attention_heads"),
        intermediate_size=_positive_int(model, "intermediate_size"),
        tie_word_embeddings=bool(model.get("tie_word_embeddings", False)),
    )
    if model_type.startswith("deepseek"):
      q_lora_rank = model.get("q_lora_rank")
      if q_lora_rank is not None:
        q_lora_rank = _positive_int(model, "q_lora_rank")
      n_routed = _non_negative_int(model, "n_routed_experts", 0)
      return cls(
          attention="mla",
          q_lora_rank=q_lora_rank,
          kv_lora_rank=_positive_int(model, "kv_lora_rank"),
          qk_nope_head_dim=_positive_int(model, "qk_nope_head_dim"),
          qk_rope_head_dim=_positive_int(model, "qk_rope_head_dim"),
          v_head_dim=_positive_int(model, "v_head_dim"),
          moe_intermediate_size=(_positive_int(model, "moe_intermediate_size") if n_routed else 0),
          n_routed_experts=n_routed,
          n_shared_experts=_non_negative_int(model, "n_shared_experts", 0),
          num_experts_per_tok=(_positive_int(model, "num_experts_per_tok") if n_routed else 0),
          first_k_dense_replace=(_non_negative_int(model, "first_k_dense_replace", 0) if n_routed
                                 else common["num_hidden_layers"]),
          num_nextn_predict_layers=_non_negative_int(model, "num_nextn_predict_layers", 0),
          gate_bias=(model_type == "deepseek_v3"),
          **common)
    heads = common["num_attention_heads"]
    head_dim = model.get("head_dim") or common["hidden_size"] // heads
    kv_heads = model.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
      raise ValueError(f"model.num_key_value_heads={kv_heads!r} must be a positive divisor of "
                       f"model.num_attention_heads={heads}")
    return cls(
        attention="gqa",
        num_key_value_heads=kv_heads,
        head_dim=_positive_int({"head_dim": head_dim}, "head_dim"),
        attention_bias=bool(model.get("attention_bias", model_type == "qwen2")),
        first_k_dense_replace=common["num_hidden_layers"],
        **common)

  def replace(self, **changes) -> "ModelSpec":
    """A copy with some fields changed (a "knob"), e.g. `spec.replace(hidden_size=8192)`."""
    return dataclasses.replace(self, **changes)
