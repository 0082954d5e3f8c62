"""Inter-node traffic implied by a routing, costed without running the schedules.

Source: "Insights into DeepSeek-V3" (arXiv 2505.09343) §4.3 (node-limited routing); DeepSeek-V3
report §3.2.2 (a token crosses the inter-node fabric once per destination node). The counting
rule is the one `dsv3_jax.parallel.dispatch`'s schedules report in `DispatchStats` (a test runs
both and compares), as plain numpy arithmetic, so that routings at any scale can be costed.
Pure numpy; no jax.
"""

from __future__ import annotations

import numpy as np


def link_copies(topk_idx, src_node, experts_per_node: int):
  """Token copies per link class implied by a routing, for both schedules (no execution).

  The counting rule of the schedules' `DispatchStats`, as plain arithmetic on the routing, so that
  routings at any scale can be costed (arXiv 2505.09343 §4.3; report §3.2.2).

  Args:
    topk_idx: [T, k] int global expert ids (-1 = none), experts laid out node-major.
    src_node: [T] int node holding each token.
    experts_per_node: E / nodes.

  Returns:
    dict of [T] int arrays: `flat_inter` (one inter-node copy per remote expert),
    `two_hop_inter` (one per distinct remote node), `nodes_reached` (distinct nodes, local
    included), `experts_per_remote_node` (remote experts / remote nodes, 0 if none).
  """
  idx = np.asarray(topk_idx)
  src = np.asarray(src_node)[:, None]
  valid = idx >= 0
  node = np.where(valid, idx // experts_per_node, -1)
  remote = valid & (node != src)
  k = idx.shape[1]
  first = np.ones_like(valid)
  for j in range(1, k):  # a node counts once per token
    first[:, j] = ~np.any(node[:, :j] == node[:, j:j + 1], axis=1)
  flat_inter = remote.sum(1)
  two_hop_inter = (remote & first).sum(1)
  nodes_reached = (valid & first).sum(1)
  per_node = np.where(two_hop_inter > 0, flat_inter / np.maximum(two_hop_inter, 1), 0.0)
  return dict(flat_inter=flat_inter, two_hop_inter=two_hop_inter, nodes_reached=nodes_reached,
              experts_per_remote_node=per_node)
