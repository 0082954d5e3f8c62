"""MTP speculative decoding (report §5.4.3): greedy speculative output equals plain greedy output
token for token (batched, different prompt lengths and max_new_tokens, page boundaries, stop
tokens, one device and a mesh), the MTP drafts equal the full-forward MTP predictions after
rollbacks, forced right drafts are accepted with exact counters, and bad settings fail early.

Compilations (the cost of this module): one full forward (the reference), the speculative
prefill and multi-step generate of one engine on one device (D = 2) and one on a 2 x 2 mesh
(D = 1); every test reuses them."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_weights import random_model

from dsv3_jax.infer import Engine, for_mesh
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.parallel.mesh import make_mesh

HF_TINY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "hf_deepseek_v3",
                       "tiny")
# page_size 4: every sequence crosses many page boundaries; one compilation per step kind
BUCKETS = dict(page_size=4, batch_buckets=(4,), page_buckets=(16,), prompt_buckets=(32,))
CONFIG = ModelConfig(
    vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
    num_nextn_predict_layers=2, max_position_embeddings=128)
PROMPT_LENS = (3, 17, 9, 30)
MAX_NEW = (20, 7, 26, 13)
REF_LEN = 64  # padded length of the full-forward reference (prompt + generated < 64)
MARGIN = 1e-4  # top-1 minus top-2 logit below which the two attention forms may disagree


@pytest.fixture(scope="module")
def model():
  return random_model(CONFIG, seed=0)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, n).tolist() for n in PROMPT_LENS]


def _run(engine, prompts, max_new, stop=()):
  ids = [engine.submit(p, max_new_tokens=m, stop_tokens=stop) for p, m in zip(prompts, max_new)]
  while engine.has_work():
    engine.step()
  return [engine.completion(i) for i in ids]


@pytest.fixture(scope="module")
def reference(model):
  """Full forward (materialised MLA, no cache) of a padded sequence with given MTP tokens."""
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, ids, mtp: nnx.merge(graphdef, st).forward(ids, mtp_tokens=mtp))

  def forward(seq, extra):
    """Greedy predictions at the last position of seq[:-1] (t_c = seq[-1] uncached): the main
    model's (of t_c) and MTP depth d's (Emb(t_{c+d-1}) from seq + extra), with their top-1
    minus top-2 margins: ([main, depth 1, ..], [margins])."""
    c, d_max = len(seq) - 1, CONFIG.mtp_depth
    ids = np.zeros((1, REF_LEN), np.int32)
    ids[0, :c] = seq[:c]
    mtp = np.zeros((1, REF_LEN + d_max), np.int32)
    mtp[0, :len(seq) + len(extra)] = list(seq) + list(extra)
    out = fwd(state, ids, mtp)
    rows = [np.asarray(lg[0, c - 1]) for lg in (out.logits,) + tuple(out.mtp_logits)]
    top = [np.sort(r)[-2:] for r in rows]
    return [int(r.argmax()) for r in rows], [float(t[1] - t[0]) for t in top]

  def drafts(seq, extra):
    """The MTP depths' greedy predictions and margins (see `forward`)."""
    tokens, margins = forward(seq, extra)
    return tokens[1:], margins[1:]

  drafts.forward = forward
  return drafts


@pytest.fixture(scope="module")
def plain(reference, prompts):
  """Plain greedy decoding: the argmax of the full forward after every prefix (no cache, no
  speculation); every step's margin exceeds MARGIN, far above the float rounding between this
  materialised attention and the engine's absorbed attention on the cache, so it is the greedy
  output of any exact decoder (it replaces a plain Engine: two compilations fewer). Also a stop
  token generated mid-way by one sequence and the outputs it truncates (stop included)."""
  want = []
  for p, m in zip(prompts, MAX_NEW):
    seq = list(p)
    for _ in range(m):
      (tok, *_), (margin, *_) = reference.forward(seq + [0], [0])
      assert margin > MARGIN, (len(want), len(seq) - len(p), margin)
      seq.append(tok)
    want.append(seq[len(p):])
  stop = want[2][11]
  want_stop = [w[:w.index(stop) + 1] if stop in w else w for w in want]
  assert want_stop[2] != want[2]  # the stop token ends sequence 2 early
  return want, stop, want_stop


@pytest.fixture(scope="module")
def spec2(model):
  """D = 2 on one device, two verify steps per jitted call."""
  return Engine(model, max_batch=4, speculative_depth=2, decode_steps=2, **BUCKETS)


@pytest.fixture(scope="module")
def mesh_spec1(model):
  """D = 1 on a 2 x 2 mesh: the same jitted steps per device inside shard_map, experts sharded
  (2 per device), the MTP block's MoE dispatched like the main stack's (two_hop), one sequence
  per device, three verify steps per call."""
  mesh = make_mesh(2, 2)
  m = for_mesh(model, mesh, CONFIG.replace(dispatch="two_hop"))
  return Engine(m, mesh=mesh, max_batch=4, speculative_depth=1, decode_steps=3,
                page_size=4, batch_buckets=(1,), page_buckets=(16,), prompt_buckets=(32,))


def _poison_stale_rows(engine, seq):
  """NaN into every cache row of `seq` that no later step may read before rewriting it: main
  pools from position `cached` on, MTP depth d from cached - d + 1 on (module docstring)."""
  ps = engine.spec.page_size
  pos = np.arange(len(seq.pages) * ps)
  page = engine.spec.pages_per_shard * seq.shard + np.asarray(seq.pages)[pos // ps]

  def poison(pool, first):  # (a mask of the whole pool: one compiled `where` for every call)
    stale = np.zeros(pool.shape[:2], bool)
    stale[page[pos >= first], pos[pos >= first] % ps] = True
    return jnp.where(stale[..., None], jnp.nan, pool)

  engine.pools = tuple(poison(pool, seq.cached) for pool in engine.pools)
  sp = engine.speculative
  sp.pools = tuple(poison(pool, seq.cached - d + 1) for d, pool in enumerate(sp.pools, 1))


def _counts(engine):
  return {k: engine.counts[k] for k in ("decode_tokens", "spec_forwards", "spec_drafted",
                                        "spec_accepted")}


@pytest.mark.parametrize("name", ["spec2", "mesh_spec1"])
def test_speculative_greedy_equals_plain_greedy(request, prompts, plain, name):
  """Four sequences of 3..30 prompt tokens and 7..26 new tokens decoded together, pages of 4
  tokens; then again with a stop token. D = 2 on one device, D = 1 on the 2 x 2 mesh."""
  want, stop, want_stop = plain
  engine = request.getfixturevalue(name)
  depth = engine.speculative.depth
  before = _counts(engine)
  outs = _run(engine, prompts, MAX_NEW)
  assert [o.tokens for o in outs] == want
  if engine.mesh is not None:  # MTP pools sharded like the main ones, one sequence per device
    assert engine.speculative.pools[0].sharding.spec[0] == ("node", "gpu")
    assert len({engine._done[o.request_id].shard for o in outs}) == 4
  assert [o.finish_reason for o in outs] == ["length"] * 4
  c = {k: v - before[k] for k, v in _counts(engine).items()}
  assert c["decode_tokens"] == sum(MAX_NEW) - 4  # the first token of each comes from prefill
  # every verify forward yields 1 + its accepted drafts (no stop token here)
  assert c["decode_tokens"] == c["spec_forwards"] + c["spec_accepted"]
  assert 0 <= c["spec_accepted"] <= c["spec_drafted"] <= depth * c["spec_forwards"]
  # near max_new_tokens fewer drafts are verified: exactly min(D, left - 1) per forward
  assert c["spec_drafted"] < depth * c["spec_forwards"]
  outs = _run(engine, prompts, MAX_NEW, [stop])
  assert [o.tokens for o in outs] == want_stop
  assert outs[2].finish_reason == "stop" and outs[2].tokens[-1] == stop
  assert engine.pages_in_use() == 0 and engine.speculative._state == {}
  assert engine.compiles == {"spec_prefill": 1, "spec_generate": 1}


def test_forced_drafts_are_accepted_and_mtp_drafts_match_the_full_forward(plain, prompts, spec2,
                                                                          reference):
  """Drafts set to the right tokens (both, the first only, none) are accepted exactly as far as
  they are right; the output stays the plain greedy one; and after every call (accepted and
  rejected drafts rolled back in the main and the MTP caches) the MTP drafts equal the full
  forward's MTP predictions; NaN written into the rolled-back rows never reaches an output."""
  engine = spec2
  prompt, ref, max_new = prompts[0], plain[0][0], MAX_NEW[0]

  def accepted(g, drafts):
    """Drafts the verifier accepts after g generated tokens: the leading right ones, at most
    left - 1 of them."""
    a = 0
    while a < min(len(drafts), max_new - g - 1) and drafts[a] == ref[g + a]:
      a += 1
    return a

  def mtp_drafts(g):
    """The MTP drafts after g generated tokens per the full forward (depth 2 takes Emb of the
    depth-1 draft, as the engine does), with their top-1 minus top-2 margins."""
    seq = prompt + ref[:g]
    (e1, _), (m1, _) = reference(seq, [0])
    (_, e2), (_, m2) = reference(seq, [e1])
    return [e1, e2], [m1, m2]

  rid = engine.submit(prompt, max_new_tokens=max_new)
  rng = np.random.default_rng(1)
  checked, calls, forced, expect = 0, 0, 0, None
  while engine.has_work():
    before = _counts(engine)
    engine.step()
    calls += 1
    s = engine._running.get(rid) or engine._done[rid]
    assert s.generated == ref[:len(s.generated)]
    c = {k: v - before[k] for k, v in _counts(engine).items()}
    assert c["decode_tokens"] == c["spec_forwards"] + c["spec_accepted"]
    if expect is not None:  # the forced first step of this call, then the MTP's own drafts
      assert c["spec_accepted"] == expect, calls
    if s.finish_reason is not None:
      break
    _poison_stale_rows(engine, s)  # rolled-back entries are never read (the output stays exact)
    g = len(s.generated)
    exp, margin = mtp_drafts(g)
    got = engine.speculative.drafts_of(rid)
    for d in range(2):
      if margin[d] > 1e-4:  # (a near-tie may flip between the two attention forms)
        assert got[d] == exp[d], (calls, d)
        checked += 1
    mode = calls % 3  # 0: both right, 1: the first right, 2: none right
    right = (ref + [0, 0])[g:g + 2]
    drafts = [right[0] if mode < 2 else (right[0] + 1) % 256,
              right[1] if mode == 0 else int(right[1] + 1 + rng.integers(254)) % 256]
    engine.speculative.set_drafts(rid, drafts)
    a1 = accepted(g, drafts)
    forced += a1
    g1 = g + a1 + 1  # the call's second verify step starts here, with the MTP's drafts
    expect = a1 + (accepted(g1, mtp_drafts(g1)[0]) if g1 < max_new else 0)
  assert engine.completion(rid).tokens == ref
  assert checked >= 8 and forced >= 6
  assert calls < max_new - 5  # forced steps yield up to 3 tokens per forward


def test_a_stop_token_among_accepted_drafts_ends_the_sequence_there(plain, prompts, spec2):
  """Right drafts forced on every call; a stop token that arrives as an accepted draft ends
  the sequence there (the verifier accepted the drafts after it, they are not emitted)."""
  engine = spec2
  ref = plain[0][2]

  def run(stop):
    rid = engine.submit(prompts[2], max_new_tokens=MAX_NEW[2], stop_tokens=stop)
    bounds = []  # tokens generated before each call's first (forced) verify step
    while engine.has_work():
      s = engine._running.get(rid)  # (None until the first step admits it)
      if s is not None:
        g = len(s.generated)
        bounds.append(g)
        engine.speculative.set_drafts(rid, (ref + [0, 0])[g:g + 2])
      engine.step()
    return engine.completion(rid), bounds

  out, bounds = run(())
  assert out.tokens == ref
  # a token first generated as the second draft of a forced step: d_2 = ref[g + 1]
  cands = [g + 1 for g in bounds if g + 2 < len(ref) and ref[g + 1] not in ref[:g + 1]]
  assert cands, (ref, bounds)
  i = cands[0]
  before = engine.counts["spec_accepted"]
  out, _ = run([ref[i]])
  assert out.tokens == ref[:i + 1] and out.finish_reason == "stop"
  assert engine.counts["spec_accepted"] - before >= 2 * bounds.index(i - 1) + 2


def test_bad_speculative_settings_fail_before_any_work(model, spec2):
  for bad in (3, -1, True, 1.5, "1"):
    with pytest.raises(ValueError, match=r"speculative_depth=.*allowed: 0\.\.2"):
      Engine(model, speculative_depth=bad, **BUCKETS)
  with pytest.raises(ValueError, match=r"speculative_depth=1; allowed: 0 \(the checkpoint has 0"):
    Engine.from_hf(HF_TINY, speculative_depth=1)
  steps = spec2.counts["decode_steps"]
  with pytest.raises(ValueError, match="greedy only; allowed: temperature=0"):
    spec2.submit([1, 2, 3], temperature=0.7)
  with pytest.raises(ValueError, match="prompt 0: .*greedy only"):
    spec2.generate([[1, 2, 3]], temperature=1.0)
  assert spec2.num_waiting == 0 and spec2.counts["decode_steps"] == steps
  rid = spec2.submit([1, 2, 3], max_new_tokens=5)
  spec2.step()
  with pytest.raises(ValueError, match=r"drafts must be 2 token ids in 0\.\.255"):
    spec2.speculative.set_drafts(rid, [1, 256])
  with pytest.raises(ValueError, match="drafts must be 2"):
    spec2.speculative.set_drafts(rid, [1])
  while spec2.has_work():
    spec2.step()
