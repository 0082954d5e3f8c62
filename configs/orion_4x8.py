"""The main job: the tiny DeepSeek-V3 on an emulated 4-node x 8-GPU mesh with expert parallelism.

32 CPU devices stand for 4 nodes of 8 GPUs. The 32 routed experts are sharded one per device over
(`node`, `gpu`); the batch is data-parallel over the same devices (one 256-byte sequence each);
tokens reach at most `topk_group` = 2 of the `n_group` = 4 nodes (node-limited routing, report
§2.1.2) and move by the flat all_to_all (`model.dispatch`; "two_hop" is the node-aware one).

Capacity: each device sends at most `capacity_factor` x the balanced load (3 x 32 = 96 rows) to
each other device; the excess is dropped and counted in the metrics. Byte-level text routes the
~29 % of bytes that are spaces alike, so early in training one expert can receive most of a
sequence; a dropless run (`--config.train.dropless=True`, capacity grown on overflow up to 256)
moves up to 2.7x larger padded buffers through every all_to_all and costs ~1.5x per step here.

Usage: make train   (= dsv3-train --config=configs/orion_4x8.py); ~10 min on 2 cores.
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.name = "orion_4x8"
  c.mesh.nodes = 4
  c.mesh.gpus_per_node = 8
  c.model.capacity_factor = 3.0
  c.train.batch_size = 32  # one sequence of 256 tokens per device
  c.train.steps = 120
  c.train.warmup_steps = 12
  c.train.dropless = False
  c.train.log_every = 10
  c.train.eval_every = 60
  c.train.checkpoint_every = 30
  c.train.workdir = "runs/orion_4x8"
  return c
