"""The dense MoE oracle the expert-parallel tests compare against: every expert on every
token, masked by the routing (single device, no dispatch, no capacity)."""

import jax
import jax.numpy as jnp


def expert_ffn(h, w_gate, w_up, w_down):
  """SwiGLU experts on stacked rows: down(silu(h @ gate) * (h @ up)).

  Args:
    h: [E, N, D] rows per expert; w_gate, w_up: [E, D, F]; w_down: [E, F, D].

  Returns:
    [E, N, D] in h.dtype.
  """
  dt = h.dtype
  g = jnp.einsum("end,edf->enf", h, w_gate.astype(dt))
  u = jnp.einsum("end,edf->enf", h, w_up.astype(dt))
  return jnp.einsum("enf,efd->end", jax.nn.silu(g) * u, w_down.astype(dt))


def moe_dense_reference(x, topk_idx, topk_weight, w_gate, w_up, w_down):
  """sum_j topk_weight[t, j] * FFN_{topk_idx[t, j]}(x[t]).

  Args:
    x: [T, D]; topk_idx: [T, k] int32; topk_weight: [T, k] float32;
    w_gate, w_up: [E, D, F]; w_down: [E, F, D] (all experts).

  Returns:
    [T, D].
  """
  n_experts = w_gate.shape[0]
  all_out = expert_ffn(jnp.broadcast_to(x[None], (n_experts,) + x.shape), w_gate, w_up, w_down)
  combine = jnp.sum(jax.nn.one_hot(topk_idx, n_experts, dtype=jnp.float32) *
                    topk_weight[..., None], axis=1)  # [T, E]
  return jnp.einsum("etd,te->td", all_out, combine.astype(all_out.dtype))
