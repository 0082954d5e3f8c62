"""Two micro-batch overlap (infer/overlap.py; Insights §2.3.1, V3 report §3.4): prefill and
decode with micro_batches=2 give the single-batch outputs on a 4 x 2 mesh for both dispatch
schedules, and the compiled programs put each micro-batch's dispatch / combine all-to-alls
around the other micro-batch's compute."""

import os

import numpy as np
import pytest

from dsv3_jax.convert.hf import load_hf
from dsv3_jax.infer import Engine, cache as cache_lib, for_mesh, overlap
from dsv3_jax.infer.steps import StepFunctions
from dsv3_jax.parallel.mesh import make_mesh

REF = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "hf_deepseek_v3", "tiny")
B_DEV, S, PAGE, PAGES = 2, 16, 8, 4  # 2 sequences per device: one per micro-batch
# Decode logits: XLA:CPU computes a one-row micro-batch's projections with another dot kernel
# than the two-row batch (a different float32 summation order); the observed difference is
# ~2e-6 absolute on logits of magnitude ~1, so 1e-5 relative to the largest logit.
RTOL = 1e-5


def _inputs():
  n = B_DEV * 8
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, 256, (n, S)).astype(np.int32)
  lens = rng.integers(3, S + 1, (n,)).astype(np.int32)
  lens[5] = 0  # an empty slot
  table = np.tile(np.arange(B_DEV)[:, None] * PAGES + np.arange(PAGES)[None], (8, 1))
  return tokens, lens, table.astype(np.int32)


@pytest.fixture(scope="module", params=["flat", "two_hop"])
def runs(request):
  """Per micro_batches: prefill and one decode step (outputs, pools) and their compiled HLO."""
  mesh = make_mesh(4, 2)  # 16 experts, 2 per device; n_group 4 = nodes
  config, model = load_hf(REF)
  model = for_mesh(model, mesh, config.replace(dispatch=request.param))
  spec = cache_lib.CacheSpec.for_model(config, pages_per_shard=B_DEV * PAGES, page_size=PAGE,
                                       num_shards=8)
  tokens, lens, table = _inputs()
  out = {}
  for mb in (1, 2):
    st = StepFunctions(model, spec, mesh, micro_batches=mb)
    pools = st.init_pools()
    pre = st.prefill.lower(st.state, pools, tokens, lens, table).compile()
    nxt, logits, pools = pre(st.state, pools, tokens, lens, table)
    cached = [np.asarray(p) for p in pools]
    args = (np.asarray(nxt)[:, None], lens, (lens > 0)[:, None], table)
    dec = st.decode.lower(st.state, pools, *args).compile()
    nxt2, logits2, pools = dec(st.state, pools, *args)
    out[mb] = dict(prefill=(np.asarray(nxt), np.asarray(logits), cached),
                   decode=(np.asarray(nxt2), np.asarray(logits2), [np.asarray(p) for p in pools]),
                   hlo=dict(prefill=pre.as_text(), decode=dec.as_text()))
  return request.param, out


def _rel(a, b):
  return np.abs(a - b).max() / np.abs(a).max()


def test_prefill_and_decode_equal_the_single_batch_path(runs):
  _, out = runs
  lens = _inputs()[1]
  for step in ("prefill", "decode"):
    (t1, l1, p1), (t2, l2, p2) = out[1][step], out[2][step]
    live = lens > 0
    np.testing.assert_array_equal(t1[live], t2[live], err_msg=step)
    assert _rel(l1[live], l2[live]) < RTOL, step
    for a, b in zip(p1, p2):  # the latent cache each path wrote
      assert _rel(a, b) < RTOL, step
  assert np.abs(out[1]["prefill"][1]).max() > 0.1  # real logits, not zeros


def test_compiled_schedule_interleaves_the_micro_batches(runs):
  """In schedule order: between micro-batch A's (mb0) dispatch all-to-all and its combine
  all-to-all sits B's attention; between B's dispatch and combine sit A's experts; both MoE
  layers (layers 1, 2 of the tiny model), prefill and decode."""
  schedule, out = runs
  hops = 2 if schedule == "two_hop" else 1
  for step, text in out[2]["hlo"].items():
    ops = overlap.stage_order(text)
    a2a = [o for o in ops if o.kind == "all-to-all"]
    # per layer and micro-batch: rows + expert-id payloads per hop (two_hop's first hop also
    # carries the gate values) out, and one all-to-all per hop back
    per_mb = (3 + 2 if hops == 2 else 2) + hops
    assert len(a2a) == 2 * 2 * per_mb, step
    assert all(o.stage.split(".")[1] in ("dispatch", "combine") for o in a2a), step
    spans = overlap.interleaving(ops)
    assert [s["mb"] for s in spans] == ["mb0", "mb1", "mb0", "mb1"], (step, spans)
    for s in spans:
      other = "mb1" if s["mb"] == "mb0" else "mb0"
      compute = {f"{other}.attention"} if s["mb"] == "mb0" else {f"{other}.experts"}
      assert compute <= set(s["between"]), (step, s)
  # the single-batch program has no two-batch stages
  assert not any(o.stage for o in overlap.stage_order(out[1]["hlo"]["prefill"]))


def test_engine_generation_with_two_micro_batches_matches_transformers():
  """Through the engine (multi-step decode loop), one sequence per device: the odd per-device
  batch is padded with an empty row."""
  mesh = make_mesh(4, 2)
  config, model = load_hf(REF)
  model = for_mesh(model, mesh, config.replace(dispatch="flat"))
  engine = Engine(model, mesh=mesh, max_batch=8, page_size=16, decode_steps=4,
                  batch_buckets=(1,), page_buckets=(8,), prompt_buckets=(32,), micro_batches=2)
  ref = np.load(os.path.join(REF, "generation.npz"))
  prompts = [ref[f"prompt_{i}"].tolist() for i in range(4)]
  outs = engine.generate(prompts, max_new_tokens=12)
  for i, o in enumerate(outs):
    assert o.tokens == ref[f"tokens_{i}"][:12].tolist(), i


def test_bad_micro_batches_are_refused_before_any_work():
  mesh = make_mesh(4, 2)
  _, model = load_hf(REF, mesh=mesh)
  for bad in (0, 3, True, "2"):
    with pytest.raises(ValueError, match=r"micro_batches=.*allowed: \(1, 2\)"):
      Engine(model, mesh=mesh, max_batch=8, micro_batches=bad)
  _, local = load_hf(REF)
  with pytest.raises(ValueError, match="micro_batches=2 needs a mesh"):
    Engine(local, micro_batches=2)
  spec = cache_lib.CacheSpec.for_model(local.config, pages_per_shard=4, page_size=8)
  with pytest.raises(ValueError, match="micro_batches=2 needs a mesh"):
    StepFunctions(local, spec, None, micro_batches=2)
  with pytest.raises(ValueError, match=r"stage_order: .*not a scheduled HLO module"):
    overlap.stage_order("HloModule m\n")
