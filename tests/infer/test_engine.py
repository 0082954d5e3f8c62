"""The engine against Hugging Face transformers (greedy generations and per-step logits of the
reference checkpoints), continuous batching, sampling and bad input."""

import os

import jax
import numpy as np
import pytest

from dsv3_jax.infer import Engine

REF_ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "hf_deepseek_v3")
# Few shape buckets: one prefill and one decode compilation per engine.
FEW_BUCKETS = dict(max_batch=4, page_size=16, batch_buckets=(4,), page_buckets=(8,),
                   prompt_buckets=(32,))


def _reference(name):
  ref = np.load(os.path.join(REF_ROOT, name, "generation.npz"))
  n = len([k for k in ref.files if k.startswith("prompt_")])
  return [(ref[f"prompt_{i}"].tolist(), ref[f"tokens_{i}"], ref[f"logits_{i}"], ref[f"margin_{i}"])
          for i in range(n)]


@pytest.fixture(scope="module")
def engines():
  # "tiny" gets a pool of 6 pages (96 tokens): not every request fits at once, so some wait
  return {name: Engine.from_hf(os.path.join(REF_ROOT, name), **FEW_BUCKETS,
                               num_pages=6 if name == "tiny" else None)
          for name in ("tiny", "tiny_yarn")}


@pytest.mark.parametrize("name", ["tiny", "tiny_yarn"])
def test_greedy_generation_reproduces_transformers(engines, name):
  engine = engines[name]
  ref = _reference(name)
  outs = engine.generate([p for p, *_ in ref], max_new_tokens=40, return_logits=True)
  for i, (out, (prompt, tokens, logits, margin)) in enumerate(zip(outs, ref)):
    assert out.prompt == prompt and out.finish_reason == "length"
    got = np.asarray(out.tokens)
    assert got.shape == tokens.shape
    differ = np.nonzero(got != tokens)[0]
    # a step whose top-1 / top-2 margin is below 1e-4 may legitimately differ (none does here)
    assert differ.size == 0 or margin[differ[0]] < 1e-4, (i, differ)
    n = differ[0] + 1 if differ.size else len(tokens)
    rel = np.abs(out.logits[:n] - logits[:n]).max(axis=1) / np.abs(logits[:n]).max(axis=1)
    assert rel.max() < 1e-4, (i, rel.max())  # per step, relative to the step's largest logit
  # the yarn reference runs past original_max_position_embeddings = 64 (29 + 40 tokens)
  assert max(len(p) for p, *_ in ref) + 40 > 64
  if name == "tiny":  # the small pool admitted the requests in several waves
    assert engine.counts["prefill_calls"] > 1


def test_sequences_join_and_leave_between_steps(engines):
  """Continuous batching: requests arrive while others run and finish at different steps;
  each one's tokens are what it gets alone (the transformers reference)."""
  engine = engines["tiny"]
  ref = _reference("tiny")
  # (return_logits everywhere in this module: the same compiled variant as the parity test)
  engine.generate([ref[0][0]], max_new_tokens=2, return_logits=True)  # warm-up
  compiles = dict(engine.compiles)
  a = engine.submit(ref[0][0], max_new_tokens=25, return_logits=True)
  b = engine.submit(ref[1][0], max_new_tokens=5, return_logits=True)
  got = {a: [], b: []}
  for _ in range(3):
    for ev in engine.step():
      got[ev.request_id].append(ev.token)
  assert engine.num_running == 2
  c = engine.submit(ref[2][0], max_new_tokens=12, return_logits=True)
  d = engine.submit(ref[3][0], max_new_tokens=30, return_logits=True)
  got.update({c: [], d: []})
  finished = []
  max_waiting = 0
  while engine.has_work():
    max_waiting = max(max_waiting, engine.num_waiting)
    for ev in engine.step():
      got[ev.request_id].append(ev.token)
      if ev.finish_reason:
        finished.append(ev.request_id)
  assert finished.index(b) < finished.index(a)  # b left while a kept running
  assert max_waiting > 0  # d waited for pages (6 in the pool), then ran
  for rid, (prompt, tokens, _, _), n in zip((a, b, c, d), ref, (25, 5, 12, 30)):
    assert got[rid] == tokens[:n].tolist()
    assert engine.completion(rid).tokens == got[rid]
  assert engine.pages_in_use() == 0  # every page released
  assert engine.compiles == compiles  # no step recompiled after warm-up


def test_stop_tokens_end_a_sequence_and_are_included(engines):
  engine = engines["tiny"]
  prompt, tokens, _, _ = _reference("tiny")[1]
  stop = int(tokens[6])
  first = int(np.nonzero(tokens == stop)[0][0])
  (out,) = engine.generate([prompt], max_new_tokens=40, stop_tokens=[stop], return_logits=True)
  assert out.finish_reason == "stop"
  assert out.tokens == tokens[:first + 1].tolist()


def test_sampling_is_reproducible_per_key_and_respects_top_k(engines):
  engine = engines["tiny"]
  prompts = [p for p, *_ in _reference("tiny")][:3]
  key = jax.random.key(7)
  kw = dict(max_new_tokens=12, temperature=1.0, top_k=3, key=key, return_logits=True)
  one = engine.generate(prompts, **kw)
  again = engine.generate(prompts, **kw)
  assert [o.tokens for o in one] == [o.tokens for o in again]  # same key -> same samples
  alone = engine.generate(prompts[:1], **kw)  # request 0 has the same key alone or batched
  assert alone[0].tokens == one[0].tokens
  for o in one:  # every sampled token is among the 3 most likely
    top3 = np.argsort(o.logits, axis=1)[:, -3:]
    assert all(t in row for t, row in zip(o.tokens, top3))
  greedy = engine.generate(prompts, max_new_tokens=12, return_logits=True)
  assert [o.tokens for o in one] != [o.tokens for o in greedy]
  # top_p -> 0 keeps only the most likely token: greedy
  nucleus = engine.generate(prompts, max_new_tokens=12, temperature=1.0, top_p=1e-6, key=key,
                            return_logits=True)
  assert [o.tokens for o in nucleus] == [o.tokens for o in greedy]


def test_bad_requests_fail_before_any_work_and_leave_the_batch_alone(engines):
  engine = engines["tiny"]
  ref = _reference("tiny")
  rid = engine.submit(ref[0][0], max_new_tokens=10, return_logits=True)
  engine.step()
  steps = engine.counts["decode_steps"]
  cases = [
      (dict(prompt=[]), "empty"),
      (dict(prompt=[1] * 257), "max_position_embeddings=256"),
      (dict(prompt=[3, 256]), "outside the vocabulary"),
      (dict(prompt=[-1]), "0..255"),
      (dict(prompt=[3], max_new_tokens=0), "max_new_tokens"),
      (dict(prompt=[3], max_new_tokens=-2), "max_new_tokens"),
      (dict(prompt=[3], temperature=-1.0), "temperature"),
      (dict(prompt=[3], top_p=0.0), "top_p"),
      (dict(prompt=[3], top_k=-1), "top_k"),
      (dict(prompt=[3], temperature=0.8, top_k=257), r"top_k must be an integer in 0\.\.256"),
  ]
  for kw, match in cases:
    kw = dict(kw)
    prompt = kw.pop("prompt")
    with pytest.raises(ValueError, match=match):
      engine.submit(prompt, **kw)
  with pytest.raises(ValueError, match="prompt 1: "):
    engine.generate([ref[1][0], []], max_new_tokens=3)
  assert engine.counts["decode_steps"] == steps and engine.num_waiting == 0
  while engine.has_work():
    engine.step()
  assert engine.completion(rid).tokens == ref[0][1][:10].tolist()


def test_a_pool_too_small_for_one_sequence_is_refused_and_a_full_pool_waits():
  path = os.path.join(REF_ROOT, "tiny")
  with pytest.raises(ValueError, match=r"cache.num_pages=2 .* allowed: num_pages >= 3"):
    Engine.from_hf(path, num_pages=2, **FEW_BUCKETS).submit([5] * 20, max_new_tokens=20)


def test_text_prompts_need_a_byte_level_model(engines):
  engine = engines["tiny"]
  assert engine.encode("ab") == [97, 98] == engine.encode(b"ab")  # bytes: their values
  with pytest.raises(ValueError, match=r"1-D sequence of integer token ids, got list \(1-D "
                                       r"float64\)"):
    engine.encode([100.0, 101.0])
  engine.byte_level = False
  try:
    with pytest.raises(ValueError, match="byte-level"):
      engine.submit("ab")
  finally:
    engine.byte_level = True
