"""DeepSeekMoE routing semantics, balance loss and the local dispatch path."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.moe import DeepSeekMoE, route, sequence_balance_loss
from dsv3_jax.model.experts import bind_experts
from dsv3_jax.parallel import dispatch
from moe_reference import moe_dense_reference

SMALL = ModelConfig(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, n_group=4,
                    topk_group=2, num_experts_per_tok=3, num_attention_heads=2,
                    qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, kv_lora_rank=8,
                    q_lora_rank=8, intermediate_size=16)


def test_dropped_groups_are_minus_infinity_not_zero():
  # Groups 0 and 1 win, but all their biased scores are negative: masking the other groups
  # to 0 (as transformers does) would pick experts from groups 2 and 3.
  scores = jnp.full((1, 8), 0.5)
  bias = jnp.array([-2.0, -2.1, -2.2, -2.3, -3.0, -3.0, -3.0, -3.0])
  idx, _ = route(scores, bias, SMALL)
  assert set(np.asarray(idx[0]).tolist()) == {0, 1, 2}


def test_groups_ranked_by_sum_of_top2_not_max():
  # group 0: (0.9, 0.1) max 0.9 sum 1.0; group 1: (0.8, 0.7) sum 1.5; group 2: (0.6, 0.6) 1.2
  s = jnp.array([[0.9, 0.1, 0.8, 0.7, 0.6, 0.6, 0.05, 0.05]])
  cfg = SMALL.replace(topk_group=1, num_experts_per_tok=2)
  idx, _ = route(s, jnp.zeros(8), cfg)
  assert set(np.asarray(idx[0]).tolist()) == {2, 3}


def test_bias_selects_but_never_weighs_and_scaling_applied_once():
  s = jnp.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])
  bias = jnp.array([0, 0, 0, 0, 0, 0, 1.0, 1.0])  # pushes experts 6, 7 (group 3) in
  idx, w = route(s, bias, SMALL)
  chosen = np.asarray(idx[0]).tolist()
  assert 6 in chosen and 7 in chosen
  raw = np.asarray(s[0])[chosen]
  np.testing.assert_allclose(np.asarray(w[0]), raw / raw.sum() * 2.5, rtol=1e-6)
  assert float(w.sum()) == pytest.approx(2.5)
  _, w2 = route(s, bias, SMALL.replace(norm_topk_prob=False))
  np.testing.assert_allclose(np.asarray(w2[0]), raw * 2.5, rtol=1e-6)


def test_balance_loss_uniform_is_one_and_hand_value():
  b, s, e, k = 2, 4, 8, 2
  scores = jnp.full((b, s, e), 0.3)
  idx = jnp.tile(jnp.array([[0, 1], [2, 3], [4, 5], [6, 7]]), (b, 1, 1))
  mask = jnp.ones((b, s), bool)
  assert float(sequence_balance_loss(scores, idx, mask, e)) == pytest.approx(1.0)
  # One sequence, 2 tokens both on experts (0, 1); scores put all mass (normalised) on 0.
  scores = jnp.zeros((1, 2, e)).at[:, :, 0].set(1.0)
  idx = jnp.array([[[0, 1], [0, 1]]])
  # f_0 = f_1 = 8 / (2 * 2) * 2 = 4; P_0 = 1, P_1 = 0  ->  4
  assert float(sequence_balance_loss(scores, idx, jnp.ones((1, 2), bool), e)) == pytest.approx(4)
  # Padding tokens do not count: add a padded token routed elsewhere.
  scores3 = jnp.concatenate([scores, jnp.full((1, 1, e), 1.0)], axis=1)
  idx3 = jnp.concatenate([idx, jnp.array([[[6, 7]]])], axis=1)
  m3 = jnp.array([[True, True, False]])
  assert float(sequence_balance_loss(scores3, idx3, m3, e)) == pytest.approx(4)


def _random_routing(t, e, k, seed):
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
  w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
  return jnp.asarray(idx), jnp.asarray(w)


def _weights(e, d, f, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (e, d, f)) * 0.3, jax.random.normal(ks[1], (e, d, f)) * 0.3,
          jax.random.normal(ks[2], (e, f, d)) * 0.3)


@pytest.mark.parametrize("schedule", ["flat", "two_hop"])
def test_local_schedules_match_dense_reference_values_and_grads(schedule):
  t, e, k, d, f = 24, 8, 3, 16, 8
  x = jax.random.normal(jax.random.PRNGKey(1), (t, d))
  idx, w = _random_routing(t, e, k, 0)
  wg, wu, wd = _weights(e, d, f)
  sched = dispatch.get_schedule(schedule)
  topo = dispatch.EPTopology()
  cap = sched.worst_case_capacity(t, e, k, topo, 2)
  valid = jnp.ones((t,), bool)

  def run(x, w, wg, wu, wd):
    return sched(x, idx, w, valid, bind_experts(wg, wu, wd), capacity=cap, topo=topo,
                 n_experts=e)[0]

  ref = lambda x, w, wg, wu, wd: moe_dense_reference(x, idx, w, wg, wu, wd)
  # Values and gradients from one compiled program each (eager dispatch compiles every op).
  loss = lambda fn: (lambda *a: (lambda y: (jnp.sum(jnp.sin(y)), y))(fn(*a)))
  grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3, 4), has_aux=True))
  g1, y1 = grad(run)(x, w, wg, wu, wd)
  g2, y2 = grad(ref)(x, w, wg, wu, wd)
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_one_device_is_dropless_for_any_load():
  t, e, d, f = 5, 4, 8, 4
  x = jax.random.normal(jax.random.PRNGKey(2), (t, d))
  idx = jnp.array([[0], [0], [1], [0], [0]], jnp.int32)  # expert 0 asked 4 times
  w = jnp.ones((t, 1))
  wg, wu, wd = _weights(e, d, f)
  valid = jnp.array([True, True, True, True, False])  # the last token is padding
  y, st = dispatch.FlatSchedule()(x, idx, w, valid, bind_experts(wg, wu, wd), capacity=(1,),
                                  topo=dispatch.EPTopology(), n_experts=e)
  ref = moe_dense_reference(x, idx, w, wg, wu, wd)
  np.testing.assert_allclose(y[:4], ref[:4], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(y[4]), 0.0)  # padding is never dispatched
  assert float(st.dropped) == 0.0
  np.testing.assert_array_equal(np.asarray(st.expert_counts), [3, 1, 0, 0])


@pytest.mark.parametrize("window", [1, 3, 128])
def test_grouped_swiglu_matches_per_row_ffn_any_window(window):
  from dsv3_jax.model.experts import grouped_swiglu
  e, d, f = 3, 8, 4
  sizes = np.array([5, 0, 7], np.int32)
  starts = np.array([0, 5, 5], np.int32)
  r = 14  # two trailing rows belong to no segment
  x = jax.random.normal(jax.random.PRNGKey(5), (r, d))
  wg, wu, wd = _weights(e, d, f, seed=3)
  eid = np.repeat(np.arange(e), sizes)
  valid = jnp.arange(r) < sizes.sum()

  def ffn(x, wg, wu, wd):
    y = grouped_swiglu(x, jnp.asarray(starts), jnp.asarray(sizes),
                       jnp.arange(e, dtype=jnp.int32), wg, wu, wd, window)
    return jnp.where(valid[:, None], y, 0.0)

  def ref(x, wg, wu, wd):
    g = jnp.asarray(np.concatenate([eid, [0, 0]]))
    h = jax.nn.silu(jnp.einsum("rd,rdf->rf", x, wg[g])) * jnp.einsum("rd,rdf->rf", x, wu[g])
    return jnp.where(valid[:, None], jnp.einsum("rf,rfd->rd", h, wd[g]), 0.0)

  # Values and gradients from one jitted program each (eager dispatch compiles every op).
  loss = lambda fn: (lambda *a: (lambda y: (jnp.sum(jnp.sin(y)), y))(fn(*a)))
  grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3), has_aux=True))
  (g1, y1), (g2, y2) = grad(ffn)(x, wg, wu, wd), grad(ref)(x, wg, wu, wd)
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_take_rows_gradient_equals_plain_gather():
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 3))
  dest = jnp.array([2, -1, 0, 2, 3, 1], jnp.int32)  # item i reads row dest[i]
  s = dispatch.assign_slots(jnp.array([0, 1, 0, 1], jnp.int32), 2, 3)
  index = jnp.where(s.src >= 0, s.src, -1)
  f1 = lambda x: jnp.sum(jnp.cos(dispatch.take_rows(x, index, s.slot[:, None])) * 1.7)
  f2 = lambda x: jnp.sum(jnp.cos(jnp.where((index >= 0)[:, None], x[jnp.maximum(index, 0)],
                                           0.0)) * 1.7)
  np.testing.assert_allclose(jax.grad(f1)(x), jax.grad(f2)(x), rtol=1e-6)
  del dest


def test_assign_slots_hand_example():
  s = dispatch.assign_slots(jnp.array([1, 0, 1, -1, 1, 0], jnp.int32), 2, 2)
  np.testing.assert_array_equal(np.asarray(s.slot), [2, 0, 3, -1, -1, 1])
  np.testing.assert_array_equal(np.asarray(s.src), [1, 5, 0, 2])
  np.testing.assert_array_equal(np.asarray(s.counts), [2, 3])


def test_moe_layer_adds_shared_expert_and_excludes_padding_from_counts():
  moe = DeepSeekMoE(SMALL, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 16))
  mask = jnp.array([[True] * 5, [True] * 3 + [False] * 2])
  y, st = moe(x, mask)
  assert float(jnp.sum(st.dispatch.expert_counts)) == 8 * 3  # 8 real tokens x top-3
  tokens = x.reshape(10, 16)
  routing = moe.gate(tokens)
  routed = moe_dense_reference(tokens, routing.topk_idx, routing.topk_weight,
                                        moe.experts.gate_proj[...], moe.experts.up_proj[...],
                                        moe.experts.down_proj[...])
  routed = routed * mask.reshape(10, 1)
  want = routed.reshape(2, 5, 16) + moe.shared_experts(x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "fp8"])
@pytest.mark.parametrize("window", [4, 128])
def test_grouped_kernels_reproduce_their_pinned_numbers(kind, window):
  # tests/data/grouped_swiglu_pinned.npz: the kernels' outputs and gradients before the float
  # and FP8 kernels shared one window loop (tests/data/make_grouped_swiglu_pinned.py). Bit-equal
  # on the CPU that wrote them (AVX-512); another ISA (AVX2 + FMA) rounds the float32 sums in
  # another order (seen: 7.5e-7 absolute), so the check allows a few float32 ulps.
  close = dict(rtol=4e-6, atol=1e-6)
  from dsv3_jax.model.experts import grouped_swiglu, grouped_swiglu_fp8
  from dsv3_jax.quant.fp8 import Fp8Recipe
  ref = np.load(os.path.join(os.path.dirname(__file__), "..", "data",
                             "grouped_swiglu_pinned.npz"))
  segs = (jnp.asarray(ref["starts"]), jnp.asarray(ref["sizes"]),
          jnp.arange(len(ref["sizes"]), dtype=jnp.int32))
  n = int(ref["sizes"].sum())
  if kind == "fp8":
    fn = lambda x, a, b, c: grouped_swiglu_fp8(x, *segs, a, b, c, window, Fp8Recipe())
    dt = jnp.float32
  else:
    dt = jnp.dtype(kind)
    fn = lambda x, a, b, c: grouped_swiglu(x.astype(dt), *segs, a, b, c, window)
  args = [jnp.asarray(ref[k]) for k in ("x", "wg", "wu", "wd")]
  y, vjp = jax.vjp(fn, *args)
  grads = vjp(jnp.asarray(ref["dy"]).astype(dt))
  np.testing.assert_allclose(np.asarray(y[:n].astype(jnp.float32)), ref[f"y_{window}_{kind}"],
                             **close)
  for name, g in zip(("dx", "dwg", "dwu", "dwd"), grads):
    want = ref[f"{name}_{window}_{kind}"]
    got = np.asarray(g.astype(jnp.float32))
    if name == "dx":
      got, want = got[:n], want[:n]
    np.testing.assert_allclose(got, want, err_msg=name, **close)
