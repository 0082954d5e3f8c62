"""DeepSeekMoE for serving on one device: the model's router, shared and routed experts, with the
routed experts run by decode-sized calls of `model.experts`.

A decode step routes only batch x k rows, so the expert window follows the load
(`decode_window`), and when every expert gets a few rows (batched decode) the batched-capacity
call runs them without a loop (`capacity_expert_compute`). Both are dropless. Routing, gate
values and the shared experts are the module's own (`DeepSeekMoE.gate`, report §2.1.2 eqs.
12-16). On a mesh the engine calls `DeepSeekMoE.__call__` instead (the dispatch schedules).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.model.experts import capacity_expert_compute, decode_window, expert_compute
from dsv3_jax.model.moe import DeepSeekMoE


def local_moe(moe: DeepSeekMoE, x: jax.Array, mask: jax.Array) -> jax.Array:
  """The MoE layer on one device (all experts local), forward only.

  Args:
    moe: the layer (router with its e_score_correction_bias, experts, shared experts).
    x: [B, S, D] normed hidden states.
    mask: [B, S] bool; False tokens are not routed (their routed output is 0).

  Returns:
    [B, S, D]: shared experts + sum_i g_i FFN_i (report eq. 12, without the residual).
  """
  b, s, d = x.shape
  tokens = x.reshape(b * s, d)
  routing = moe.gate(tokens)
  k = routing.topk_idx.shape[1]
  idx = jnp.where(mask.reshape(-1, 1), routing.topk_idx, -1).reshape(-1)
  w = moe.experts
  rows, n_experts = b * s * k, w.gate_proj.shape[0]
  weights = (w.gate_proj[...], w.up_proj[...], w.down_proj[...])
  copies = jnp.repeat(tokens, k, axis=0)
  if n_experts <= rows <= 16 * n_experts:  # decode batches: a few rows per expert
    out = capacity_expert_compute(copies, idx, *weights,
                                  capacity=decode_window(2 * rows, n_experts), window=4)
  else:  # one sequence (few experts touched) or a prefill (many rows per expert)
    out = expert_compute(copies, idx, *weights, window=decode_window(rows, n_experts),
                         tail_window=None)
  y = jnp.einsum("tkd,tk->td", out.reshape(b * s, k, d), routing.topk_weight.astype(out.dtype))
  y = y.reshape(b, s, d)
  if moe.shared_experts is not None:
    y = y + moe.shared_experts(x)
  return y
