"""DeepSeek-V3 671B at its real dimensions (Hugging Face deepseek-ai/DeepSeek-V3 config.json).

Never materialised on this machine: `dsv3_jax.model.abstract_model` builds it with
`jax.eval_shape` for parameter counts, shapes and cost models. The mesh is the training
expert-parallel group of the report (§3.1: EP64 over 8 nodes x 8 GPUs), n_group = 8 nodes.
"""

from ml_collections import config_dict

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.name = "deepseek_v3_671b"
  c.model.update(dict(
      vocab_size=129280,
      hidden_size=7168,
      intermediate_size=18432,
      moe_intermediate_size=2048,
      num_hidden_layers=61,
      num_attention_heads=128,
      q_lora_rank=1536,
      kv_lora_rank=512,
      qk_nope_head_dim=128,
      qk_rope_head_dim=64,
      v_head_dim=128,
      n_routed_experts=256,
      n_shared_experts=1,
      num_experts_per_tok=8,
      n_group=8,
      topk_group=4,
      routed_scaling_factor=2.5,
      norm_topk_prob=True,
      first_k_dense_replace=3,
      num_nextn_predict_layers=1,
      rms_norm_eps=1e-6,
      rope_theta=10000.0,
      rope_interleave=True,
      max_position_embeddings=163840,
      dtype="bfloat16",
  ))
  c.model.rope_scaling = config_dict.ConfigDict(dict(
      type="yarn",
      factor=40.0,
      original_max_position_embeddings=4096,
      beta_fast=32.0,
      beta_slow=1.0,
      mscale=1.0,
      mscale_all_dim=1.0,
  ))
  c.mesh.nodes = 8
  c.mesh.gpus_per_node = 8
  c.data.seq_len = 4096
  c.train.batch_size = 15360  # sequences per step at the end of the batch-size ramp (§4.2)
  c.train.workdir = "runs/deepseek_v3_671b"
  return c
