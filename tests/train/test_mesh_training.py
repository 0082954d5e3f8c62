"""Training on meshes with a size-1 axis (one node of several GPUs, several nodes of one GPU):
the expert-parallel run takes the same steps as the one-device run."""

import json

import numpy as np
import pytest

from tiny_run import ONE_MOE_LAYER

from configs import tiny
from dsv3_jax.train import trainer


def _cfg(tmp_path, nodes, gpus, schedule):
  c = tiny.get_config()
  c.model.update(dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                      max_position_embeddings=64, dispatch=schedule))
  # One MoE layer and no MTP module: the smallest program that dispatches (compile time
  # dominates; the MTP layer's MoE is the same module).
  c.model.update(ONE_MOE_LAYER)
  c.mesh.nodes, c.mesh.gpus_per_node = nodes, gpus
  c.data.seq_len = 64
  c.data.eval_sequences = 8
  c.train.update(dict(batch_size=8, steps=3, warmup_steps=1, log_every=1, eval_every=3,
                      checkpoint_every=3, workdir=str(tmp_path / f"{nodes}x{gpus}{schedule}"),
                      learning_rate=3e-3, dropless=True))
  return c


def _losses(cfg):
  trainer.train(cfg, progress=False, log=lambda *_: None)
  rows = [json.loads(l) for l in open(f"{cfg.train.workdir}/metrics.jsonl")]
  return np.array([r["loss"] for r in rows if "loss" in r])


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
  # On one device both schedules run the same local (dropless) path.
  return _losses(_cfg(tmp_path_factory.mktemp("one"), 1, 1, "flat"))


@pytest.mark.parametrize("nodes,gpus,schedule", [(1, 2, "flat"), (2, 1, "two_hop")])
def test_training_on_a_mesh_with_a_size_one_axis_follows_the_one_device_run(
    tmp_path, one_device_losses, nodes, gpus, schedule):
  ep = _losses(_cfg(tmp_path, nodes, gpus, schedule))
  one = one_device_losses
  assert len(ep) == 3 and np.all(np.isfinite(ep))
  # Step 1 is the same forward pass; steps 2 and 3 follow from equal gradients and updates.
  np.testing.assert_allclose(ep, one, rtol=2e-5)
