"""FLOPs per token against Insights Table 2 and hand-computed figures."""

import pytest

from dsv3_jax.analysis import (ModelSpec, inference_flops_per_token, matmul_params_per_token,
                               training_flops_per_token)

GFLOP = 1e9


def g(name, **kw):
  return training_flops_per_token(name, 4096, **kw).total / GFLOP


def test_table2_deepseek_within_1_percent():
  assert g("deepseek_v2_236b") == pytest.approx(155, rel=0.01)
  assert g("deepseek_v3_671b") == pytest.approx(250, rel=0.01)


def test_table2_llama_and_how_the_paper_counted_it():
  # Both attention products: 2473.2, +1.03% from the printed 2448.
  assert g("llama3_1_405b") == pytest.approx(2473.2, abs=0.1)
  assert g("llama3_1_405b") == pytest.approx(2448, rel=0.011)
  # Counting only Q K^T reproduces 2448 ...
  assert g("llama3_1_405b", products=("qk",)) == pytest.approx(2448, rel=0.001)
  # ... but the same rule misses V3's 250 by ~5%: the paper's counting is not uniform.
  assert g("deepseek_v3_671b", products=("qk",)) < 250 * 0.96


def test_table2_qwen_394_is_inconsistent():
  s = ModelSpec.from_config("qwen2_5_72b")
  non_embedding = matmul_params_per_token(s) - s.vocab_size * s.hidden_size
  assert 6 * non_embedding / GFLOP > 394  # weights alone exceed the printed value
  assert g("qwen2_5_72b") == pytest.approx(444.9, abs=0.1)


def test_hand_computed_small_dense_model():
  spec = ModelSpec.from_config(dict(model_type="llama", vocab_size=1000, hidden_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=256))
  # per layer: q 64*64, k and v 64*32 each, o 64*64, mlp 3*64*256; head 1000*64.
  n = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 256) + 1000 * 64
  assert matmul_params_per_token(spec) == n
  seq = 9
  attn_per_key = 2 * 4 * (16 + 16) * 2  # 2 FLOPs x heads x (d_qk + d_v) x layers
  t = training_flops_per_token(spec, seq)
  assert t.matmul == 6 * n
  assert t.attention == 3 * attn_per_key * (seq + 1) / 2
  full = training_flops_per_token(spec, seq, causal=False)
  assert full.attention == 3 * attn_per_key * seq
  fwd_only = training_flops_per_token(spec, seq, backward_factor=0)
  assert fwd_only.total == 2 * n + attn_per_key * (seq + 1) / 2
  dec = inference_flops_per_token(spec, seq, "decode")
  assert dec.total == 2 * n + attn_per_key * seq
  pre = inference_flops_per_token(spec, seq, "prefill")
  assert pre.total == fwd_only.total


def test_moe_counts_activated_experts_only():
  v3 = ModelSpec.from_config("deepseek_v3_671b")
  more = v3.replace(num_experts_per_tok=16)
  extra = 8 * 3 * v3.hidden_size * v3.moe_intermediate_size * v3.num_moe_layers
  assert matmul_params_per_token(more) - matmul_params_per_token(v3) == extra
  bigger_pool = v3.replace(n_routed_experts=512)  # more experts, same activated count
  assert (matmul_params_per_token(bigger_pool) - matmul_params_per_token(v3) ==
          256 * v3.hidden_size * v3.num_moe_layers)  # only the router grows


def test_invalid_inputs():
  with pytest.raises(ValueError, match="seq_len"):
    training_flops_per_token("deepseek_v3_671b", 0)
  with pytest.raises(ValueError, match="backward_factor"):
    training_flops_per_token("deepseek_v3_671b", 16, backward_factor=-1)
  with pytest.raises(ValueError, match="phase"):
    inference_flops_per_token("deepseek_v3_671b", 16, phase="train")
  with pytest.raises(ValueError, match="products"):
    training_flops_per_token("deepseek_v3_671b", 16, products=("qv",))
  with pytest.raises(ValueError, match="context_len"):
    inference_flops_per_token("deepseek_v3_671b", -5)
