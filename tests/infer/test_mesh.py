"""Serving with expert parallelism: prefill and decode run per device inside shard_map on a
(node, gpu) mesh (data-parallel attention on per-device cache pages, routed experts sharded,
two_hop dispatch) and give the one-device / transformers tokens."""

import os

import numpy as np
import pytest

from dsv3_jax.convert.hf import load_hf
from dsv3_jax.infer import Engine, for_mesh
from dsv3_jax.parallel.mesh import make_mesh

REF = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "hf_deepseek_v3", "tiny")


def test_generation_on_a_4x2_mesh_with_two_hop_dispatch_matches_transformers():
  mesh = make_mesh(4, 2)  # 16 experts, 2 per device; n_group 4 = nodes
  config, model = load_hf(REF)
  model = for_mesh(model, mesh, config.replace(dispatch="two_hop"))
  engine = Engine(model, mesh=mesh, max_batch=8, page_size=16, decode_steps=4, batch_buckets=(1,),
                  page_buckets=(8,), prompt_buckets=(32,))
  assert engine.pools[0].sharding.spec[0] == ("node", "gpu")  # pages live on their device
  ref = np.load(os.path.join(REF, "generation.npz"))
  prompts = [ref[f"prompt_{i}"].tolist() for i in range(4)]
  outs = engine.generate(prompts, max_new_tokens=24, return_logits=True)
  for i, out in enumerate(outs):
    assert out.tokens == ref[f"tokens_{i}"][:24].tolist(), i
    want = ref[f"logits_{i}"][:24]
    rel = np.abs(out.logits - want).max(axis=1) / np.abs(want).max(axis=1)
    assert rel.max() < 1e-4
  # one sequence per device: the scheduler spread them over four devices
  assert len({engine._done[o.request_id].shard for o in outs}) == 4
  assert engine.compiles == {"prefill": 1, "generate": 1}


def test_mesh_settings_are_checked_before_any_work():
  mesh = make_mesh(4, 2)
  _, model = load_hf(REF, mesh=mesh)
  with pytest.raises(ValueError, match=r"max_batch=4 must be a multiple of the 8 devices"):
    Engine(model, mesh=mesh, max_batch=4)
  with pytest.raises(ValueError, match="not divisible"):
    for_mesh(model, make_mesh(4, 8))  # 16 experts over 32 devices
