"""The main job in FP8 (DeepSeek-V3 report §3.3): the FP8 side of the BF16 / FP8 comparison.

`configs/orion_4x8_bf16.py` plus `model.fp8`: the GEMMs of the MLA projections, the dense MLP,
the shared and the routed experts run in E4M3 with fine-grained scaling (1 x 128 activation and
output-gradient tiles, 128 x 128 weight blocks, power-of-two scales, FP32 accumulation); the
embedding, output head, router, norms and attention core stay BF16 / FP32. The dispatch
all_to_all carries FP8 (E4M3 + one scale per 1 x 128 tile), the combine BF16, as in the report
(§3.3.3). Master weights, gradients and AdamW state are float32.

Usage: dsv3-train --config=configs/orion_4x8_fp8.py   (writes runs/orion_4x8_fp8)
"""

from configs import orion_4x8_bf16


def get_config():
  c = orion_4x8_bf16.get_config()
  c.name = "orion_4x8_fp8"
  c.model.fp8 = True
  c.model.fp8_layers = ("attention_projections", "dense_mlp", "shared_experts",
                        "routed_experts")
  c.model.dispatch_payload = "fp8"
  c.model.combine_payload = "bf16"
  c.train.workdir = "runs/orion_4x8_fp8"
  return c
