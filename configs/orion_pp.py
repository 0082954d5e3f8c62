"""The tiny DeepSeek-V3 trained with DualPipe pipeline parallelism: 4 stages x 2 nodes x 4 GPUs.

32 CPU devices, as the main job (configs/orion_4x8.py), laid out as DeepSeek-V3 trains (report
§3.2): pipeline stages over the `stage` axis, expert parallelism inside each stage over
(`node`, `gpu`) (EP8: the 32 routed experts, 4 per device; `n_group` = the 2 nodes of a stage,
`topk_group` = 1: node-limited routing), data parallelism over a stage's 8 devices. The model is
the tiny one with 5 layers (1 dense + 4 MoE: one MoE layer per stage; the embedding and the
dense layer run on stage 0, the final norm, head, loss and the MTP module on stage 3).
DualPipe (§3.2.1, Fig. 5) with 8 micro-batches per step (the fewest it runs with on 4 stages,
4 from each end), one sequence per device and micro-batch; its slot table comes from
analysis/timeline's simulator (dsv3_jax/parallel/pipeline_schedule.py) and the executed
schedule's idle slots, stored activations and tag checks are in metrics.jsonl
(`idle_slots`, `peak_activations`, `schedule_mismatches`, one value per stage).

Usage: dsv3-train --config=configs/orion_pp.py [--config.pipeline.schedule=1F1B ...]
"""

from ml_collections import config_dict

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.name = "orion_pp"
  c.mesh.stages = 4  # pipeline stages (absent elsewhere: 1)
  c.mesh.nodes = 2
  c.mesh.gpus_per_node = 4
  c.model.num_hidden_layers = 5
  c.model.n_group = 2
  c.model.topk_group = 1
  c.model.capacity_factor = 3.0
  c.pipeline = config_dict.ConfigDict(dict(
      schedule="DualPipe",  # "1F1B", "ZB1P" or "DualPipe"
      micro_batches=8,  # >= 2 x stages for DualPipe (even), >= stages otherwise
  ))
  c.train.batch_size = 64  # 8 data-parallel devices per stage x 8 micro-batches x 1 sequence
  c.train.steps = 120
  c.train.warmup_steps = 12
  c.train.dropless = False
  c.train.log_every = 10
  c.train.eval_every = 60
  c.train.checkpoint_every = 30
  c.train.workdir = "runs/orion_pp"
  return c
