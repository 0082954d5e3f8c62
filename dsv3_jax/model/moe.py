"""DeepSeekMoE: shared + fine-grained routed experts with sigmoid gating, group-limited
(node-limited) top-k and auxiliary-loss-free load balancing.

Sources: DeepSeek-V3 technical report §2.1.2, eqs. 12-20; routing semantics of Hugging Face
`DeepseekV3MoE.route_tokens_to_experts` except that dropped groups are masked to -inf (as in
DeepSeek's own inference code), never 0, so a negative biased score can never select an
expert of a dropped group.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from dsv3_jax.model import capture
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.experts import bind_experts
from dsv3_jax.model.layers import MLP, normal_init
from dsv3_jax.parallel import dispatch as dispatch_lib
from dsv3_jax.quant.codec import codec_from_name


def _inside_shard_map(axes) -> bool:
  """True when tracing inside a shard_map that made `axes` manual (per-device code)."""
  manual = jax.sharding.get_abstract_mesh().manual_axes
  return all(a in manual for a in axes)


class RouterBias(nnx.Variable):
  """The auxiliary-loss-free balancing bias b_i (report eq. 16): float32, not trained by the
  optimizer, moved by +-gamma after each step from the expert loads (`train.trainer`)."""


class RoutingResult(NamedTuple):
  """Router output for T tokens.

  logits: [T, E] float32 affinity logits u_t . e_i.
  scores: [T, E] float32 sigmoid affinities s_{i,t}.
  topk_idx: [T, k] int32 chosen experts (descending biased score).
  topk_weight: [T, k] float32 gate values g_{i,t} (normalised if `norm_topk_prob`, times
    `routed_scaling_factor` exactly once).
  """

  logits: jax.Array
  scores: jax.Array
  topk_idx: jax.Array
  topk_weight: jax.Array


def route(scores: jax.Array, bias: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Group-limited top-k selection on biased scores; gates from the unbiased scores.

  Groups (nodes) are ranked by the sum of their two highest biased scores; a token keeps the
  best `topk_group` groups (M in the report) and picks `num_experts_per_tok` experts among them.

  Args:
    scores: [T, E] float32 sigmoid affinities.
    bias: [E] float32 e_score_correction_bias (selection only, never in the gates).
    config: model config.

  Returns:
    topk_idx [T, k] int32, topk_weight [T, k] float32.
  """
  c = config
  t, e = scores.shape
  biased = scores + bias[None, :]
  grouped = biased.reshape(t, c.n_group, e // c.n_group)
  group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, n_group]
  if c.topk_group < c.n_group:
    _, group_idx = jax.lax.top_k(group_scores, c.topk_group)
    group_mask = jnp.sum(jax.nn.one_hot(group_idx, c.n_group, dtype=jnp.int32), axis=1) > 0
    biased = jnp.where(jnp.repeat(group_mask, e // c.n_group, axis=1), biased, -jnp.inf)
  _, topk_idx = jax.lax.top_k(biased, c.num_experts_per_tok)
  weight = jnp.take_along_axis(scores, topk_idx, axis=1)
  if c.norm_topk_prob:
    weight = weight / (jnp.sum(weight, axis=-1, keepdims=True) + 1e-20)
  return topk_idx.astype(jnp.int32), weight * c.routed_scaling_factor


class Router(nnx.Module):
  """Sigmoid router with the aux-loss-free bias (HF `DeepseekV3TopkRouter`, named `gate`)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.kernel = nnx.Param(normal_init(config.initializer_range)(
        rngs.params(), (config.hidden_size, config.n_routed_experts), jnp.float32))
    self.e_score_correction_bias = RouterBias(jnp.zeros((config.n_routed_experts,), jnp.float32))

  def __call__(self, x: jax.Array) -> RoutingResult:
    """x: [T, D] -> RoutingResult (logits and scores in float32, as in the report)."""
    logits = jnp.dot(x.astype(jnp.float32), self.kernel[...])
    scores = jax.nn.sigmoid(logits)
    bias = jax.lax.stop_gradient(self.e_score_correction_bias[...])
    topk_idx, topk_weight = route(scores, bias, self.config)
    return RoutingResult(logits, scores, topk_idx, topk_weight)


def sequence_balance_loss(scores: jax.Array, topk_idx: jax.Array, mask: jax.Array,
                          n_experts: int) -> jax.Array:
  """Complementary sequence-wise balance loss sum_i f_i P_i, averaged over sequences.

  Report eqs. 17-20 (without alpha): f_i = E / (k T) * #{t : i in TopK(t)},
  P_i = (1/T) sum_t s'_{i,t} with s' the scores normalised over experts; T counts the
  sequence's non-padding tokens.

  Args:
    scores: [B, S, E] float32 sigmoid affinities.
    topk_idx: [B, S, k] int32.
    mask: [B, S] bool, False for padding.
    n_experts: E.

  Returns:
    [] float32; equals 1 for perfectly uniform routing and scores.
  """
  k = topk_idx.shape[-1]
  m = mask.astype(jnp.float32)
  n_tok = jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [B]
  chosen = jnp.sum(jax.nn.one_hot(topk_idx, n_experts, dtype=jnp.float32), axis=2)  # [B,S,E]
  f = n_experts / (k * n_tok[:, None]) * jnp.einsum("bse,bs->be", chosen, m)
  s_norm = scores / jnp.sum(scores, axis=-1, keepdims=True)
  p = jnp.einsum("bse,bs->be", s_norm, m) / n_tok[:, None]
  has_tokens = (jnp.sum(m, axis=1) > 0).astype(jnp.float32)
  per_seq = jnp.sum(f * p, axis=-1) * has_tokens
  return jnp.sum(per_seq) / jnp.maximum(jnp.sum(has_tokens), 1.0)


class MoEStats(NamedTuple):
  """Per-layer MoE statistics for one forward pass (see `dispatch.DispatchStats`)."""

  dispatch: dispatch_lib.DispatchStats
  balance_loss: jax.Array  # [] sum_i f_i P_i (alpha applied by the trainer)
  topk_idx: jax.Array  # [B, S, k] int32 (for analysis and Hugging Face parity tests)
  topk_weight: jax.Array  # [B, S, k] float32


class RoutedExperts(nnx.Module):
  """E routed SwiGLU experts stored stacked: gate_proj, up_proj [E, D, F], down_proj [E, F, D].

  On an expert-parallel mesh the leading (expert) axis is sharded over (`node`, `gpu`).
  """

  def __init__(self, config: ModelConfig, *, expert_axes: Optional[tuple[str, ...]],
               rngs: nnx.Rngs):
    c = config
    init = normal_init(c.initializer_range)
    e, d, f = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
    meta = dict(out_sharding=(expert_axes, None, None), eager_sharding=False) if expert_axes \
        else {}
    self.gate_proj = nnx.Param(init(rngs.params(), (e, d, f), jnp.float32), **meta)
    self.up_proj = nnx.Param(init(rngs.params(), (e, d, f), jnp.float32), **meta)
    self.down_proj = nnx.Param(init(rngs.params(), (e, f, d), jnp.float32), **meta)


class DeepSeekMoE(nnx.Module):
  """h' = h + sum_shared FFN_s(h) + sum_i g_{i,t} FFN_i(h) (report eq. 12).

  With `mesh` set, routed experts are sharded over the mesh's (`node`, `gpu`) axes and tokens
  move by the configured dispatch schedule inside `jax.shard_map` (or directly, when the caller
  already runs per device inside a shard_map over those axes, as the trainer does); without a
  mesh the same schedule runs locally (all experts on one device).
  """

  def __init__(self, config: ModelConfig, *, mesh: Optional[Mesh] = None, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.mesh = mesh
    self.topology = (dispatch_lib.EPTopology.from_mesh(mesh) if mesh is not None
                     else dispatch_lib.EPTopology())
    self.topology.validate(c.n_routed_experts, c.n_group)
    self.schedule = dispatch_lib.get_schedule(c.dispatch, codec_from_name(c.dispatch_payload),
                                              codec_from_name(c.combine_payload))
    self.expert_recipe = c.fp8_recipe("routed_experts")
    self.gate = Router(c, rngs=rngs)
    self.experts = RoutedExperts(c, expert_axes=self.topology.axes if mesh is not None else None,
                                 rngs=rngs)
    if c.n_shared_experts:
      self.shared_experts = MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts,
                                dtype=jnp.dtype(c.dtype), init_std=c.initializer_range,
                                fp8_recipe=c.fp8_recipe("shared_experts"), rngs=rngs)
    else:
      self.shared_experts = None

  # -- capacity helpers (rows per source device and destination, per hop)
  def local_tokens(self, n_tokens: int) -> int:
    """Tokens per device when `n_tokens` are split over every device of the mesh."""
    n = self.topology.n_devices * self.topology.n_replicas
    if n_tokens % n:
      raise ValueError(f"{n_tokens} tokens cannot be split evenly over the {n} devices")
    return n_tokens // n

  def worst_case_capacity(self, n_tokens: int) -> tuple[int, ...]:
    c = self.config
    return self.schedule.worst_case_capacity(self.local_tokens(n_tokens), c.n_routed_experts,
                                             c.num_experts_per_tok, self.topology, c.topk_group)

  def initial_capacity(self, n_tokens: int, factor: Optional[float] = None) -> tuple[int, ...]:
    c = self.config
    return self.schedule.initial_capacity(
        self.local_tokens(n_tokens), c.n_routed_experts, c.num_experts_per_tok, self.topology,
        c.topk_group, c.capacity_factor if factor is None else factor)

  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               capacity: Optional[tuple[int, ...]] = None) -> tuple[jax.Array, MoEStats]:
    """Applies the MoE layer.

    Args:
      x: [B, S, D] (on a mesh: batch sharded over (`node`, `gpu`)).
      mask: optional [B, S] bool, False for padding tokens (not routed, not counted).
      capacity: static per-hop buffer rows (see `dispatch`); None = worst case (dropless).

    Returns:
      y: [B, S, D]; stats: `MoEStats`.
    """
    c = self.config
    b, s, d = x.shape
    if mask is None:
      mask = jnp.ones((b, s), jnp.bool_)
    tokens = x.reshape(b * s, d)
    routing = self.gate(tokens)
    k = c.num_experts_per_tok
    balance = sequence_balance_loss(routing.scores.reshape(b, s, -1),
                                    routing.topk_idx.reshape(b, s, k), mask, c.n_routed_experts)
    if capacity is None:
      capacity = self.worst_case_capacity(b * s)
    recipe = self.expert_recipe

    def run(x, topk_idx, topk_weight, valid, w_gate, w_up, w_down):
      experts = bind_experts(w_gate, w_up, w_down, fp8_recipe=recipe)
      return self.schedule(x, topk_idx, topk_weight, valid, experts, capacity=tuple(capacity),
                           topo=self.topology, n_experts=c.n_routed_experts)

    args = (tokens, routing.topk_idx, routing.topk_weight, mask.reshape(-1),
            self.experts.gate_proj[...], self.experts.up_proj[...], self.experts.down_proj[...])
    if self.mesh is None or _inside_shard_map(self.topology.axes):
      y, stats = run(*args)  # local, or already per-device inside the caller's shard_map
    else:
      tok = P(self.topology.all_axes)
      stat_specs = dispatch_lib.DispatchStats(*([P()] * len(dispatch_lib.DispatchStats._fields)))
      experts = P(self.topology.axes)  # sharded inside a group, replicated across groups
      y, stats = jax.shard_map(run, mesh=self.mesh, in_specs=(tok,) * 4 + (experts,) * 3,
                               out_specs=(tok, stat_specs))(*args)
    y = y.reshape(b, s, d)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x)
    # Capture points for analysis (experiments/quant_error.py); inert outside nnx.capture.
    capture.sow(self, "routing", (x, routing.topk_idx, routing.topk_weight))
    y = capture.perturb(self, "output", y)
    return y, MoEStats(stats, balance, routing.topk_idx.reshape(b, s, k),
                       routing.topk_weight.reshape(b, s, k))
