"""Prefill/decode disaggregation: prefill on a 1 x 4 mesh (devices 0-3, EP4), decode on a
4 x 2 mesh (devices 4-11, EP8); the latent cache pages move device to device. Greedy tokens
equal the colocated engine's (and transformers'), the bytes moved equal the cache formula, and
bad meshes / pools are refused before any work."""

import os

import jax
import numpy as np
import pytest

from dsv3_jax.analysis.memory import kv_cache_bytes_per_token
from dsv3_jax.convert.hf import load_hf
from dsv3_jax.infer import Engine
from dsv3_jax.infer.disaggregated import (DisaggregatedEngine, disaggregated_meshes,
                                          materialised_kv_bytes_per_token)
from dsv3_jax.parallel.mesh import make_mesh

REF = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "hf_deepseek_v3", "tiny")
PAGE = 8
# page_size 8: prompts of 8, 16, 24, 32 tokens end on a page boundary, the others do not
LENGTHS = (8, 9, 24, 32, 15, 17, 2, 31)
NEW = 24
DECODE = dict(max_batch=16, page_size=PAGE, decode_steps=4, page_buckets=(8,),
              prompt_buckets=(32,))


@pytest.fixture(scope="module")
def model():
  return load_hf(REF)[1]


@pytest.fixture(scope="module")
def prompts():
  ref = np.load(os.path.join(REF, "generation.npz"))
  rng = np.random.default_rng(0)
  refs = [(ref[f"prompt_{i}"].tolist(), ref[f"tokens_{i}"][:NEW].tolist()) for i in range(4)]
  return refs + [(rng.integers(0, 256, n).tolist(), None) for n in LENGTHS]


@pytest.fixture(scope="module")
def meshes():
  d = jax.devices()
  return make_mesh(1, 4, devices=d[:4]), make_mesh(4, 2, devices=d[4:12])


@pytest.fixture(scope="module")
def engine(model, meshes):
  # prefill: 2 prompts per device, 16 pages each (12 prompts take two prefill calls);
  # decode: 2 sequences per device, 14 pages (112 tokens) each
  return DisaggregatedEngine(model, prefill_mesh=meshes[0], mesh=meshes[1], num_pages=14,
                             batch_buckets=(2,), prefill_max_batch=8, prefill_num_pages=16,
                             prefill_batch_buckets=(2,), **DECODE)


@pytest.fixture(scope="module")
def colocated(model):
  return Engine(model, batch_buckets=(16,), **DECODE)  # one device, prefill and decode


def test_tokens_equal_colocated_and_bytes_moved_equal_the_cache_formula(engine, colocated,
                                                                        prompts, meshes):
  ids = [p for p, _ in prompts]
  outs = engine.generate(ids, max_new_tokens=NEW)
  want = colocated.generate(ids, max_new_tokens=NEW)
  for i, (out, col, (_, ref)) in enumerate(zip(outs, want, prompts)):
    assert out.tokens == col.tokens, i
    assert ref is None or out.tokens == ref, i  # the transformers reference
  prefill_mesh, decode_mesh = meshes
  assert engine.prefill_model.moe_layers[0].topology.n_devices == 4  # EP4 prefill
  assert engine.model.moe_layers[0].topology.n_devices == 8  # EP8 decode
  assert set(engine.prefill_pools[0].devices()) == set(prefill_mesh.devices.flat)
  assert set(engine.pools[0].devices()) == set(decode_mesh.devices.flat)
  # every prompt's cache moved once, in whole pages: 3 layers x (16 + 8) x 4 B = 288 B/token
  c, s = engine.counts, engine.transfer_summary()
  per_token = kv_cache_bytes_per_token(engine.config, cache_bits=32)
  assert per_token == engine.cache_bytes_per_token() == 3 * (16 + 8) * 4
  tokens = sum(len(p) for p in ids)
  pages = sum(-(-len(p) // PAGE) for p in ids)
  assert c["transfer_tokens"] == tokens and c["transfer_pages"] == pages
  assert c["transfer_bytes"] == pages * PAGE * per_token == s["page_bytes"]
  assert s["token_bytes"] == tokens * per_token
  # materialised K/V: 3 layers x 4 heads x (16 + 8 + 16) x 4 B = 1,920 B/token (6.7x)
  assert materialised_kv_bytes_per_token(engine.config, 4) == 1920
  assert s["materialised_bytes"] == tokens * 1920
  assert c["prefill_calls"] == 2  # 12 prompts over 4 prefill devices x 2 slots
  assert engine.compiles == {"prefill": 1, "generate": 1}
  # nothing left behind: prefill pages released after the move, decode pages at the end
  assert all(a.used == 0 for a in engine.prefill_allocators)
  assert engine.pages_in_use() == 0 and all(a.available == 14 for a in engine.allocators)


def test_a_request_that_ends_at_its_first_token_moves_nothing(engine, colocated, prompts):
  before = dict(engine.counts)
  out = engine.generate(prompts[3][0], max_new_tokens=1)[0]
  assert out.tokens == prompts[3][1][:1] and out.finish_reason == "length"
  assert engine.counts["transfer_bytes"] == before["transfer_bytes"]
  assert engine.counts["prefill_calls"] == before["prefill_calls"] + 1
  assert engine.compiles == {"prefill": 1, "generate": 1}


def test_a_sampled_first_token_is_drawn_on_the_prefill_mesh_as_colocated(engine, colocated,
                                                                          prompts):
  ids = [p for p, _ in prompts[:4]]
  key = jax.random.key(7)
  got = engine.generate(ids, max_new_tokens=1, temperature=1.0, top_k=20, key=key)
  want = colocated.generate(ids, max_new_tokens=1, temperature=1.0, top_k=20, key=key)
  assert [o.tokens for o in got] == [o.tokens for o in want]
  assert engine.compiles["prefill_sample"] == 1 and "generate_sampled" not in engine.compiles


def test_overlapping_or_too_many_devices_are_refused(model):
  d = jax.devices()
  with pytest.raises(ValueError, match=r"prefill_mesh and mesh \(decode\) share 2 device\(s\) "
                                       r"\[2, 3\]; allowed: disjoint"):
    DisaggregatedEngine(model, prefill_mesh=make_mesh(1, 4, devices=d[:4]),
                        mesh=make_mesh(4, 2, devices=d[2:10]))
  with pytest.raises(ValueError, match=r"2 x 8 = 16 devices \+ decode mesh 4 x 8 = 32 devices = "
                                       r"48 devices, but there are 32; allowed: at most 32"):
    disaggregated_meshes((2, 8), (4, 8))
  pre, dec = disaggregated_meshes((1, 8), (4, 4))
  assert [x.id for x in pre.devices.flat] == list(range(8))
  assert [x.id for x in dec.devices.flat] == list(range(8, 24))
  with pytest.raises(ValueError, match="prefill_mesh must be a jax.sharding.Mesh"):
    DisaggregatedEngine(model, prefill_mesh=None, mesh=dec)


def test_expert_parallel_sizes_that_do_not_divide_the_experts_are_refused(model):
  d = jax.devices()
  dec = make_mesh(4, 2, devices=d[4:12])
  with pytest.raises(ValueError, match=r"prefill_mesh: expert-parallel size 3 .* does not "
                                       r"divide model.n_routed_experts=16; allowed EP sizes: "
                                       r"\[1, 2, 4, 8, 16\]"):
    DisaggregatedEngine(model, prefill_mesh=make_mesh(1, 3, devices=d[:3]), mesh=dec)
  with pytest.raises(ValueError, match=r"^mesh: expert-parallel size 24"):
    DisaggregatedEngine(model, prefill_mesh=make_mesh(1, 4, devices=d[:4]),
                        mesh=make_mesh(4, 6, devices=d[4:28]))
  # the router's expert groups must be the nodes (n_group = 4): 2 nodes is refused up front
  with pytest.raises(ValueError, match=r"prefill_mesh: model.n_group=4 must equal the 2 nodes"):
    DisaggregatedEngine(model, prefill_mesh=make_mesh(2, 2, devices=d[:4]), mesh=dec)
  with pytest.raises(ValueError, match=r"prefill_max_batch=6 must be a positive multiple of the "
                                       r"4 devices"):
    DisaggregatedEngine(model, prefill_mesh=make_mesh(1, 4, devices=d[:4]), mesh=dec,
                        prefill_max_batch=6)


def test_pools_too_small_for_a_prompt_are_refused_before_any_work(engine):
  before = (dict(engine.counts), engine.num_waiting, engine.num_running)
  # decode: 14 pages of 8 tokens per device; a 120-token prompt moves 15 pages into one
  with pytest.raises(ValueError, match=r"decode pool \(num_pages=14 pages of 8 tokens per decode "
                                       r"device\) is too small for the 15 pages .* allowed: "
                                       r"num_pages >= 15"):
    engine.generate([[1] * 10, [1] * 120], max_new_tokens=4)
  # prefill: 16 pages per device hold 128 prompt tokens
  with pytest.raises(ValueError, match=r"prefill_num_pages=16 .* cannot hold a prompt of 130 "
                                       r"tokens; allowed: prefill_num_pages >= 17"):
    engine.submit([1] * 130, max_new_tokens=4)
  assert (dict(engine.counts), engine.num_waiting, engine.num_running) == before
