"""The analysis configs: importable without jax, Hugging Face dimensions, ModelConfig-compatible."""

import ast
import importlib.util
import os
import sys

import pytest

from dsv3_jax.analysis import ModelSpec, load_config
from dsv3_jax.analysis._spec import REPO_ROOT

NEW_CONFIGS = ("deepseek_v2_236b", "deepseek_v2_lite_16b", "qwen2_5_72b", "llama3_1_405b")


def _model_config_class():
  """dsv3_jax/model/config.py loaded by path (it needs no jax; the package __init__ might)."""
  path = os.path.join(REPO_ROOT, "dsv3_jax", "model", "config.py")
  spec = importlib.util.spec_from_file_location("_dsv3_model_config", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module.ModelConfig


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_config_imports_nothing_from_dsv3_jax_or_jax(name):
  with open(os.path.join(REPO_ROOT, "configs", name + ".py")) as f:
    tree = ast.parse(f.read())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported.add((node.module or "").split(".")[0])
  assert not imported & {"dsv3_jax", "jax", "flax"}, imported


@pytest.mark.parametrize("name,model_type", [("deepseek_v2_236b", "deepseek_v2"),
                                             ("deepseek_v2_lite_16b", "deepseek_v2"),
                                             ("qwen2_5_72b", "qwen2"),
                                             ("llama3_1_405b", "llama")])
def test_model_type_and_name(name, model_type):
  c = load_config(name)
  assert c.model_type == model_type
  assert c.name == name
  assert ModelSpec.from_config(c).model_type == model_type


@pytest.mark.parametrize("name", ["deepseek_v2_236b", "deepseek_v2_lite_16b", "deepseek_v3_671b"])
def test_deepseek_configs_build_a_model_config(name):
  ModelConfig = _model_config_class()
  c = load_config(name)
  mc = ModelConfig.from_dict(c.model.to_dict())
  assert mc.hidden_size == c.model.hidden_size


def test_deepseek_v2_gating_is_recorded_outside_the_model():
  for name in ("deepseek_v2_236b", "deepseek_v2_lite_16b"):
    c = load_config(name)
    assert c.scoring_func == "softmax"
    assert "scoring_func" not in c.model


def test_v3_model_type_is_inferred():
  # configs/deepseek_v3_671b.py has no model_type; MTP layers make it V3.
  assert ModelSpec.from_config("deepseek_v3_671b").model_type == "deepseek_v3"


def test_dense_configs_head_dims():
  for name in ("qwen2_5_72b", "llama3_1_405b"):
    m = load_config(name).model
    assert m.head_dim * m.num_attention_heads == m.hidden_size
    assert m.num_attention_heads % m.num_key_value_heads == 0


def test_unknown_config_and_bad_fields_raise():
  with pytest.raises(ValueError, match="name="):
    load_config("no_such_model")
  with pytest.raises(ValueError, match="model_type"):
    ModelSpec.from_config({"model": {}, "model_type": "gpt2"})
  with pytest.raises(ValueError, match="hidden_size"):
    ModelSpec.from_config(dict(model_type="llama", vocab_size=10, hidden_size=-4,
                               num_hidden_layers=1, num_attention_heads=1,
                               intermediate_size=8))
  with pytest.raises(ValueError, match="num_key_value_heads"):
    ModelSpec.from_config(dict(model_type="llama", vocab_size=10, hidden_size=64,
                               num_hidden_layers=1, num_attention_heads=8,
                               num_key_value_heads=3, intermediate_size=8))
