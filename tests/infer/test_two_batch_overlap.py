"""Two micro-batch overlap (infer/overlap.py; Insights §2.3.1, V3 report §3.4): prefill and
decode with micro_batches=2 give the single-batch outputs on a 4 x 2 mesh, the compiled programs
put each micro-batch's dispatch / combine all-to-alls around the other micro-batch's compute,
and the engine with two micro-batches matches transformers.

Compilations (the cost of this module, ~9 s of CPU per two micro-batch program): the
single-batch prefill and decode (`generate`, the engine's multi-step decode) of the flat
schedule, the reference; one engine's two micro-batch prefill and decode with the flat schedule,
compiled ahead of time for the HLO checks and then reused by the engine's own calls; and the two
micro-batch decode with the two_hop schedule. The schedule only changes the MoE dispatch /
combine, the same code in prefill and decode (`overlap._micro_batch`), so two_hop is checked on
decode, from the single-batch prefill's cache like the flat decode."""

import os

import jax
import numpy as np
import pytest

from dsv3_jax.convert.hf import load_hf
from dsv3_jax.infer import Engine, for_mesh, overlap
from dsv3_jax.infer import cache as cache_lib
from dsv3_jax.infer.steps import StepFunctions
from dsv3_jax.parallel.mesh import make_mesh

REF = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "hf_deepseek_v3", "tiny")
# 3 sequences per device: micro-batch A = rows 0-1, B = row 2 and one padding row (odd batch);
# prompts of up to S tokens, K decode steps per call, PAGES pages of PAGE tokens per sequence
B_DEV, S, PAGE, PAGES, K = 3, 32, 8, 8, 4
ENGINE = dict(max_batch=8 * B_DEV, page_size=PAGE, num_pages=B_DEV * PAGES, decode_steps=K,
              batch_buckets=(B_DEV,), page_buckets=(PAGES,), prompt_buckets=(S,))
# Logits and cache: XLA:CPU computes a micro-batch's projections with another dot kernel than
# the whole batch's (a different float32 summation order), and two_hop sums in another order
# than flat; the observed differences are <= 1.5e-6 absolute on logits of magnitude ~4 (<= 3.5e-7
# relative to the largest value, both schedules, prefill and decode), so 1e-5 relative.
RTOL = 1e-5


def _inputs():
  n = B_DEV * 8
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, 256, (n, S)).astype(np.int32)
  lens = rng.integers(3, S + 1, (n,)).astype(np.int32)
  lens[5] = 0  # an empty slot
  table = np.tile(np.arange(B_DEV)[:, None] * PAGES + np.arange(PAGES)[None], (8, 1))
  return tokens, lens, table.astype(np.int32)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(4, 2)  # 16 experts, 2 per device; n_group 4 = nodes


@pytest.fixture(scope="module")
def hf():
  return load_hf(REF)


def _placed(hf, mesh, schedule):
  config, model = hf
  return for_mesh(model, mesh, config.replace(dispatch=schedule))


def _prefill(st: StepFunctions):
  """Prefill of `_inputs()` with the argument types the engine passes (so the engine reuses
  the compilation): ((first tokens [n], logits [n, V], pools), compiled HLO text)."""
  tokens, lens, table = _inputs()
  pools = st.init_pools()
  args = (tokens, lens, table[:, :st.spec.pages_for(S)])
  text = st.prefill.lower(st.state, pools, *args).compile().as_text()
  nxt, logits, pools = st.prefill(st.state, pools, *args)
  return (np.asarray(nxt), np.asarray(logits), [np.asarray(p) for p in pools]), text


def _generate(st: StepFunctions, first, cached):
  """K greedy decode steps in one `generate` call from a prefill's first tokens and cache, with
  the argument types the engine passes: ((tokens [n, K], logits [n, K, V], pools), HLO text)."""
  _, lens, table = _inputs()
  n = len(lens)
  pools = tuple(jax.device_put(p, st.pool_sharding) for p in cached)
  args = (first, lens, np.where(lens > 0, K, 0).astype(np.int32),
          np.full((n, 1), -1, np.int32), table, np.zeros(n, np.float32), np.zeros(n, np.int32),
          np.ones(n, np.float32), np.zeros((n, 2), np.uint32))
  text = st._generate.lower(st.state, pools, *args, K, False, True).compile().as_text()  # static
  out, logits, pools = st.generate(st.state, pools, *args, n_steps=K, sampled=False,
                                   want_logits=True)
  return (np.asarray(out), np.asarray(logits), [np.asarray(p) for p in pools]), text


def _outputs(**steps):
  """{step: (tokens, logits, pools)} and their HLO texts under "hlo"."""
  return {**{k: v[0] for k, v in steps.items()}, "hlo": {k: v[1] for k, v in steps.items()}}


@pytest.fixture(scope="module")
def single(hf, mesh):
  """The single-batch path, flat schedule: the reference (two_hop's single-batch outputs equal
  flat's within float rounding, <= 3.3e-7 relative)."""
  spec = cache_lib.CacheSpec.for_model(hf[0], pages_per_shard=B_DEV * PAGES, page_size=PAGE,
                                       num_shards=8)
  st = StepFunctions(_placed(hf, mesh, "flat"), spec, mesh, micro_batches=1)
  pre = _prefill(st)
  return _outputs(prefill=pre, decode=_generate(st, pre[0][0], pre[0][2]))


@pytest.fixture(scope="module")
def flat(hf, mesh, single):
  """An engine with micro_batches=2 (flat) and its steps' prefill and decode outputs."""
  engine = Engine(_placed(hf, mesh, "flat"), mesh=mesh, micro_batches=2, **ENGINE)
  first, _, cached = single["prefill"]
  return engine, _outputs(prefill=_prefill(engine.steps),
                          decode=_generate(engine.steps, first, cached))


@pytest.fixture(scope="module")
def two_hop(hf, mesh, single):
  """The two micro-batch decode with the two_hop schedule."""
  spec = cache_lib.CacheSpec.for_model(hf[0], pages_per_shard=B_DEV * PAGES, page_size=PAGE,
                                       num_shards=8)
  st = StepFunctions(_placed(hf, mesh, "two_hop"), spec, mesh, micro_batches=2)
  first, _, cached = single["prefill"]
  return None, _outputs(decode=_generate(st, first, cached))


def _rel(a, b):
  return np.abs(a - b).max() / np.abs(a).max()


@pytest.mark.parametrize("schedule", ["flat", "two_hop"])
def test_prefill_and_decode_equal_the_single_batch_path(request, single, schedule):
  _, two = request.getfixturevalue(schedule)
  live = _inputs()[1] > 0
  assert list(two["hlo"]) == (["prefill", "decode"] if schedule == "flat" else ["decode"])
  for step in two["hlo"]:
    (t1, l1, p1), (t2, l2, p2) = single[step], two[step]
    np.testing.assert_array_equal(t1[live], t2[live], err_msg=step)
    assert _rel(l1[live], l2[live]) < RTOL, step
    for a, b in zip(p1, p2):  # the latent cache each path wrote
      assert _rel(a, b) < RTOL, step
  out = two["decode"][0]
  assert (out[live] >= 0).all() and (out[~live] == -1).all()  # K steps for live rows only
  assert np.abs(single["prefill"][1]).max() > 0.1  # real logits, not zeros


@pytest.mark.parametrize("schedule", ["flat", "two_hop"])
def test_compiled_schedule_interleaves_the_micro_batches(request, single, schedule):
  """In schedule order: between micro-batch A's (mb0) dispatch all-to-all and its combine
  all-to-all sits B's attention; between B's dispatch and combine sit A's experts; both MoE
  layers (layers 1, 2 of the tiny model), prefill (flat) and decode (the decode loop's body)."""
  _, two = request.getfixturevalue(schedule)
  hops = 2 if schedule == "two_hop" else 1
  for step, text in two["hlo"].items():
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
  # the single-batch programs have no two-batch stages
  for text in single["hlo"].values():
    assert not any(o.stage for o in overlap.stage_order(text))


def test_engine_generation_with_two_micro_batches_matches_transformers(flat):
  """Through the engine (multi-step decode loop), one sequence on each of 4 devices: the odd
  per-device batch (3 rows) is padded with an empty row; no new compilation."""
  engine, _ = flat
  ref = np.load(os.path.join(REF, "generation.npz"))
  prompts = [ref[f"prompt_{i}"].tolist() for i in range(4)]
  outs = engine.generate(prompts, max_new_tokens=12, return_logits=True)
  for i, o in enumerate(outs):
    assert o.tokens == ref[f"tokens_{i}"][:12].tolist(), i
  assert len({engine._done[o.request_id].shard for o in outs}) == 4
  assert engine.compiles == {"prefill": 1, "generate": 1}  # the programs checked above


def test_bad_micro_batches_are_refused_before_any_work(hf, mesh):
  _, local = hf
  for bad in (0, 3, True, "2"):
    with pytest.raises(ValueError, match=r"micro_batches=.*allowed: \(1, 2\)"):
      Engine(local, mesh=mesh, max_batch=8, micro_batches=bad)
  with pytest.raises(ValueError, match="micro_batches=2 needs a mesh"):
    Engine(local, micro_batches=2)
  spec = cache_lib.CacheSpec.for_model(local.config, pages_per_shard=4, page_size=8)
  with pytest.raises(ValueError, match="micro_batches=2 needs a mesh"):
    StepFunctions(local, spec, None, micro_batches=2)
  with pytest.raises(ValueError, match=r"stage_order: .*not a scheduled HLO module"):
    overlap.stage_order("HloModule m\n")
