"""KV cache and parameter counts against Insights Tables 1-2 and hand-computed figures."""

import json
import os

import pytest

from dsv3_jax.analysis import (KB, ModelSpec, decode_tokens_per_second, hardware, kv_cache_bytes,
                               kv_cache_bytes_per_token, parameter_counts)
from dsv3_jax.analysis.memory import (bytes_per_element, kv_elements_per_token_per_layer,
                                      weight_bytes)

REFERENCE = "/work/shared/reference/hf_deepseek_v3"


def test_table1_kv_per_token():
  # Insights Table 1 (BF16, KB = 1000 bytes).
  assert kv_cache_bytes_per_token("deepseek_v3_671b") / KB == pytest.approx(70.272, abs=1e-9)
  assert kv_cache_bytes_per_token("qwen2_5_72b") / KB == pytest.approx(327.680, abs=1e-9)
  assert kv_cache_bytes_per_token("llama3_1_405b") / KB == pytest.approx(516.096, abs=1e-9)
  # Hand: (kv_lora_rank + rope) * layers * 2 bytes; 2 * kv_heads * head_dim * layers * 2 bytes.
  assert kv_cache_bytes_per_token("deepseek_v3_671b") == (512 + 64) * 61 * 2
  assert kv_cache_bytes_per_token("llama3_1_405b") == 2 * 8 * 128 * 126 * 2


def test_table1_multipliers_and_the_7_28_inconsistency():
  v3 = kv_cache_bytes_per_token("deepseek_v3_671b")
  qwen = kv_cache_bytes_per_token("qwen2_5_72b") / v3
  llama = kv_cache_bytes_per_token("llama3_1_405b") / v3
  assert round(qwen, 2) == 4.66  # as printed
  assert llama == pytest.approx(7.344, abs=5e-4)  # 516.096 / 70.272
  assert abs(llama - 7.28) > 0.05  # the printed 7.28x does not follow from the byte counts


def test_attention_kinds_hand_computed():
  assert kv_elements_per_token_per_layer("mha", num_heads=32, head_dim=128) == 8192
  assert kv_elements_per_token_per_layer("gqa", num_kv_heads=8, head_dim=128) == 2048
  assert kv_elements_per_token_per_layer("mqa", head_dim=128) == 256
  assert kv_elements_per_token_per_layer("mla", kv_lora_rank=512, qk_rope_head_dim=64) == 576
  with pytest.raises(ValueError, match="kind"):
    kv_elements_per_token_per_layer("mlp")
  with pytest.raises(ValueError, match="num_kv_heads"):
    kv_elements_per_token_per_layer("gqa", num_kv_heads=-8, head_dim=128)


def test_mha_and_mqa_from_configs():
  base = dict(model_type="llama", vocab_size=100, hidden_size=512, num_hidden_layers=4,
              num_attention_heads=8, intermediate_size=1024)
  mha = ModelSpec.from_config(dict(base, num_key_value_heads=8))
  mqa = ModelSpec.from_config(dict(base, num_key_value_heads=1))
  assert kv_cache_bytes_per_token(mha) == 2 * 8 * 64 * 4 * 2
  assert kv_cache_bytes_per_token(mqa) == 2 * 1 * 64 * 4 * 2


def test_quantized_cache():
  bf16 = kv_cache_bytes_per_token("deepseek_v3_671b")
  assert kv_cache_bytes_per_token("deepseek_v3_671b", cache_bits=8) == bf16 / 2
  # 4-bit elements + one FP16 scale per 32 elements = 0.5 + 2/32 bytes per element.
  assert bytes_per_element(4, quant_group_size=32, scale_bits=16) == pytest.approx(0.5625)
  with pytest.raises(ValueError, match="cache_bits"):
    bytes_per_element(0)
  with pytest.raises(ValueError, match="quant_group_size"):
    bytes_per_element(8, quant_group_size=0)


def test_sliding_window():
  ctx = 131072
  full = kv_cache_bytes("llama3_1_405b", ctx)
  assert full == kv_cache_bytes_per_token("llama3_1_405b") * ctx
  assert kv_cache_bytes("llama3_1_405b", ctx, sliding_window=ctx) == full
  assert kv_cache_bytes("llama3_1_405b", ctx, sliding_window=4096) == full * 4096 / ctx
  half = kv_cache_bytes("llama3_1_405b", ctx, sliding_window=4096, window_layers=63)
  assert half == pytest.approx(full / 2 * (1 + 4096 / ctx))
  assert kv_cache_bytes("deepseek_v3_671b", 1000, batch_size=3) == 3 * 1000 * 70272
  with pytest.raises(ValueError, match="sliding_window"):
    kv_cache_bytes("llama3_1_405b", 4096, sliding_window=8192)
  with pytest.raises(ValueError, match="window_layers"):
    kv_cache_bytes("llama3_1_405b", 4096, sliding_window=1024, window_layers=127)
  with pytest.raises(ValueError, match="context_len"):
    kv_cache_bytes("llama3_1_405b", -1)
  with pytest.raises(ValueError, match="batch_size"):
    kv_cache_bytes("llama3_1_405b", 10, batch_size=0)


def test_parameters_v3():
  pc = parameter_counts("deepseek_v3_671b")
  assert round(pc.total / 1e9) == 671  # V3 report §1
  assert round(pc.activated / 1e9) == 37
  # 671B + MTP module (with duplicated embedding and head) = the ~685B Hugging Face checkpoint.
  assert 684e9 < pc.total + pc.mtp + pc.embedding + pc.head < 686e9


def test_parameters_v2_and_lite_and_dense():
  v2 = parameter_counts("deepseek_v2_236b")
  assert round(v2.total / 1e9) == 236 and round(v2.activated / 1e9) == 21  # V2 report Table 1
  lite = parameter_counts("deepseek_v2_lite_16b")
  assert round(lite.total / 1e9, 1) == 15.7
  assert 2.35e9 < lite.activated < 2.5e9  # "2.4B activated"
  assert round(parameter_counts("qwen2_5_72b").total / 1e9) == 73  # 72.7B (Qwen2.5 report)
  assert round(parameter_counts("llama3_1_405b").total / 1e9) == 406  # 405.85B


@pytest.mark.parametrize("variant", ["tiny", "tiny_noqlora_nointerleave"])
def test_parameter_count_matches_hugging_face_checkpoint(variant):
  """Total parameters equal the sum of tensor sizes of a Hugging Face DeepseekV3 checkpoint."""
  d = os.path.join(REFERENCE, variant)
  if not os.path.isdir(d):
    pytest.skip("shared reference checkpoints not available")
  with open(os.path.join(d, "config.json")) as f:
    cfg = json.load(f)
  total = 0
  with open(os.path.join(d, "params.txt")) as f:
    for line in f:
      shape = json.loads(line.split("\t")[1])
      n = 1
      for s in shape:
        n *= s
      total += n
  assert parameter_counts(cfg).total == total


def test_local_inference():
  # Hand: 1e9 params at 8 bits = 1 GB per token; 1 GB/s -> 1 token/s.
  assert decode_tokens_per_second(1e9, 1e9, weight_bits=8) == pytest.approx(1.0)
  soc = hardware.RYZEN_AI_MAX_395.memory_bandwidth
  v2 = decode_tokens_per_second(parameter_counts("deepseek_v2_236b").activated, soc, 4)
  dense = decode_tokens_per_second(parameter_counts("qwen2_5_72b").activated, soc, 4)
  assert v2 > 20  # Insights §2.2.2: ~21B activated -> ~20+ tokens/s on a PC-class AI SoC
  assert dense < 10  # a dense ~70B model: single-digit tokens/s
  assert weight_bytes(236e9, 4) == 118e9
  with pytest.raises(ValueError, match="memory_bandwidth"):
    decode_tokens_per_second(1e9, 0)
  with pytest.raises(ValueError, match="weight_bits"):
    decode_tokens_per_second(1e9, 1e9, weight_bits=0)
