"""The tiny DeepSeek-V3: every mechanism of the full model at a size a laptop trains in minutes.

Dimensions are fixed so that codebases can be compared at equal size (results/benchmark_step.md):
vocab 256 (bytes), hidden 256, 8 heads, 4 layers (the first dense, intermediate 512),
q_lora_rank 128, kv_lora_rank 64, qk_nope 32, qk_rope 32, v 32, 32 routed experts of width 128,
top-4, 1 shared expert, n_group 4, topk_group 2, routed_scaling_factor 2.5, sequence length 256.

Runs on one device; `configs/orion_4x8.py` runs the same model on an emulated 4 x 8 mesh.

Usage: dsv3-train --config=configs/tiny.py --config.train.steps=100
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.name = "tiny"
  c.model = config_dict.ConfigDict(dict(
      vocab_size=256,
      hidden_size=256,
      intermediate_size=512,
      moe_intermediate_size=128,
      num_hidden_layers=4,
      num_attention_heads=8,
      q_lora_rank=128,
      kv_lora_rank=64,
      qk_nope_head_dim=32,
      qk_rope_head_dim=32,
      v_head_dim=32,
      n_routed_experts=32,
      n_shared_experts=1,
      num_experts_per_tok=4,
      n_group=4,
      topk_group=2,
      routed_scaling_factor=2.5,
      norm_topk_prob=True,
      first_k_dense_replace=1,
      num_nextn_predict_layers=1,
      rms_norm_eps=1e-6,
      rope_theta=10000.0,
      rope_interleave=True,
      rope_scaling=None,
      max_position_embeddings=256,
      tie_word_embeddings=False,
      initializer_range=0.02,
      embedding_init_std=1.0,
      dtype="float32",
      dispatch="flat",
      capacity_factor=1.25,
      dispatch_payload="compute",
      combine_payload="compute",
      # FP8 training (report §3.3; see dsv3_jax/model/config.py and configs/orion_4x8_fp8.py).
      fp8=False,
      fp8_layers=("attention_projections", "dense_mlp", "shared_experts", "routed_experts"),
      fp8_format="e4m3",
      fp8_grad_format="e4m3",
      fp8_pow2_scale=True,
      fp8_accumulator_mantissa_bits=config_dict.placeholder(int),
      fp8_promotion_interval=128,
  ))
  # Emulated topology: nodes x GPUs per node = devices (XLA_FLAGS is set from this).
  # ep_nodes: nodes per expert-parallel group (None = all; fewer adds data parallelism across
  # groups on a ('replica', 'node', 'gpu') mesh).
  c.mesh = config_dict.ConfigDict(dict(nodes=1, gpus_per_node=1,
                                       ep_nodes=config_dict.placeholder(int)))
  # Data: None = the embedded default corpus (this Python's standard library sources);
  # otherwise a tuple of text files or directories (every *.py, *.txt, *.md below them); on the
  # command line: --config.data.paths="('/my/texts',)".
  c.data = config_dict.ConfigDict(dict(
      paths=config_dict.placeholder(tuple),
      seq_len=256,
      heldout_fraction=0.05,
      eval_sequences=256,
      seed=0,
  ))
  c.train = config_dict.ConfigDict(dict(
      batch_size=8,  # sequences per step (global)
      steps=600,
      learning_rate=3e-3,
      min_learning_rate_ratio=0.1,
      warmup_steps=50,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      grad_clip_norm=1.0,
      seed=0,
      # Aux-loss-free balancing speed gamma and sequence-wise balance weight alpha (report
      # §2.1.2, §4.2: gamma 0.001 over 14.3T tokens, alpha 1e-4). Runs here last a few hundred
      # steps, so gamma is 10x larger.
      bias_update_speed=0.01,
      balance_loss_alpha=1e-4,
      mtp_loss_weight=0.3,
      dropless=True,
      log_every=10,
      eval_every=200,
      checkpoint_every=200,
      workdir="runs/tiny",
      # Reliability (README, "Reliability"): stop after this many non-finite steps in a row
      # (each one is skipped, no update applied); compare the replicas of the replicated state
      # across devices every N steps and before each checkpoint (0: off; silent data
      # corruption); accept a resume whose settings change the math (recorded in
      # <workdir>/run_history.jsonl) instead of refusing it.
      max_nonfinite_steps=3,
      sdc_check_every=50,
      allow_config_change=False,
      # ZeRO-1 (V3 report §3.2; dsv3_jax/train/zero1.py): each parameter's Adam moments
      # partitioned over the devices that hold that parameter, gradients reduce-scattered and
      # the updated slices all-gathered. Off by default: the gather overwrites every replica of
      # a parameter and each moment has one copy, so the replica check above no longer finds
      # silent data corruption in them.
      shard_optimizer_state=False,
      # Activation recomputation (report §3.2.3 recomputes RMSNorm and the MLA up-projections):
      # True reruns each decoder block's forward in the backward pass, so that only the blocks'
      # inputs stay live in between (model.transformer.recomputed): same values, less memory
      # (on the 4 x 8 mesh mostly the MoE dispatch buffers), one more forward pass of compute.
      remat=False,
  ))
  return c
