"""Qwen2.5-72B as a dense GQA model (Hugging Face Qwen/Qwen2.5-72B config.json).

80 layers, hidden 8192, 64 query heads sharing 8 key/value heads of dimension 128, SwiGLU MLP of
width 29568, untied 152064-token embedding and head, biases on the q/k/v projections. Only what
`dsv3_jax.analysis` uses (KV cache, parameters, FLOPs); it is not a trainable dsv3_jax config.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "qwen2_5_72b"
  c.model_type = "qwen2"
  c.model = config_dict.ConfigDict(dict(
      vocab_size=152064,
      hidden_size=8192,
      intermediate_size=29568,
      num_hidden_layers=80,
      num_attention_heads=64,
      num_key_value_heads=8,
      head_dim=128,  # hidden_size / num_attention_heads (Qwen2Config derives it)
      attention_bias=True,  # q/k/v projections carry biases in Qwen2
      hidden_act="silu",
      max_position_embeddings=32768,
      rope_theta=1000000.0,
      rms_norm_eps=1e-5,
      tie_word_embeddings=False,
      torch_dtype="bfloat16",
  ))
  return c
