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

Optimizer state: ZeRO-1 (`train.shard_optimizer_state`, train/zero1.py; the data parallelism
DeepSeek-V3 trains with, report §3.2): each dense parameter's Adam moments are split over the 32
devices that hold it (19.7 -> 3.5 MiB of optimizer state per device, results/zero1.md), which
lowers `make train`'s peak resident memory (4.95 -> 4.43 GiB in results/train_memory.md,
"replicated optimizer" vs "shipped") at about the same step time; the losses agree within 2e-7
relative (the gradient sum runs in another order). The price: the replica check
(`train.sdc_check_every`) no longer sees a flipped bit in a moment or in a parameter copy that
the next all-gather overwrites; `--config.train.shard_optimizer_state=False` restores the
replicated state.

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
  c.train.shard_optimizer_state = True  # ZeRO-1 (see above)
  c.train.log_every = 10
  c.train.eval_every = 60
  c.train.checkpoint_every = 30
  c.train.workdir = "runs/orion_4x8"
  return c
