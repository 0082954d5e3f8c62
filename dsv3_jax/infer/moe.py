"""DeepSeekMoE for serving on one device: the model's router, shared and routed experts, with the
routed experts run by decode-sized calls.

A decode step routes only batch x k rows, so the expert window follows the load
(`model.experts.decode_window`), and when every expert gets a few rows (batched decode) one
batched product per projection runs every expert's first rows without a loop
(`sorted_capacity_compute`: the assignments sorted by expert, the [E, capacity, D] buffer built
and read back by gathers only; an overflow loop keeps it dropless). Otherwise (one sequence, few
experts touched; or a prefill, many rows per expert) the grouped kernel `expert_compute` runs.
Both are dropless. Routing, gate values and the shared experts are the module's own
(`DeepSeekMoE.gate`, report §2.1.2 eqs. 12-16). On a mesh the engine calls
`DeepSeekMoE.__call__` instead (the dispatch schedules).

Measured alternative, not used: every expert on every token as two plain GEMMs (gates zero
for the unchosen experts) does E / k = 8x the routed FLOPs at the tiny config, and XLA:CPU runs
[32, 256] x [256, 4096] at about the FLOP rate of the batched [32, 8, 256] x [32, 256, 128]
product, so it was slower than the batched-capacity call at batch 32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dsv3_jax.model.experts import decode_window, expert_compute
from dsv3_jax.model.moe import DeepSeekMoE


def sorted_capacity_compute(tokens: jax.Array, idx: jax.Array, w_gate: jax.Array,
                            w_up: jax.Array, w_down: jax.Array, *, capacity: int,
                            window: int) -> jax.Array:
  """Every (token, choice) pair's expert output, with the experts' first `capacity` rows run
  as one batched product per projection, built by gathers only.

  The same result as `capacity_expert_compute` on the token copies, without its scatter into a
  zero-filled buffer and its running count of rows per expert: the assignments are sorted by
  expert (a stable argsort of T x k ids), slot (e, c) of the [E, capacity, D] buffer gathers
  the token of the c-th assignment of expert e (a slot past the expert's rows gathers some real
  token, whose output is never read), and each kept assignment gathers its output back by its
  rank within the expert. Assignments past `capacity` go through `expert_compute` (`window`-row
  windows) under a `lax.cond`, so the call is dropless for any load. Forward only (serving).

  Args:
    tokens: [T, D] (compute dtype).
    idx: [T, k] int32 chosen experts, -1 = none.
    w_gate, w_up: [E, D, F]; w_down: [E, F, D] (cast to tokens.dtype).
    capacity: rows per expert in the batched part (static).
    window: window of the overflow loop (static).

  Returns:
    [T, k, D] in tokens.dtype: FFN_{idx[t, j]}(tokens[t]), zero where idx < 0.
  """
  t, k = idx.shape
  d = tokens.shape[1]
  e_count = w_gate.shape[0]
  dt = tokens.dtype
  n = t * k
  key = jnp.where(idx >= 0, idx, e_count).reshape(n).astype(jnp.int32)  # [N]
  order = jnp.argsort(key, stable=True).astype(jnp.int32)  # assignments, grouped by expert
  start = jnp.searchsorted(key[order], jnp.arange(e_count + 1, dtype=jnp.int32), side="left")
  slot_src = order[jnp.minimum(start[:e_count, None] + jnp.arange(capacity)[None, :], n - 1)]
  buf = tokens[slot_src // k]  # [E, C, D]
  h = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, w_gate.astype(dt)))
       * jnp.einsum("ecd,edf->ecf", buf, w_up.astype(dt)))
  y = jnp.einsum("ecf,efd->ecd", h, w_down.astype(dt)).reshape(e_count * capacity, d)
  rank = jnp.argsort(order).astype(jnp.int32) - start[key]  # [N] row within its expert
  kept = (key < e_count) & (rank < capacity)
  spill = jnp.where((key < e_count) & ~kept, key, -1)
  over = lax.cond(jnp.any(spill >= 0),
                  lambda: expert_compute(jnp.repeat(tokens, k, axis=0), spill, w_gate, w_up,
                                         w_down, window=window, tail_window=None),
                  lambda: jnp.zeros((n, d), dt))
  out = jnp.where(kept[:, None], y[jnp.where(kept, key * capacity + rank, 0)], over)
  return out.reshape(t, k, d)


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
  idx = jnp.where(mask.reshape(-1, 1), routing.topk_idx, -1)
  w = moe.experts
  rows, n_experts = b * s * k, w.gate_proj.shape[0]
  weights = (w.gate_proj[...], w.up_proj[...], w.down_proj[...])
  if n_experts <= rows <= 16 * n_experts:  # decode batches: a few rows per expert
    out = sorted_capacity_compute(tokens, idx, *weights,
                                  capacity=decode_window(2 * rows, n_experts), window=4)
  else:  # one sequence (few experts touched) or a prefill (many rows per expert)
    out = expert_compute(jnp.repeat(tokens, k, axis=0), idx.reshape(-1), *weights,
                         window=decode_window(rows, n_experts),
                         tail_window=None).reshape(b * s, k, d)
  y = jnp.einsum("tkd,tk->td", out, routing.topk_weight.astype(out.dtype)).reshape(b, s, d)
  if moe.shared_experts is not None:
    y = y + moe.shared_experts(x)
  return y
