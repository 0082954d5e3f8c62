"""One or more MoE layers for two micro-batches, sequential or with dual micro-batch overlap.

Insights §2.3.1, V3 report §3.2.1 / §3.4: attention and MoE compute of one micro-batch run while
the other's dispatch / combine is on the network. `moe_layer_costs` estimates the four phases'
durations of a prefill micro-batch from the model and the accelerator; `layer_tasks` /
`simulate_layers` lay them out on a compute and a communication stream. Times in seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Tuple

from dsv3_jax.analysis import hardware
from dsv3_jax.analysis._spec import ModelSpec
from dsv3_jax.analysis.memory import attention_params_per_layer, expert_params
from dsv3_jax.analysis.timeline.engine import Task, Timeline, simulate


@dataclasses.dataclass(frozen=True)
class LayerCosts:
  """Per-micro-batch durations of one MoE layer's four phases, in seconds.

  Attributes:
    attention: attention (MLA) compute.
    dispatch: all-to-all sending tokens to their experts.
    moe: expert (routed + shared) compute.
    combine: all-to-all returning expert outputs.
  """

  attention: float
  dispatch: float
  moe: float
  combine: float

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"LayerCosts.{f.name} must be >= 0 seconds, got {v!r}")

  @property
  def compute(self) -> float:
    return self.attention + self.moe

  @property
  def communication(self) -> float:
    return self.dispatch + self.combine


def moe_layer_costs(model: Any = "deepseek_v3_671b",
                    accelerator: hardware.Accelerator = hardware.H800,
                    tokens: int = 4096, context_len: int = 4096,
                    compute_efficiency: float = 0.5, remote_nodes_per_token: float = 3.5,
                    dispatch_bytes: float = 1.0, combine_bytes: float = 2.0,
                    network_bandwidth: Optional[float] = None) -> LayerCosts:
  """Durations of one MoE layer for a micro-batch of `tokens` tokens on one GPU (prefill).

  Compute: forward FLOPs (attention projections + causal attention core over (context+1)/2 keys;
  router + activated routed and shared experts) at `compute_efficiency` x the accelerator's dense
  BF16 peak. Communication (V3 report §3.2.2): with node-limited routing each token crosses IB
  once per remote node it is sent to (then fans out over NVLink); dispatch carries `hidden_size`
  FP8 bytes per copy, combine BF16 bytes, at the GPU's effective IB bandwidth.

  Args:
    model: a MoE `ModelSpec`, config name or config.
    accelerator: the GPU (default H800).
    tokens: tokens in the micro-batch on this GPU.
    context_len: sequence length for the attention core.
    compute_efficiency: achieved / peak FLOP/s, in (0, 1].
    remote_nodes_per_token: IB copies per token (<= topk_group = 4; 3.5 = 4 x 7/8 when the
      token's own node is one of the 8 equally likely).
    dispatch_bytes, combine_bytes: bytes per element on the wire.
    network_bandwidth: B/s per GPU; default `accelerator.scale_out_bandwidth_effective`.

  Returns:
    `LayerCosts` in seconds.

  Raises:
    ValueError: for a dense model or out-of-range arguments.
  """
  s = ModelSpec.from_config(model)
  if not s.is_moe:
    raise ValueError(f"model {s.name!r} has no MoE layers; moe_layer_costs needs n_routed_experts")
  for name, v in (("tokens", tokens), ("context_len", context_len)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  if not 0 < compute_efficiency <= 1:
    raise ValueError(f"compute_efficiency must be in (0, 1], got {compute_efficiency!r}")
  if remote_nodes_per_token < 0:
    raise ValueError(f"remote_nodes_per_token must be >= 0, got {remote_nodes_per_token!r}")
  bw = network_bandwidth or accelerator.scale_out_bandwidth_effective
  if bw <= 0:
    raise ValueError(f"network_bandwidth must be > 0 B/s, got {bw!r}")
  rate = accelerator.bf16_dense_flops * compute_efficiency
  keys = (context_len + 1) / 2
  attn_flops = 2 * attention_params_per_layer(s) + \
      2 * s.num_attention_heads * (s.qk_head_dim + s.value_head_dim) * keys
  moe_flops = 2 * ((s.num_experts_per_tok + s.n_shared_experts) * expert_params(s) +
                   s.n_routed_experts * s.hidden_size)
  wire = tokens * remote_nodes_per_token * s.hidden_size
  return LayerCosts(attention=tokens * attn_flops / rate, dispatch=wire * dispatch_bytes / bw,
                    moe=tokens * moe_flops / rate, combine=wire * combine_bytes / bw)


COMPUTE, COMM = "compute", "comm"
PHASES = ("attention", "dispatch", "moe", "combine")


def layer_tasks(costs: LayerCosts, num_layers: int = 1, micro_batches: int = 2,
                overlap: bool = True) -> List[Task]:
  """Tasks of `num_layers` MoE layers for `micro_batches` micro-batches on one GPU.

  Each micro-batch runs attention -> dispatch -> moe -> combine per layer (compute on the
  "compute" stream, all-to-alls on the "comm" stream), and its next layer's attention waits for
  its combine.
  * overlap=False: one micro-batch after the other, every task waits for the previous one.
  * overlap=True (dual micro-batch overlap): streams interleave the micro-batches — compute
    runs attention(0), attention(1), moe(0), moe(1), ...; the network runs dispatch(0),
    dispatch(1), combine(0), combine(1), ... so one micro-batch computes while the other
    communicates.

  Raises:
    ValueError: for non-positive counts.
  """
  for name, v in (("num_layers", num_layers), ("micro_batches", micro_batches)):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  dur = dict(attention=costs.attention, dispatch=costs.dispatch, moe=costs.moe,
             combine=costs.combine)
  stream = dict(attention=COMPUTE, dispatch=COMM, moe=COMPUTE, combine=COMM)
  name = lambda l, m, ph: f"L{l}.mb{m}.{ph}"
  tasks: List[Task] = []
  if not overlap:
    prev: Tuple[str, ...] = ()
    for l in range(num_layers):
      for m in range(micro_batches):
        for ph in PHASES:
          n = name(l, m, ph)
          tasks.append(Task(n, stream[ph], dur[ph], prev, ph, f"mb{m}"))
          prev = (n,)
    return tasks

  def deps(l: int, m: int, ph: str) -> Tuple[str, ...]:
    i = PHASES.index(ph)
    if i > 0:
      return (name(l, m, PHASES[i - 1]),)
    return (name(l - 1, m, "combine"),) if l > 0 else ()

  for l in range(num_layers):
    # submission order per stream = the interleaving of the two micro-batches
    for ph in PHASES:
      for m in range(micro_batches):
        tasks.append(Task(name(l, m, ph), stream[ph], dur[ph], deps(l, m, ph), ph, f"mb{m}"))
  return tasks


@dataclasses.dataclass(frozen=True)
class LayerResult:
  """Per-layer time and utilisation of simulated MoE layers.

  Attributes:
    timeline: the simulated `Timeline`.
    num_layers: layers simulated.
    layer_time: makespan / num_layers, seconds.
    steady_layer_time: makespan(num_layers + 1) - makespan(num_layers): the time one more layer
      adds once the overlap is in steady state, seconds.
    compute_utilisation: compute-stream busy time / makespan.
    comm_utilisation: comm-stream busy time / makespan.
  """

  timeline: Timeline
  num_layers: int
  layer_time: float
  steady_layer_time: float
  compute_utilisation: float
  comm_utilisation: float


def simulate_layers(costs: LayerCosts, num_layers: int = 1, micro_batches: int = 2,
                    overlap: bool = True) -> LayerResult:
  """Simulates `layer_tasks` and reports per-layer time and stream utilisation.

  Raises:
    ValueError: for non-positive counts.
  """
  tl = simulate(layer_tasks(costs, num_layers, micro_batches, overlap))
  more = simulate(layer_tasks(costs, num_layers + 1, micro_batches, overlap))
  return LayerResult(timeline=tl, num_layers=num_layers, layer_time=tl.makespan / num_layers,
                     steady_layer_time=more.makespan - tl.makespan,
                     compute_utilisation=tl.utilisation(COMPUTE),
                     comm_utilisation=tl.utilisation(COMM))
