"""Hugging Face DeepSeek-V3 checkpoints <-> dsv3_jax.

`load_hf(path)` reads a `config.json` (model_type "deepseek_v3"; RoPE given either as
`rope_parameters` (transformers >= 5) or as the legacy `rope_theta` + `rope_scaling`) and a
`model.safetensors` with per-expert tensors (`model.layers.{i}.mlp.experts.{j}.gate_proj.weight`,
...), and returns (ModelConfig, Transformer). `save_hf` writes the same format back.

Torch linear weights are [out, in]; dsv3_jax kernels are [in, out]; routed experts are stacked
[E, in, out]. MTP modules of DeepSeek's release are stored as `model.layers.{L + d}` with
`enorm`, `hnorm`, `eh_proj`, `shared_head.norm` (+ duplicate `embed_tokens` and
`shared_head.head`, which are the shared tensors and are ignored on load).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.model.config import ModelConfig, RopeScaling
from dsv3_jax.model.transformer import Transformer

_ARCH_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
    "first_k_dense_replace", "num_nextn_predict_layers", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "initializer_range")
_REQUIRED = tuple(k for k in _ARCH_KEYS if k not in (
    "num_nextn_predict_layers", "tie_word_embeddings", "initializer_range", "q_lora_rank",
    "norm_topk_prob", "routed_scaling_factor", "n_shared_experts", "first_k_dense_replace"))


def config_from_hf(hf: dict[str, Any], *, dtype: str = "float32",
                   load_mtp: bool = True) -> ModelConfig:
  """ModelConfig from a Hugging Face DeepSeek-V3 config dict.

  Args:
    hf: the parsed config.json.
    dtype: compute dtype of the returned config ("float32" or "bfloat16").
    load_mtp: keep `num_nextn_predict_layers` (False: 0, as transformers does).

  Raises:
    ValueError: wrong `model_type`, a missing key, an unsupported `rope_type` / `hidden_act` /
      `scoring_func` / `topk_method` (the message names the key and the allowed values).
  """
  if hf.get("model_type") != "deepseek_v3":
    raise ValueError(f"config.json: model_type={hf.get('model_type')!r}; allowed: 'deepseek_v3'")
  for key in _REQUIRED:
    if key not in hf:
      raise ValueError(f"config.json: missing key {key!r}")
  checks = {"hidden_act": ("silu",), "scoring_func": ("sigmoid",), "topk_method": ("noaux_tc",)}
  for key, allowed in checks.items():
    if key in hf and hf[key] not in allowed:
      raise ValueError(f"config.json: {key}={hf[key]!r}; allowed: {allowed}")
  kw = {k: hf[k] for k in _ARCH_KEYS if k in hf}
  if not load_mtp:
    kw["num_nextn_predict_layers"] = 0
  kw.setdefault("num_nextn_predict_layers", 0)
  rope = hf.get("rope_parameters")
  if rope is None:  # legacy layout: rope_theta at top level, rope_scaling dict or null
    rope = dict(hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  kw["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if rope_type == "default":
    kw["rope_scaling"] = None
  elif rope_type == "yarn":
    kw["rope_scaling"] = RopeScaling(
        factor=float(rope["factor"]),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings") or
                                              hf["max_position_embeddings"]),
        beta_fast=float(rope.get("beta_fast", 32.0)),
        beta_slow=float(rope.get("beta_slow", 1.0)),
        mscale=float(rope.get("mscale", 1.0)),
        mscale_all_dim=float(rope.get("mscale_all_dim", 0.0) or 0.0))
  else:
    raise ValueError(f"config.json: rope_type={rope_type!r}; allowed: ('default', 'yarn')")
  kw["rope_interleave"] = bool(hf.get("rope_interleave", True))
  kw["dtype"] = dtype
  return ModelConfig.from_dict(kw)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """Hugging Face config.json dict for `config` (transformers >= 5 `rope_parameters` form)."""
  hf = {k: getattr(config, k) for k in _ARCH_KEYS}
  rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": "default"}
  if config.rope_scaling is not None:
    rs = config.rope_scaling
    rope.update(rope_type="yarn", factor=rs.factor, beta_fast=rs.beta_fast,
                beta_slow=rs.beta_slow, mscale=rs.mscale, mscale_all_dim=rs.mscale_all_dim,
                original_max_position_embeddings=rs.original_max_position_embeddings)
  hf.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_act="silu",
            num_key_value_heads=config.num_attention_heads, rope_parameters=rope,
            rope_interleave=config.rope_interleave, qk_head_dim=config.qk_head_dim,
            head_dim=config.qk_rope_head_dim, attention_bias=False, dtype="float32")
  return hf


# ------------------------------------------------------------------------------ name mapping


def _hf_name(path: tuple, config: ModelConfig) -> tuple[str, str]:
  """(Hugging Face tensor name or pattern with '{e}', transform) for one dsv3_jax leaf path.

  transform: "id" (same layout), "T" (transpose [in, out] <-> [out, in]), "experts" (stacked
  [E, in, out] <-> E tensors [out, in]).
  """
  p = [str(x) for x in path]
  if p == ["embed_tokens"]:
    return "model.embed_tokens.weight", "id"
  if p == ["lm_head", "kernel"]:
    return "lm_head.weight", "T"
  if p == ["norm", "weight"]:
    return "model.norm.weight", "id"
  if p[0] == "layers":
    prefix, rest = f"model.layers.{p[1]}.", p[2:]
  elif p[0] == "mtp":
    prefix = f"model.layers.{config.num_hidden_layers + int(p[1])}."
    rest = p[2:]
    if rest[0] == "block":
      rest = rest[1:]
    elif rest[0] == "norm":
      rest = ["shared_head", "norm"] + rest[1:]
  else:
    raise KeyError(f"no Hugging Face name for parameter {'.'.join(p)}")
  if len(rest) >= 3 and rest[0] == "mlp" and rest[1] == "experts":
    return prefix + f"mlp.experts.{{e}}.{rest[2]}.weight", "experts"
  if rest[-1] == "kernel":
    return prefix + ".".join(rest[:-1]) + ".weight", "T"
  return prefix + ".".join(rest), "id"


def _ignored(name: str, config: ModelConfig) -> bool:
  """Tensors that exist in checkpoints but map to nothing here."""
  m = re.match(r"model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)$", name)
  if m and int(m.group(1)) >= config.num_hidden_layers:
    return True  # MTP copies of the shared embedding / head
  if name.endswith("rotary_emb.inv_freq"):
    return True
  if config.mtp_depth == 0:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= config.num_hidden_layers:
      return True  # MTP weights of a release loaded without MTP (as transformers does)
  return False


def load_hf(path: str, dtype=jnp.float32, *, mesh=None, load_mtp: bool = True
            ) -> tuple[ModelConfig, Transformer]:
  """Loads a Hugging Face DeepSeek-V3 checkpoint directory.

  Args:
    path: directory with config.json and model.safetensors.
    dtype: compute dtype (jnp.float32 or jnp.bfloat16); parameters are kept float32.
    mesh: optional ('node', 'gpu') mesh for expert parallelism.
    load_mtp: load the MTP modules when the config has them.

  Returns:
    (config, model); `model(input_ids)` gives logits [batch, seq, vocab] float32.

  Raises:
    FileNotFoundError: a missing file.
    ValueError: wrong config (see `config_from_hf`), a missing or unexpected tensor, or a shape
      mismatch; the message names the tensor.
  """
  from safetensors.numpy import load_file

  cfg_path = os.path.join(path, "config.json")
  st_path = os.path.join(path, "model.safetensors")
  for f in (cfg_path, st_path):
    if not os.path.exists(f):
      raise FileNotFoundError(f"{f} not found")
  with open(cfg_path) as f:
    hf_cfg = json.load(f)
  config = config_from_hf(hf_cfg, dtype=jnp.dtype(dtype).name, load_mtp=load_mtp)
  tensors = load_file(st_path)

  abstract = nnx.eval_shape(lambda: Transformer(config, mesh=mesh, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  used: set[str] = set()
  values = []
  for path, var in flat:
    shape = tuple(var.shape)
    name, kind = _hf_name(path, config)
    if kind == "experts":
      arrays = []
      for e in range(shape[0]):
        n = name.format(e=e)
        if n not in tensors:
          raise ValueError(f"model.safetensors: missing tensor {n}")
        arrays.append(tensors[n].T)
        used.add(n)
      value = np.stack(arrays)
      shown = name.format(e="*")
    else:
      if name not in tensors:
        raise ValueError(f"model.safetensors: missing tensor {name}")
      value = tensors[name].T if kind == "T" else tensors[name]
      used.add(name)
      shown = name
    if tuple(value.shape) != shape:
      want = shape if kind == "id" else (tuple(reversed(shape)) if kind == "T" else
                                         (shape[0],) + tuple(reversed(shape[1:])))
      got = tuple(value.shape) if kind == "id" else (
          tuple(reversed(value.shape)) if kind == "T" else
          (value.shape[0],) + tuple(reversed(value.shape[1:])))
      raise ValueError(f"model.safetensors: tensor {shown} has shape {got}, expected {want}")
    values.append(jnp.asarray(value, jnp.float32))
  unexpected = sorted(n for n in tensors if n not in used and not _ignored(n, config))
  if unexpected:
    raise ValueError(f"model.safetensors: unexpected tensor(s) {unexpected[:5]}"
                     f"{' ...' if len(unexpected) > 5 else ''} for this config")
  pure = nnx.to_pure_dict(state)
  for (path, _), value in zip(flat, values):
    node = pure
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  if mesh is not None:
    from dsv3_jax.parallel.mesh import shard_model
    shard_model(model, mesh)
  return config, model


def save_hf(model: Transformer, path: str) -> None:
  """Writes config.json and model.safetensors (per-expert tensors) for `model` into `path`."""
  from safetensors.numpy import save_file

  config = model.config
  os.makedirs(path, exist_ok=True)
  out: dict[str, np.ndarray] = {}
  for p, var in nnx.to_flat_state(nnx.state(model)):
    name, kind = _hf_name(p, config)
    value = np.asarray(jax.device_get(var[...]), np.float32)
    if kind == "experts":
      for e in range(value.shape[0]):
        out[name.format(e=e)] = np.ascontiguousarray(value[e].T)
    else:
      out[name] = np.ascontiguousarray(value.T if kind == "T" else value)
  save_file(out, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config), f, indent=2)

