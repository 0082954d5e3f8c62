"""`model.host_init`: numpy draws with the model initialisers' distributions."""

import jax
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.host_init import host_init
from dsv3_jax.model.transformer import Transformer

CONFIG = ModelConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                     qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_group=2,
                     topk_group=1, num_experts_per_tok=2, num_hidden_layers=2,
                     first_k_dense_replace=1, vocab_size=256, num_nextn_predict_layers=1,
                     initializer_range=0.05, embedding_init_std=0.5).validate()


def _abstract():
  return nnx.split(nnx.eval_shape(lambda: Transformer(CONFIG, rngs=nnx.Rngs(0))),
                   nnx.Param, ...)


def test_distributions_and_determinism():
  _, params, other = _abstract()
  values = host_init(CONFIG, params, seed=3)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(values)[0]}
  assert all(isinstance(v, np.ndarray) for v in flat.values())
  shapes = {jax.tree_util.keystr(p): v.shape for p, v in
            jax.tree_util.tree_flatten_with_path(params)[0]}
  assert {k: v.shape for k, v in flat.items()} == shapes
  embed = next(v for k, v in flat.items() if "embed_tokens" in k)
  np.testing.assert_allclose(embed.std(), 0.5, rtol=0.05)
  experts = next(v for k, v in flat.items() if "experts" in k and "gate_proj" in k)
  np.testing.assert_allclose(experts.std(), 0.05, rtol=0.05)
  norms = [v for k, v in flat.items() if k.endswith("['weight'].value")]
  assert norms and all(np.all(v == 1) for v in norms)
  biases = jax.tree.leaves(host_init(CONFIG, other))
  assert biases and all(np.all(b == 0) for b in biases)  # every router bias b_i starts at 0
  again = jax.tree.leaves(host_init(CONFIG, params, seed=3))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(values), again))
  other_seed = jax.tree.leaves(host_init(CONFIG, params, seed=4))
  assert not np.array_equal(jax.tree.leaves(values)[0], other_seed[0])


def test_unknown_parameter_is_named():
  tree = {"layers": {0: {"mystery": jax.ShapeDtypeStruct((2,), np.float32)}}}
  with pytest.raises(ValueError, match=r"no rule for parameter .*mystery"):
    host_init(CONFIG, tree)
