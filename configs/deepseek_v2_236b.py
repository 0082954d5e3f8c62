"""DeepSeek-V2 236B at its real dimensions (Hugging Face deepseek-ai/DeepSeek-V2 config.json).

236B total / 21B activated parameters (DeepSeek-V2 report, arXiv 2405.04434, Table 1); 60 layers of
MLA (kv_lora_rank 512 + 64 RoPE dims cached per token) and DeepSeekMoE with 160 routed + 2 shared
experts, top-6, device-limited routing over 8 groups (top-3). V2 gates with a softmax over expert
affinities (V3 uses a sigmoid): that is recorded outside `c.model` as `c.scoring_func`, because
`dsv3_jax.model.ModelConfig` has no such field. Used by `dsv3_jax.analysis` for memory, FLOPs and
parameter counts; never materialised on this machine.
"""

from ml_collections import config_dict

from configs import tiny


def get_config() -> config_dict.ConfigDict:
  c = tiny.get_config()
  c.name = "deepseek_v2_236b"
  c.model_type = "deepseek_v2"
  c.scoring_func = "softmax"  # HF DeepseekV2Config.scoring_func
  c.topk_method = "group_limited_greedy"  # HF DeepseekV2Config.topk_method
  c.model.update(dict(
      vocab_size=102400,
      hidden_size=5120,
      intermediate_size=12288,
      moe_intermediate_size=1536,
      num_hidden_layers=60,
      num_attention_heads=128,
      q_lora_rank=1536,
      kv_lora_rank=512,
      qk_nope_head_dim=128,
      qk_rope_head_dim=64,
      v_head_dim=128,
      n_routed_experts=160,
      n_shared_experts=2,
      num_experts_per_tok=6,
      n_group=8,
      topk_group=3,
      routed_scaling_factor=16.0,
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
  c.mesh.nodes = 8
  c.mesh.gpus_per_node = 8
  c.data.seq_len = 4096
  c.train.workdir = "runs/deepseek_v2_236b"
  return c
