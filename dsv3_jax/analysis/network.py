"""Network cost models: topology sizes and costs from the switch radix, an all-to-all simulation
on multi-rail vs multi-plane fat-trees, and the latency table (Insights §5, Tables 3 and 5).

Topologies built from k-port switches (k = radix, even):
  FT2  two-layer fat-tree (leaf-spine): k leaves with k/2 endpoints each and k/2 spines;
       k^2/2 endpoints, 3k/2 switches, k^2/2 switch-to-switch links.
  MPFT multi-plane fat-tree (Insights §5.1, Fig. 3): `planes` independent FT2s, one per NIC
       (GPU) of a node: planes * k^2/2 endpoints for the cost per endpoint of FT2.
  FT3  three-layer fat-tree (k-ary fat-tree, Al-Fares et al. 2008): k^3/4 endpoints, 5k^2/4
       switches, k^3/2 switch-to-switch links.
  SF   Slim Fly (Besta & Hoefler, SC'14), the McKay-Miller-Siran graph on 2q^2 routers with
       q = 4w + delta (delta in {-1, 0, 1}), network radix k' = (3q - delta)/2 and
       p = ceil(k'/2) endpoints per router; the largest q with k' + p <= k.
  DF   Dragonfly (Kim et al., ISCA'08), balanced: a = 2p = 2h routers per group, p + h + a - 1 <= k.
"Links" counts switch-to-switch cables, as Insights Table 3 does (endpoint cables are one per
endpoint in every topology and can be priced separately).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from dsv3_jax.analysis import hardware

FABRICS = ("multi_rail", "multi_plane")


def _check_radix(radix: Any) -> int:
  if not isinstance(radix, int) or isinstance(radix, bool) or radix < 4 or radix % 2:
    raise ValueError(f"radix must be an even integer >= 4 (switch ports), got {radix!r}")
  return radix


def _check_price(name: str, value: Any) -> float:
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
    raise ValueError(f"{name} must be a price >= 0 (dollars), got {value!r}")
  return float(value)


@dataclasses.dataclass(frozen=True)
class Topology:
  """Size of a network built from switches of one radix.

  Attributes:
    name: "FT2", "MPFT", "FT3", "SF" or "DF".
    radix: switch ports k.
    endpoints: hosts (GPUs / NIC ports) attached.
    switches: switches.
    links: switch-to-switch links (cables).
    parameters: the construction's parameters (q, p, a, h, g, planes...).
  """

  name: str
  radix: int
  endpoints: int
  switches: int
  links: int
  parameters: Tuple[Tuple[str, Any], ...] = ()

  def cost(self, switch_price: float, link_price: float,
           endpoint_link_price: float = 0.0) -> float:
    """Network cost in dollars: switches, switch-to-switch links and (optionally) endpoint links.

    Args:
      switch_price: dollars per switch.
      link_price: dollars per switch-to-switch link (cable + transceivers).
      endpoint_link_price: dollars per endpoint-to-switch link (0: not counted, as in Table 3).

    Raises:
      ValueError: for a negative price.
    """
    s = _check_price("switch_price", switch_price)
    link = _check_price("link_price", link_price)
    e = _check_price("endpoint_link_price", endpoint_link_price)
    return s * self.switches + link * self.links + e * self.endpoints

  def cost_per_endpoint(self, switch_price: float, link_price: float,
                        endpoint_link_price: float = 0.0) -> float:
    """`cost(...) / endpoints`, dollars per endpoint (Insights Table 3, last row)."""
    return self.cost(switch_price, link_price, endpoint_link_price) / self.endpoints


def fat_tree_2(radix: int) -> Topology:
  """Two-layer fat-tree of `radix`-port switches (Insights Table 3 "FT2").

  Raises:
    ValueError: if `radix` is not an even integer >= 4.
  """
  k = _check_radix(radix)
  return Topology("FT2", k, endpoints=k * k // 2, switches=k + k // 2, links=k * (k // 2),
                  parameters=(("leaves", k), ("spines", k // 2)))


def multi_plane_fat_tree(radix: int, planes: int = 8) -> Topology:
  """Multi-plane two-layer fat-tree: `planes` disjoint FT2s (Insights §5.1, Table 3 "MPFT").

  Each GPU-NIC pair of an 8-GPU node sits in its own plane; cross-plane traffic is forwarded
  inside the node (NVLink). 8 planes of radix-64 FT2 reach 16,384 GPUs.

  Raises:
    ValueError: if `radix` is invalid or `planes` is not a positive integer.
  """
  if not isinstance(planes, int) or isinstance(planes, bool) or planes <= 0:
    raise ValueError(f"planes must be a positive integer, got {planes!r}")
  ft2 = fat_tree_2(radix)
  return Topology("MPFT", ft2.radix, endpoints=planes * ft2.endpoints,
                  switches=planes * ft2.switches, links=planes * ft2.links,
                  parameters=(("planes", planes),) + ft2.parameters)


def fat_tree_3(radix: int) -> Topology:
  """Three-layer k-ary fat-tree: k pods of k/2 edge + k/2 aggregation switches, (k/2)^2 cores.

  Raises:
    ValueError: if `radix` is not an even integer >= 4.
  """
  k = _check_radix(radix)
  return Topology("FT3", k, endpoints=k ** 3 // 4, switches=5 * k * k // 4, links=k ** 3 // 2,
                  parameters=(("pods", k), ("core", k * k // 4)))


def is_prime_power(n: int) -> bool:
  """Whether n = p^m for a prime p and m >= 1."""
  if n < 2:
    return False
  for p in range(2, int(math.isqrt(n)) + 1):
    if n % p == 0:
      while n % p == 0:
        n //= p
      return n == 1
  return True


def _slim_fly_delta(q: int) -> Optional[int]:
  return {0: 0, 1: 1, 3: -1}.get(q % 4)


def slim_fly(radix: int, q: Optional[int] = None, require_prime_power: bool = False) -> Topology:
  """Slim Fly (MMS graph) of `radix`-port routers (Insights Table 3 "SF").

  Args:
    radix: router ports k (even, >= 4).
    q: the MMS parameter; None picks the largest q (q mod 4 != 2) with k' + p <= radix.
    require_prime_power: restrict q to prime powers, for which MMS graphs exist. Insights Table 3
      (32,928 endpoints at k = 64) corresponds to q = 28, which is not a prime power; the largest
      constructible Slim Fly at k = 64 has q = 27 (30,618 endpoints).

  Returns:
    `Topology` with 2q^2 routers, p * 2q^2 endpoints, q^2 * k' router-to-router links.

  Raises:
    ValueError: for an invalid radix, a q with q mod 4 == 2 or q < 3, a q that does not fit the
      radix, or a non-prime-power q when `require_prime_power`.
  """
  k = _check_radix(radix)

  def build(qq: int) -> Tuple[int, int]:
    delta = _slim_fly_delta(qq)
    kk = (3 * qq - delta) // 2
    return kk, -(-kk // 2)

  if q is None:
    best = None
    for qq in range(3, k + 1):
      if _slim_fly_delta(qq) is None or (require_prime_power and not is_prime_power(qq)):
        continue
      kk, p = build(qq)
      if kk + p <= k:
        best = qq
    if best is None:
      raise ValueError(f"radix={k} is too small for a Slim Fly")
    q = best
  if not isinstance(q, int) or q < 3 or _slim_fly_delta(q) is None:
    raise ValueError(f"q must be an integer >= 3 with q mod 4 in (0, 1, 3), got {q!r}")
  if require_prime_power and not is_prime_power(q):
    raise ValueError(f"q={q} is not a prime power (no MMS graph exists); allowed: prime powers")
  kk, p = build(q)
  if kk + p > k:
    raise ValueError(f"q={q} needs {kk} network + {p} endpoint ports > radix={k}")
  routers = 2 * q * q
  return Topology("SF", k, endpoints=p * routers, switches=routers, links=routers * kk // 2,
                  parameters=(("q", q), ("delta", _slim_fly_delta(q)), ("network_radix", kk),
                              ("p", p), ("prime_power", is_prime_power(q))))


DRAGONFLY_GROUP_RULES = ("max", "insights")


def dragonfly(radix: int, groups: Union[str, int] = "max") -> Topology:
  """Balanced Dragonfly (a = 2p = 2h) of `radix`-port routers (Insights Table 3 "DF").

  Args:
    radix: router ports k (even, >= 4); p = h = floor((k + 1) / 4), a = 2p.
    groups: "max": g = a*h + 1, one global link between every pair of groups (Kim et al. 2008);
      "insights": g = a*h - 1, the group count that reproduces Insights Table 3 (511 groups at
      k = 64; the paper does not state its rule); or an explicit integer 2 <= g <= a*h + 1.

  Returns:
    `Topology` with a*g routers, p*a*g endpoints, g*a(a-1)/2 local + g*a*h/2 global links (every
    global port cabled).

  Raises:
    ValueError: for an invalid radix or group count.
  """
  k = _check_radix(radix)
  p = (k + 1) // 4
  a, h = 2 * p, p
  if groups == "max":
    g = a * h + 1
  elif groups == "insights":
    g = a * h - 1
  elif isinstance(groups, int) and not isinstance(groups, bool) and 2 <= groups <= a * h + 1:
    g = groups
  else:
    raise ValueError(f"groups={groups!r}; allowed: {DRAGONFLY_GROUP_RULES} or an integer in "
                     f"2..{a * h + 1}")
  local = g * a * (a - 1) // 2
  global_links = g * a * h // 2
  return Topology("DF", k, endpoints=p * a * g, switches=a * g, links=local + global_links,
                  parameters=(("p", p), ("a", a), ("h", h), ("g", g), ("local_links", local),
                              ("global_links", global_links)))


def table3_topologies(radix: int = hardware.IB_SWITCH_RADIX,
                      planes: int = 8) -> Dict[str, Topology]:
  """The five columns of Insights Table 3 for one radix (64-port IB switches by default)."""
  return {
      "FT2": fat_tree_2(radix),
      "MPFT": multi_plane_fat_tree(radix, planes),
      "FT3": fat_tree_3(radix),
      "SF": slim_fly(radix),
      "DF": dragonfly(radix, groups="insights"),
  }


def fit_prices(topologies: Sequence[Topology], costs: Sequence[float]) -> Tuple[float, float]:
  """Least-squares switch and link prices that best explain given costs per endpoint.

  Minimises sum_i (S * switches_i / endpoints_i + L * links_i / endpoints_i - costs_i /
  endpoints_i)^2, i.e. relative errors weighted by cost per endpoint.

  Args:
    topologies: the networks.
    costs: their total costs in dollars (same order).

  Returns:
    (switch_price, link_price) in dollars.

  Raises:
    ValueError: if the lengths differ, fewer than two networks are given, or a cost is <= 0.
  """
  if len(topologies) != len(costs) or len(topologies) < 2:
    raise ValueError("topologies and costs must have the same length >= 2, got "
                     f"{len(topologies)} and {len(costs)}")
  sxx = sxy = syy = sxc = syc = 0.0
  for t, c in zip(topologies, costs):
    if not c > 0:
      raise ValueError(f"costs must be > 0 dollars, got {c!r}")
    x, y, z = t.switches / t.endpoints, t.links / t.endpoints, c / t.endpoints
    sxx += x * x
    sxy += x * y
    syy += y * y
    sxc += x * z
    syc += y * z
  det = sxx * syy - sxy * sxy
  if det == 0:
    raise ValueError("the topologies do not determine two prices (degenerate system)")
  return (syy * sxc - sxy * syc) / det, (sxx * syc - sxy * sxc) / det


# --------------------------------------------------------------------------- latency (Table 5)
def end_to_end_latency(fabric: str, switches_traversed: int) -> float:
  """CPU-side end-to-end latency of a 64-byte message, in seconds (Insights Table 5 model).

  Table 5 gives the latency through 1 switch (same leaf) and 3 switches (cross leaf: leaf, spine,
  leaf). A linear model, latency = base + per_switch * switches, passes through both points; it
  extrapolates to 5 switches for a three-layer fat-tree. NVLink (intra-node) has a single point.

  Args:
    fabric: "infiniband", "roce" or "nvlink".
    switches_traversed: odd number of switches on the path (1, 3, 5); NVLink only 1.

  Returns:
    Seconds.

  Raises:
    ValueError: for an unknown fabric or an invalid switch count.
  """
  if fabric not in ("infiniband", "roce", "nvlink"):
    raise ValueError(f"fabric={fabric!r}; allowed: ('infiniband', 'roce', 'nvlink')")
  if (not isinstance(switches_traversed, int) or switches_traversed < 1 or
      switches_traversed % 2 == 0):
    raise ValueError(f"switches_traversed must be an odd integer >= 1, got {switches_traversed!r}")
  same = hardware.LATENCY_64B[(fabric, "same_leaf")]
  if fabric == "nvlink":
    if switches_traversed != 1:
      raise ValueError("NVLink is one switch hop inside a node; allowed switches_traversed: 1")
    return same
  per_switch = (hardware.LATENCY_64B[(fabric, "cross_leaf")] - same) / 2
  return same + per_switch * (switches_traversed - 1)


# --------------------------------------------------------------------------- all-to-all simulation
@dataclasses.dataclass(frozen=True)
class AllToAllResult:
  """Outcome of one simulated all-to-all.

  Attributes:
    fabric: "multi_rail" or "multi_plane".
    gpus: participating GPUs.
    bytes_per_peer: bytes each GPU sends to each other GPU.
    time_s: completion time, seconds (bottleneck transfer time + longest path latency).
    bottleneck: the resource class that bounds the transfer ("nic_up", "nvlink_out", ...).
    algbw: bytes sent per GPU / time_s, B/s.
    busbw: NCCL bus bandwidth, algbw * (gpus - 1) / gpus, B/s.
    max_load: bytes through the busiest resource of each class.
    forwarded_bytes: bytes relayed over NVLink to change plane (multi-plane only).
  """

  fabric: str
  gpus: int
  bytes_per_peer: float
  time_s: float
  bottleneck: str
  algbw: float
  busbw: float
  max_load: Tuple[Tuple[str, float], ...]
  forwarded_bytes: float


def all_to_all(fabric: str, num_nodes: int, bytes_per_peer: float, gpus_per_node: int = 8,
               radix: int = hardware.IB_SWITCH_RADIX,
               nic_bandwidth: float = hardware.H800.scale_out_bandwidth_effective,
               nvlink_bandwidth: float = hardware.H800.scale_up_bandwidth_achieved,
               switch_fabric: str = "infiniband") -> AllToAllResult:
  """Simulates a uniform all-to-all on a multi-rail or a multi-plane two-layer fat-tree.

  Every GPU sends `bytes_per_peer` bytes to every other GPU. Each flow is routed hop by hop and
  its bytes are added to every resource it crosses; a resource moves bytes at its bandwidth, so
  the all-to-all finishes when the busiest resource has drained, plus the latency of the longest
  path (a fluid, flow-level model with ideal ECMP spreading over spines).

  Node n has GPUs (n, 0..G-1); GPU g owns NIC g. Within a node traffic uses NVLink.
  * multi_rail (MRFT): NIC g of every node attaches to a leaf of rail g; all rails share one spine
    layer, so GPU (n, g) reaches GPU (m, g') directly through leaf(g) - spine - leaf(g').
  * multi_plane (MPFT, Insights §5.1): NIC g attaches to plane g, an isolated FT2. Plane-aware
    routing: a flow to GPU (m, g') with g' != g first crosses NVLink to GPU (n, g') of its own
    node, then plane g' (PXN-style forwarding), so every plane only carries its own index.

  Args:
    fabric: "multi_rail" or "multi_plane".
    num_nodes: nodes (positive int); a leaf serves radix/2 nodes of a rail/plane.
    bytes_per_peer: bytes per (source, destination) pair (> 0).
    gpus_per_node: GPUs (= NICs = rails/planes) per node.
    radix: switch ports (even).
    nic_bandwidth: B/s per NIC direction (default: H800's ~40 GB/s effective IB).
    nvlink_bandwidth: B/s per GPU NVLink direction (default: H800's ~160 GB/s achieved).
    switch_fabric: "infiniband" or "roce", for the per-switch latency (Table 5 model).

  Returns:
    `AllToAllResult`.

  Raises:
    ValueError: for an unknown fabric, non-positive sizes or bandwidths, or more nodes than a
      two-layer fat-tree of this radix can attach.
  """
  if fabric not in FABRICS:
    raise ValueError(f"fabric={fabric!r}; allowed: {FABRICS}")
  k = _check_radix(radix)
  for name, v in (("num_nodes", num_nodes), ("gpus_per_node", gpus_per_node)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  for name, v in (("bytes_per_peer", bytes_per_peer), ("nic_bandwidth", nic_bandwidth),
                  ("nvlink_bandwidth", nvlink_bandwidth)):
    if not isinstance(v, (int, float)) or v <= 0:
      raise ValueError(f"{name} must be > 0, got {v!r}")
  nodes_per_leaf = k // 2
  if num_nodes > k * k // 2:
    raise ValueError(f"num_nodes={num_nodes} exceeds the {k * k // 2} endpoints a two-layer "
                     f"fat-tree of radix {k} attaches per rail/plane")
  G = gpus_per_node
  leaf_of = lambda node: node // nodes_per_leaf  # leaf index within a rail / plane
  load: Dict[Tuple[str, Any], float] = collections.defaultdict(float)
  capacity = {"nvlink_out": nvlink_bandwidth, "nvlink_in": nvlink_bandwidth,
              "nic_up": nic_bandwidth, "nic_down": nic_bandwidth,
              # a leaf's k/2 uplinks, ECMP-spread, each at the NIC port rate
              "leaf_up": nodes_per_leaf * nic_bandwidth,
              "leaf_down": nodes_per_leaf * nic_bandwidth}
  switch_hop = lambda n_switches: end_to_end_latency(switch_fabric, n_switches)
  nvlink_latency = end_to_end_latency("nvlink", 1)
  worst_latency = 0.0
  forwarded = 0.0
  b = float(bytes_per_peer)

  def network_path(src_node: int, dst_node: int, rail_src: int, rail_dst: int) -> float:
    # src NIC -> leaf(rail_src) [-> spine -> leaf(rail_dst)] -> dst NIC; returns latency
    load[("nic_up", (src_node, rail_src))] += b
    load[("nic_down", (dst_node, rail_dst))] += b
    if rail_src == rail_dst and leaf_of(src_node) == leaf_of(dst_node):
      return switch_hop(1)
    load[("leaf_up", (rail_src, leaf_of(src_node)))] += b
    load[("leaf_down", (rail_dst, leaf_of(dst_node)))] += b
    return switch_hop(3)

  for n in range(num_nodes):
    for g in range(G):
      for m in range(num_nodes):
        for g2 in range(G):
          if n == m:
            if g == g2:
              continue
            load[("nvlink_out", (n, g))] += b
            load[("nvlink_in", (n, g2))] += b
            worst_latency = max(worst_latency, nvlink_latency)
            continue
          if fabric == "multi_rail" or g == g2:
            lat = network_path(n, m, g, g2)
          else:  # multi-plane: hop to the GPU of the destination's plane, then that plane
            load[("nvlink_out", (n, g))] += b
            load[("nvlink_in", (n, g2))] += b
            forwarded += b
            lat = nvlink_latency + network_path(n, m, g2, g2)
          worst_latency = max(worst_latency, lat)
  per_class: Dict[str, float] = {}
  for (cls, _), v in load.items():
    per_class[cls] = max(per_class.get(cls, 0.0), v)
  times = {cls: v / capacity[cls] for cls, v in per_class.items()}
  bottleneck = max(times, key=times.get)
  total = times[bottleneck] + worst_latency
  gpus = num_nodes * G
  sent = b * (gpus - 1)
  algbw = sent / total
  return AllToAllResult(fabric=fabric, gpus=gpus, bytes_per_peer=b, time_s=total,
                        bottleneck=bottleneck, algbw=algbw, busbw=algbw * (gpus - 1) / gpus,
                        max_load=tuple(sorted(per_class.items())), forwarded_bytes=forwarded)
