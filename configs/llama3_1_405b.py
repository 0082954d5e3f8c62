"""LLaMA-3.1-405B as a dense GQA model (Hugging Face meta-llama/Llama-3.1-405B config.json).

126 layers, hidden 16384, 128 query heads sharing 8 key/value heads of dimension 128, SwiGLU MLP of
width 53248, untied 128256-token embedding and head (the Llama 3 paper, arXiv 2407.21783, Table 3).
Only what `dsv3_jax.analysis` uses; it is not a trainable dsv3_jax config.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "llama3_1_405b"
  c.model_type = "llama"
  c.model = config_dict.ConfigDict(dict(
      vocab_size=128256,
      hidden_size=16384,
      intermediate_size=53248,
      num_hidden_layers=126,
      num_attention_heads=128,
      num_key_value_heads=8,
      head_dim=128,
      attention_bias=False,
      hidden_act="silu",
      max_position_embeddings=131072,
      rope_theta=500000.0,
      rms_norm_eps=1e-5,
      tie_word_embeddings=False,
      torch_dtype="bfloat16",
  ))
  return c
