"""Topology sizes (Insights Table 3), costs, latency (Table 5) and the all-to-all simulation."""

import pytest

from dsv3_jax.analysis import hardware
from dsv3_jax.analysis.network import (all_to_all, dragonfly, end_to_end_latency, fat_tree_2,
                                       fat_tree_3, fit_prices, is_prime_power,
                                       multi_plane_fat_tree, slim_fly, table3_topologies)

# Insights Table 3 (64-port switches): endpoints, switches, links, cost M$, cost/endpoint k$.
TABLE3 = {
    "FT2": (2048, 96, 2048, 9, 4.39),
    "MPFT": (16384, 768, 16384, 72, 4.39),
    "FT3": (65536, 5120, 131072, 491, 7.5),
    "SF": (32928, 1568, 32928, 146, 4.4),
    "DF": (261632, 16352, 384272, 1522, 5.8),
}


def test_table3_counts_from_the_radix():
  topo = table3_topologies(64)
  for name, (e, s, l, _, _) in TABLE3.items():
    t = topo[name]
    assert (t.endpoints, t.switches, t.links) == (e, s, l), name


def test_formulas_at_other_radices():
  k = 32
  assert (fat_tree_2(k).endpoints, fat_tree_2(k).switches) == (k * k // 2, 3 * k // 2)
  assert (fat_tree_3(k).endpoints, fat_tree_3(k).switches) == (k ** 3 // 4, 5 * k * k // 4)
  assert multi_plane_fat_tree(k, planes=4).endpoints == 4 * fat_tree_2(k).endpoints
  # MPFT on 128-port RoCE switches.
  assert multi_plane_fat_tree(hardware.ROCE_SWITCH_RADIX).endpoints == 8 * 128 * 128 // 2


def test_slim_fly():
  sf = slim_fly(64)
  p = dict(sf.parameters)
  assert (p["q"], p["network_radix"], p["p"]) == (28, 42, 21)
  assert not p["prime_power"]  # Table 3's Slim Fly has no MMS graph
  real = slim_fly(64, require_prime_power=True)
  assert dict(real.parameters)["q"] == 27
  assert (real.endpoints, real.switches, real.links) == (30618, 1458, 29889)
  assert is_prime_power(27) and is_prime_power(32) and not is_prime_power(28)
  with pytest.raises(ValueError, match="q"):
    slim_fly(64, q=30)  # q mod 4 == 2
  with pytest.raises(ValueError, match="radix"):
    slim_fly(64, q=41)  # needs 61 + 31 ports


def test_dragonfly_group_rules():
  df = dict(dragonfly(64, groups="max").parameters)
  assert (df["p"], df["a"], df["h"], df["g"]) == (16, 32, 16, 513)
  assert dragonfly(64, groups="max").endpoints == 16 * 32 * 513
  assert dict(dragonfly(64, groups="insights").parameters)["g"] == 511
  assert dragonfly(64, groups=100).switches == 3200
  with pytest.raises(ValueError, match="groups"):
    dragonfly(64, groups=600)


@pytest.mark.parametrize("bad", [63, 0, -4, 2, 64.0, "64"])
def test_radix_must_be_even(bad):
  with pytest.raises(ValueError, match="radix"):
    fat_tree_2(bad)


def test_costs():
  topo = table3_topologies(64)
  for s_price, l_price in ((1.0, 0.0), (0.0, 1.0), (80000.0, 500.0)):
    assert topo["MPFT"].cost_per_endpoint(s_price, l_price) == pytest.approx(
        topo["FT2"].cost_per_endpoint(s_price, l_price))  # the headline claim of Table 3
  assert topo["FT2"].cost(10.0, 1.0, endpoint_link_price=2.0) == 96 * 10 + 2048 + 2 * 2048
  names = list(TABLE3)
  s_price, l_price = fit_prices([topo[n] for n in names], [TABLE3[n][3] * 1e6 for n in names])
  assert s_price > 0 and l_price > 0
  for n in names:
    assert topo[n].cost_per_endpoint(s_price, l_price) / 1e3 == pytest.approx(TABLE3[n][4],
                                                                              rel=0.02)
  with pytest.raises(ValueError, match="switch_price"):
    topo["FT2"].cost(-1.0, 1.0)
  with pytest.raises(ValueError, match="same length"):
    fit_prices([topo["FT2"]], [1.0])


def test_latency_table5():
  assert end_to_end_latency("infiniband", 1) == 2.8e-6
  assert end_to_end_latency("infiniband", 3) == pytest.approx(3.7e-6)
  assert end_to_end_latency("roce", 3) == pytest.approx(5.6e-6)
  assert end_to_end_latency("roce", 5) == pytest.approx(7.6e-6)
  assert end_to_end_latency("nvlink", 1) == 3.33e-6
  with pytest.raises(ValueError, match="switches_traversed"):
    end_to_end_latency("roce", 2)
  with pytest.raises(ValueError, match="fabric"):
    end_to_end_latency("ethernet", 1)


def test_all_to_all_hand_computed():
  b = 1e6
  r = all_to_all("multi_rail", 2, b, nic_bandwidth=40e9, nvlink_bandwidth=160e9)
  # Each NIC sends 8 flows of b bytes to the other node; one switch hop (same leaf, same rail)
  # or three (cross rail, via the spine).
  assert r.bottleneck == "nic_up"
  assert r.time_s == pytest.approx(8 * b / 40e9 + end_to_end_latency("infiniband", 3))
  assert r.gpus == 16 and r.forwarded_bytes == 0


def test_multi_plane_matches_multi_rail_and_forwards_cross_plane_traffic():
  nodes, g, b = 4, 8, 2e6
  mr = all_to_all("multi_rail", nodes, b)
  mp = all_to_all("multi_plane", nodes, b)
  assert mp.forwarded_bytes == nodes * g * (nodes - 1) * (g - 1) * b
  assert mp.time_s == pytest.approx(mr.time_s, rel=0.01)
  assert mp.time_s > mr.time_s  # the extra NVLink hop's latency
  # With too little NVLink bandwidth the relay becomes the bottleneck.
  slow = all_to_all("multi_plane", nodes, b, nvlink_bandwidth=10e9)
  assert slow.bottleneck.startswith("nvlink") and slow.time_s > 1.5 * mr.time_s


def test_all_to_all_invalid():
  with pytest.raises(ValueError, match="fabric"):
    all_to_all("torus", 2, 1e6)
  with pytest.raises(ValueError, match="num_nodes"):
    all_to_all("multi_plane", 0, 1e6)
  with pytest.raises(ValueError, match="bytes_per_peer"):
    all_to_all("multi_plane", 2, -1.0)
  with pytest.raises(ValueError, match="num_nodes"):
    all_to_all("multi_plane", 3000, 1.0)
