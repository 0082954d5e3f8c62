"""The main job in BF16: the BF16 baseline of the FP8 comparison (results/fp8_training.md).

`configs/orion_4x8.py` with activations and matmuls in bfloat16 (`model.dtype`; parameters,
gradients and optimizer state stay float32, the router and output head float32) and the MoE
all_to_all payloads in BF16 both ways. Same seed, data order and steps as
`configs/orion_4x8_fp8.py`, which differs only in the FP8 settings (and the FP8 dispatch).

Usage: dsv3-train --config=configs/orion_4x8_bf16.py   (writes runs/orion_4x8_bf16)
"""

from configs import orion_4x8


def get_config():
  c = orion_4x8.get_config()
  c.name = "orion_4x8_bf16"
  c.model.dtype = "bfloat16"
  c.model.dispatch_payload = "bf16"
  c.model.combine_payload = "bf16"
  c.model.fp8 = False
  c.train.eval_every = 30
  c.train.workdir = "runs/orion_4x8_bf16"
  return c
