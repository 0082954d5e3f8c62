"""The full model: configs build and validate, the 671B model is built abstractly with the
report's parameter counts, and MTP is wired as in the report."""

import glob
import importlib.util
import os

import jax
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.transformer import Transformer, abstract_model

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_deepseek_v3_671b_is_built_abstractly_with_671b_parameters():
  cfg = ModelConfig.from_dict(_load("deepseek_v3_671b").model.to_dict())
  model = abstract_model(cfg)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(l, jax.ShapeDtypeStruct) for l in leaves)  # nothing allocated
  total = sum(int(np.prod(l.shape)) for l in leaves)
  mtp = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(nnx.state(model.mtp, nnx.Param)))
  # Report §1 / Hugging Face card: 671B main model + 14B MTP module = 685B, the release
  # storing its own copies of the embedding and output head for the MTP module (shared here).
  assert (total - mtp) / 1e9 == pytest.approx(671.0, abs=1.0)
  shared_copies = 2 * cfg.vocab_size * cfg.hidden_size
  assert (total + shared_copies) / 1e9 == pytest.approx(685.0, abs=0.6)  # 684.5B
  e = model.layers[3].mlp.experts
  assert e.gate_proj.shape == (256, 7168, 2048) and e.down_proj.shape == (256, 2048, 7168)
  attn = model.layers[0].self_attn
  assert attn.kv_a_proj_with_mqa.kernel.shape == (7168, 512 + 64)
  assert attn.kv_b_proj.kernel.shape == (512, 128 * (128 + 128))


def test_every_deepseek_config_validates():
  for path in sorted(glob.glob(os.path.join(CONFIGS, "[!_]*.py"))):
    name = os.path.basename(path)[:-3]
    cfg = _load(name)
    if cfg.get("model_type", "deepseek_v3") in ("deepseek_v3", "deepseek_v2"):
      ModelConfig.from_dict(cfg.model.to_dict())


def test_mtp_depth_1_uses_shared_embedding_and_head_and_changes_only_mtp_logits():
  cfg = ModelConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                    num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                    max_position_embeddings=32, num_nextn_predict_layers=1)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.PRNGKey(0), (2, 10), 0, 256)
  window = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, 256)
  out = model.forward(ids, mtp_tokens=window)
  assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == (2, 10, 256)
  assert len(out.moe_stats) == 2  # layer 1 and the MTP block (first_k_dense_replace=1)
  np.testing.assert_allclose(out.logits, model(ids), rtol=1e-6)
  # Changing t_{i+1} (the token MTP embeds at position i) changes MTP logits at i only.
  w2 = window.at[0, 5].set((window[0, 5] + 1) % 256)
  out2 = model.forward(ids, mtp_tokens=w2)
  diff = np.abs(np.asarray(out2.mtp_logits[0] - out.mtp_logits[0])).max(-1)[0]
  assert diff[4] > 0 and np.all(diff[:4] == 0)  # position 4 embeds t_5; earlier positions not
  np.testing.assert_array_equal(out2.logits, out.logits)
  with pytest.raises(ValueError, match="mtp_tokens must be"):
    model.forward(ids, mtp_tokens=window[:, :10])


def test_bad_model_settings_name_the_setting():
  with pytest.raises(ValueError, match="model.topk_group=5 must be <= model.n_group=4"):
    ModelConfig(topk_group=5).validate()
  with pytest.raises(ValueError, match=r"model.dispatch='ring'; allowed: \('flat', 'two_hop'\)"):
    ModelConfig(dispatch="ring").validate()
  with pytest.raises(ValueError, match="unknown model setting"):
    ModelConfig.from_dict({"hiden_size": 3})
