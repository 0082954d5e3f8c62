"""The expert-parallel decode bound of Insights §2.3.2: communication-bound time per token.

Dispatch in FP8, combine in BF16, 8 routed + 1 shared expert per token, 61 layers, two
micro-batches sharing the network: `ep_comm_time` (one micro-batch, one layer), `ep_tpot_bound`
(the closed form) and `simulate_decode` (the same step event by event). Times in seconds.
"""

from __future__ import annotations

from typing import Tuple

from dsv3_jax.analysis import hardware
from dsv3_jax.analysis.timeline.engine import Timeline, simulate
from dsv3_jax.analysis.timeline.overlap import LayerCosts, layer_tasks


def ep_comm_time(tokens: int = 32, experts_per_token: int = 9, hidden_size: int = 7000,
                 dispatch_bytes: float = 1.0, combine_bytes: float = 2.0,
                 bandwidth: float = hardware.CX7_400G.bandwidth) -> Tuple[float, float]:
  """Dispatch and combine time of one micro-batch in one layer (Insights §2.3.2).

  (1 byte + 2 bytes) x 32 tokens x 9 experts x 7K / 50 GB/s = 120.96 us on 400 Gb/s IB: each
  token's hidden state goes to 8 routed + 1 shared expert in FP8 and comes back in BF16.

  Args:
    tokens: tokens per micro-batch on one device.
    experts_per_token: destinations per token (num_experts_per_tok + n_shared_experts).
    hidden_size: elements per token (the paper rounds V3's 7168 to 7K = 7000).
    dispatch_bytes: bytes per element sent (1: FP8).
    combine_bytes: bytes per element returned (2: BF16).
    bandwidth: B/s of the device's link (50e9 for a 400 Gb/s NIC, 900e9 for GB200 NVL72).

  Returns:
    (dispatch_seconds, combine_seconds).

  Raises:
    ValueError: for non-positive sizes or bandwidth, or negative byte widths.
  """
  for name, v in (("tokens", tokens), ("experts_per_token", experts_per_token),
                  ("hidden_size", hidden_size)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  if not bandwidth > 0:
    raise ValueError(f"bandwidth must be > 0 B/s, got {bandwidth!r}")
  if dispatch_bytes < 0 or combine_bytes < 0:
    raise ValueError(f"dispatch_bytes / combine_bytes must be >= 0, got "
                     f"{dispatch_bytes!r} / {combine_bytes!r}")
  elements = tokens * experts_per_token * hidden_size
  return elements * dispatch_bytes / bandwidth, elements * combine_bytes / bandwidth


def ep_tpot_bound(comm_seconds: float, num_layers: int = 61, micro_batches: int = 2) -> float:
  """Time per output token when communication bounds decoding (Insights §2.3.2).

  With dual micro-batch overlap the compute hides behind communication, and the network carries
  both micro-batches' dispatch + combine in every layer: TPOT = layers x micro_batches x comm.
  61 x 2 x 120.96 us = 14.76 ms (~67 tokens/s).

  Args:
    comm_seconds: dispatch + combine of one micro-batch in one layer.
    num_layers: MoE layers traversed per token (61 for V3).
    micro_batches: micro-batches sharing the network (2 for dual micro-batch overlap).

  Raises:
    ValueError: for non-positive arguments.
  """
  if not comm_seconds > 0:
    raise ValueError(f"comm_seconds must be > 0, got {comm_seconds!r}")
  for name, v in (("num_layers", num_layers), ("micro_batches", micro_batches)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  return num_layers * micro_batches * comm_seconds


def simulate_decode(dispatch_s: float, combine_s: float, attention_s: float = 0.0,
                    moe_s: float = 0.0, num_layers: int = 61, micro_batches: int = 2,
                    overlap: bool = True) -> Timeline:
  """Event-driven decode step: every layer of every micro-batch; makespan = TPOT.

  With compute no longer than communication the overlapped makespan equals `ep_tpot_bound`
  (plus the first attention and last MoE that cannot be hidden).

  Raises:
    ValueError: for negative durations or non-positive counts.
  """
  costs = LayerCosts(attention=attention_s, dispatch=dispatch_s, moe=moe_s, combine=combine_s)
  return simulate(layer_tasks(costs, num_layers, micro_batches, overlap))
