"""Hugging Face DeepSeek-V3 checkpoints <-> dsv3_jax (`hf.load_hf`, `hf.save_hf`)."""
