"""Event-driven timelines: engine, dual micro-batch overlap, EP decode bound, pipeline schedules."""

import itertools

import pytest

from dsv3_jax.analysis import hardware
from dsv3_jax.analysis.timeline import (LayerCosts, Task, bubble_formula, ep_comm_time,
                                        ep_tpot_bound, memory_formula, moe_layer_costs,
                                        pipeline_tasks, simulate, simulate_decode,
                                        simulate_layers, simulate_pipeline)


# --------------------------------------------------------------------------- engine
def test_streams_are_fifo_and_respect_dependencies():
  tl = simulate([Task("a", "x", 2.0), Task("b", "y", 1.0, ("a",)), Task("c", "x", 1.0),
                 Task("d", "y", 0.5)])
  iv = tl.intervals
  assert (iv["a"].start, iv["a"].end) == (0.0, 2.0)
  assert (iv["c"].start, iv["c"].end) == (2.0, 3.0)
  assert (iv["b"].start, iv["b"].end) == (2.0, 3.0)  # waits for a
  assert iv["d"].start == 3.0  # queued behind b on stream y
  assert tl.makespan == 3.5
  assert tl.busy("y") == 1.5 and tl.idle("y") == 2.0
  assert tl.utilisation("x") == pytest.approx(3.0 / 3.5)


def test_engine_errors():
  with pytest.raises(ValueError, match="deadlock"):
    simulate([Task("a", "x", 1.0, ("b",)), Task("b", "x", 1.0)])
  with pytest.raises(ValueError, match="unknown task"):
    simulate([Task("a", "x", 1.0, ("zz",))])
  with pytest.raises(ValueError, match="duplicate"):
    simulate([Task("a", "x", 1.0), Task("a", "y", 1.0)])
  with pytest.raises(ValueError, match="duration"):
    simulate([Task("a", "x", -1.0)])
  with pytest.raises(ValueError, match="stream"):
    simulate([Task("a", "x", 1.0)]).busy("nope")


# --------------------------------------------------------------------------- overlap
def test_dual_micro_batch_overlap_hand_schedule():
  c = LayerCosts(attention=1.0, dispatch=2.0, moe=3.0, combine=4.0)
  seq = simulate_layers(c, 1, overlap=False)
  assert seq.layer_time == 2 * (1 + 2 + 3 + 4)
  ovl = simulate_layers(c, 1, overlap=True)
  # compute: A0 [0,1] A1 [1,2] M0 [3,6] M1 [6,9]; network: D0 [1,3] D1 [3,5] C0 [6,10] C1 [10,14]
  iv = ovl.timeline.intervals
  assert (iv["L0.mb0.moe"].start, iv["L0.mb1.moe"].start) == (3.0, 6.0)
  assert (iv["L0.mb0.combine"].start, iv["L0.mb1.combine"].end) == (6.0, 14.0)
  assert ovl.layer_time == 14.0
  # Next layer by hand: A0 [10,11] A1 [14,15] D0 [14,16] D1 [16,18] M0 [16,19] M1 [19,22]
  # C0 [19,23] C1 [23,27]: +13 per layer. The network needs only 2 x (2 + 4) = 12, but it idles
  # from 18 to 19 waiting for M0 — a stall no per-stream sum reveals.
  two = simulate_layers(c, 2, overlap=True)
  assert two.timeline.intervals["L1.mb1.combine"].end == 27.0
  assert simulate_layers(c, 6, overlap=True).steady_layer_time == pytest.approx(13.0)
  assert ovl.compute_utilisation == pytest.approx(8 / 14)


def test_v3_layer_on_h800_overlap_beats_sequential():
  c = moe_layer_costs("deepseek_v3_671b", hardware.H800)
  seq = simulate_layers(c, 4, overlap=False)
  ovl = simulate_layers(c, 4, overlap=True)
  assert ovl.steady_layer_time < seq.steady_layer_time
  assert ovl.steady_layer_time >= 2 * max(c.compute, c.communication) - 1e-12  # a lower bound
  assert ovl.compute_utilisation > seq.compute_utilisation
  # Hand: dispatch = 4096 tokens x 3.5 nodes x 7168 bytes / 40 GB/s.
  assert c.dispatch == pytest.approx(4096 * 3.5 * 7168 / 40e9)
  assert c.combine == pytest.approx(2 * c.dispatch)
  with pytest.raises(ValueError, match="MoE"):
    moe_layer_costs("llama3_1_405b")
  with pytest.raises(ValueError, match="compute_efficiency"):
    moe_layer_costs(compute_efficiency=0)


# --------------------------------------------------------------------------- EP decode bound
def test_ep_tpot_insights_numbers():
  d, c = ep_comm_time(32, 9, 7000, 1, 2, 50e9)
  assert (d + c) * 1e6 == pytest.approx(120.96)
  tpot = ep_tpot_bound(d + c, 61, 2)
  assert round(tpot * 1e3, 2) == 14.76
  assert int(1 / tpot) == 67
  # Event-driven decode with compute hidden gives the same TPOT.
  assert simulate_decode(d, c, num_layers=61).makespan == pytest.approx(tpot)
  d, c = ep_comm_time(32, 9, 7000, 1, 2, hardware.GB200_NVL72.scale_up_bandwidth)
  assert (d + c) * 1e6 == pytest.approx(6.72)
  tpot = ep_tpot_bound(d + c)
  assert round(tpot * 1e3, 2) == 0.82
  assert round(1 / tpot, -2) == 1200


def test_ep_tpot_with_real_hidden_size_and_compute():
  d, c = ep_comm_time(hidden_size=7168)
  assert d + c == pytest.approx(3 * 32 * 9 * 7168 / 50e9)
  hidden = simulate_decode(d, c, attention_s=d / 4, moe_s=d / 4, num_layers=61)
  # compute shorter than every communication phase hides, except the first attention.
  assert hidden.makespan == pytest.approx(ep_tpot_bound(d + c) + d / 4)
  exposed = simulate_decode(d, c, attention_s=2 * c, moe_s=2 * c, num_layers=61)
  assert exposed.makespan > 1.5 * ep_tpot_bound(d + c)
  with pytest.raises(ValueError, match="tokens"):
    ep_comm_time(tokens=0)
  with pytest.raises(ValueError, match="bandwidth"):
    ep_comm_time(bandwidth=0)
  with pytest.raises(ValueError, match="num_layers"):
    ep_tpot_bound(1e-4, num_layers=0)


# --------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("pp", [8, 16, 32])
@pytest.mark.parametrize("fb", [3.0, 2.5])
def test_table2_bubbles_and_memory(pp, fb):
  for method in ("1F1B", "ZB1P", "DualPipe"):
    r = simulate_pipeline(method, pp, 4 * pp, F=1.0, B=2.0, W=1.0, FB=fb)
    assert r.bubble == pytest.approx(bubble_formula(method, pp, 1.0, 2.0, 1.0, fb), abs=1e-9)
    assert (r.parameter_copies, r.peak_activations) == memory_formula(method, pp)
  # Table 2's closed forms by hand at F=1, B=2, W=1.
  assert bubble_formula("1F1B", pp, 1, 2, 1) == (pp - 1) * 3
  assert bubble_formula("ZB1P", pp, 1, 2, 1) == (pp - 1) * 1
  assert bubble_formula("DualPipe", pp, 1, 2, 1, fb) == (pp / 2 - 1) * (fb - 1)


def test_bubble_is_independent_of_micro_batches():
  for m in (16, 24, 40):
    assert simulate_pipeline("DualPipe", 8, m, 1, 2, 1, 3).bubble == pytest.approx(6.0)
    assert simulate_pipeline("ZB1P", 8, m, 1, 2, 1).bubble == pytest.approx(7.0)


def test_where_the_closed_forms_hold():
  """Sweep: ZB1P's formula holds iff W <= F and W <= B - W; DualPipe's iff B - W = F, W <= F."""
  pp = 8
  for F, B, W in itertools.product((0.5, 1.0, 1.5, 2.0), (1.0, 1.5, 2.0, 2.5, 3.0, 4.0),
                                   (0.25, 0.5, 1.0, 1.5, 2.0)):
    if W >= B:
      continue
    zb = simulate_pipeline("ZB1P", pp, 2 * pp, F, B, W)
    assert (abs(zb.bubble - zb.formula) < 1e-9) == (W <= F and W <= B - W), (F, B, W)
    for FB in sorted({max(F, B), max(F + B - W, max(F, B)), F + B}):
      dp = simulate_pipeline("DualPipe", pp, 2 * pp, F, B, W, FB)
      assert (abs(dp.bubble - dp.formula) < 1e-9) == (B - W == F and W <= F), (F, B, W, FB)
    one = simulate_pipeline("1F1B", pp, 2 * pp, F, B, W)
    assert one.bubble == pytest.approx(one.formula)


def test_dualpipe_schedule_structure():
  tasks, _ = pipeline_tasks("DualPipe", 4, 8)
  by_rank = {}
  for t in tasks:
    by_rank.setdefault(t.stream, []).append(t.kind)
  # rank 0: 2 x (H - 0 - 1) = 2 forwards of direction 0, then F0 F1, ...
  assert by_rank["rank0"][:4] == ["F", "F", "F", "F"]
  # every rank runs M forwards and M backwards (F&B counts one of each)
  for kinds in by_rank.values():
    assert kinds.count("F") + kinds.count("F&B") == 8
    assert kinds.count("B") + kinds.count("F&B") == 8
  assert by_rank["rank0"] == by_rank["rank3"]  # mirror-symmetric


def test_pipeline_invalid_inputs():
  with pytest.raises(ValueError, match="method"):
    simulate_pipeline("GPipe", 8)
  with pytest.raises(ValueError, match="pp"):
    simulate_pipeline("1F1B", 1)
  with pytest.raises(ValueError, match="even pp"):
    simulate_pipeline("DualPipe", 7, 28)
  with pytest.raises(ValueError, match="micro_batches"):
    simulate_pipeline("DualPipe", 8, 10)
  with pytest.raises(ValueError, match="W must"):
    simulate_pipeline("ZB1P", 4, 8, F=1, B=1, W=1)
  with pytest.raises(ValueError, match="FB"):
    bubble_formula("DualPipe", 8, 1, 2, 1)
