"""The main job: the tiny DeepSeek-V3 on an emulated 4-node x 8-GPU mesh with expert parallelism.

32 CPU devices stand for 4 nodes of 8 GPUs. The 32 routed experts are sharded one per device over
(`node`, `gpu`); the batch is data-parallel over the same devices; tokens reach at most
`topk_group` = 2 of the `n_group` = 4 nodes (node-limited routing, report §2.1.2).

Usage: make train   (= dsv3-train --config=configs/orion_4x8.py)
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.name = "orion_4x8"
  c.mesh.nodes = 4
  c.mesh.gpus_per_node = 8
  c.train.batch_size = 32  # one sequence of 256 tokens per device
  c.train.workdir = "runs/orion_4x8"
  return c
