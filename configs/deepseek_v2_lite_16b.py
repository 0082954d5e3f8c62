"""DeepSeek-V2-Lite 16B at its real dimensions (Hugging Face deepseek-ai/DeepSeek-V2-Lite
config.json).

15.7B total / 2.4B activated parameters (DeepSeek-V2 report, arXiv 2405.04434, Appendix B): 27
layers, no query compression (`q_lora_rank=None`), MLA with kv_lora_rank 512, 64 routed + 2 shared
experts of width 1408, top-6 without group limits (one group). Softmax gating, as DeepSeek-V2
(recorded as the top-level `c.scoring_func`).
"""

from ml_collections import config_dict

from configs import tiny


def get_config() -> config_dict.ConfigDict:
  c = tiny.get_config()
  c.name = "deepseek_v2_lite_16b"
  c.model_type = "deepseek_v2"
  c.scoring_func = "softmax"
  c.topk_method = "greedy"
  c.model.update(dict(
      vocab_size=102400,
      hidden_size=2048,
      intermediate_size=10944,
      moe_intermediate_size=1408,
      num_hidden_layers=27,
      num_attention_heads=16,
      q_lora_rank=None,
      kv_lora_rank=512,
      qk_nope_head_dim=128,
      qk_rope_head_dim=64,
      v_head_dim=128,
      n_routed_experts=64,
      n_shared_experts=2,
      num_experts_per_tok=6,
      n_group=1,
      topk_group=1,
      routed_scaling_factor=1.0,
      norm_topk_prob=False,
      first_k_dense_replace=1,
      num_nextn_predict_layers=0,
      rms_norm_eps=1e-6,
      rope_theta=10000.0,
      rope_interleave=True,
      max_position_embeddings=163840,
      tie_word_embeddings=False,
      dtype="bfloat16",
  ))
  c.model.rope_scaling = config_dict.ConfigDict(dict(
      type="yarn",
      factor=40.0,
      original_max_position_embeddings=4096,
      beta_fast=32.0,
      beta_slow=1.0,
      mscale=0.707,
      mscale_all_dim=0.707,
  ))
  c.data.seq_len = 4096
  c.train.workdir = "runs/deepseek_v2_lite_16b"
  return c
