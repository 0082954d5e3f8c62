"""The request-stream replay (`infer.load`): the measured-step clock, TTFT / TPOT by hand,
Poisson arrivals, and bad input."""

import itertools

import numpy as np
import pytest
from random_weights import random_model

from dsv3_jax.infer import Engine
from dsv3_jax.infer.load import Request, poisson_requests, run_stream
from dsv3_jax.model.config import ModelConfig

# The replay only schedules steps: one dense layer of random weights is enough (its prefill and
# decode compile in ~1/3 of the tiny checkpoint's time)
CONFIG = ModelConfig(
    vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
    v_head_dim=4, first_k_dense_replace=1, n_routed_experts=4, moe_intermediate_size=8,
    num_experts_per_tok=2, n_group=1, topk_group=1, num_nextn_predict_layers=0,
    max_position_embeddings=64)


@pytest.fixture(scope="module")
def engine():
  # one bucket each: one prefill and one decode compilation; 4 pages of 16 per sequence
  return Engine(random_model(CONFIG), max_batch=4, page_size=16, batch_buckets=(4,),
                page_buckets=(4,), prompt_buckets=(16,))


def _unit_clock():
  """Each call returns the next integer: every engine step takes exactly 1 s."""
  ticks = itertools.count()
  return lambda: float(next(ticks))


def test_ttft_and_tpot_follow_the_step_clock(engine):
  # request 0 at t=0 wants 3 tokens: step 1 (0 -> 1) prefills it (token 1) and decodes token 2,
  # step 2 (1 -> 2) decodes token 3. Request 1 arrives at t=10 while the engine is idle: the
  # clock jumps to 10, its one step ends at 11 with both tokens (prefill + one decode).
  reqs = [Request(0.0, (1, 2, 3), 3), Request(10.0, (4, 5), 2)]
  res = run_stream(engine, reqs, clock=_unit_clock())
  r0, r1 = res.records
  assert (r0.first_token_s, r0.finish_s, r0.tokens) == (1.0, 2.0, 3)
  assert r0.ttft_s == 1.0 and r0.tpot_s == pytest.approx(0.5)
  assert (r1.first_token_s, r1.finish_s, r1.tokens) == (11.0, 11.0, 2)
  assert r1.ttft_s == 1.0 and r1.tpot_s == 0.0
  assert res.steps == 3 and res.duration_s == 11.0
  s = res.summary()
  assert s["output_tokens"] == 5 and s["throughput_tok_s"] == pytest.approx(5 / 11)
  assert s["ttft_p50_ms"] == pytest.approx(1000.0)
  # pages: 3 + 3 - 1 = 5 cached positions -> 1 page of 16 while request 0 runs, none at the end
  assert res.occupancy[-1] == 0.0 and max(res.occupancy) > 0.0
  assert res.counts["prefill_calls"] == 2


def test_a_batch_that_arrives_together_waits_for_slots(engine):
  # 6 requests at t=0 and 4 slots: the last two are admitted after the first four finish
  reqs = [Request(0.0, (7, 8, 9, 10), 4)] * 6
  res = run_stream(engine, reqs, clock=_unit_clock())
  ttft = [r.ttft_s for r in res.records]
  assert ttft[:4] == [1.0] * 4 and min(ttft[4:]) > 1.0
  assert all(r.tokens == 4 for r in res.records)
  # the same prompt gives the same greedy tokens whichever wave it ran in
  assert len({tuple(c.tokens) for c in map(engine.completion,
                                           [r.request_id for r in res.records])}) == 1


def test_poisson_arrivals():
  reqs = poisson_requests(50.0, 4000, [[1, 2]], 8, seed=3)
  t = np.array([r.arrival_s for r in reqs])
  assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
  assert np.mean(np.diff(t)) == pytest.approx(1 / 50.0, rel=0.05)
  assert np.std(np.diff(t)) == pytest.approx(1 / 50.0, rel=0.08)  # exponential: std = mean
  assert reqs == poisson_requests(50.0, 4000, [[1, 2]], 8, seed=3)


def test_bad_streams_are_refused_before_any_work(engine):
  with pytest.raises(ValueError, match="rate_per_s"):
    poisson_requests(0.0, 3, [[1]], 4)
  with pytest.raises(ValueError, match="sorted"):
    run_stream(engine, [Request(1.0, (1,), 2), Request(0.0, (1,), 2)])
  before = dict(engine.counts)
  with pytest.raises(ValueError, match="request 1: the prompt is empty"):
    run_stream(engine, [Request(0.0, (1,), 2), Request(1.0, (), 2)])
  assert dict(engine.counts) == before and not engine.has_work()
