"""DeepSeekMoE for serving on one device: the model's router, shared and routed experts, with a
grouped expert kernel whose window fits decode batches.

The training kernel walks each expert's rows in windows of 128; a decode step routes only
batch x k rows (128 at batch 32 over 32 experts, ~4 per expert), so 128-row windows would
compute ~30x the real rows. Here the window follows the load (4 .. 128 rows, a static choice
per shape bucket): the work is sum_e ceil(n_e / W) * W rows, whatever the imbalance. When
every expert gets a few rows (batched decode), `capacity_experts` runs the first rows of each
expert as one batched product (each expert's weights read once, no loop) and only the overflow
through the loop. Both are dropless: no capacity ever drops a row. Routing, gate values
and the shared experts are the module's own (`DeepSeekMoE.gate`, report §2.1.2 eqs. 12-16).
On a mesh the engine calls `DeepSeekMoE.__call__` instead (the dispatch schedules).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dsv3_jax.model.moe import DeepSeekMoE


def decode_window(rows: int, n_experts: int) -> int:
  """Grouped-kernel window for `rows` routed rows: the power of two >= the mean load per
  expert, clipped to [4, 128]."""
  mean = max(1, -(-rows // n_experts))
  w = 4
  while w < mean and w < 128:
    w *= 2
  return w


def grouped_experts(rows: jax.Array, expert: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                    w_down: jax.Array, window: int) -> jax.Array:
  """y[r] = down_e(silu(gate_e(x_r)) * up_e(x_r)) with e = expert[r]; 0 where expert[r] < 0.

  Args:
    rows: [N, D] compute dtype.
    expert: [N] int32 expert ids in [0, E), -1 = no expert.
    w_gate, w_up: [E, D, F]; w_down: [E, F, D] (float32 master weights, cast to rows.dtype).
    window: rows per matmul (static).

  Returns:
    [N, D] in rows.dtype.
  """
  n, d = rows.shape
  e_count = w_gate.shape[0]
  dt = rows.dtype
  key = jnp.where(expert >= 0, expert, e_count).astype(jnp.int32)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  counts = jnp.bincount(key, length=e_count + 1)[:e_count].astype(jnp.int32)
  starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)
  n_win = (counts + window - 1) // window
  ends = jnp.cumsum(n_win).astype(jnp.int32)
  xs = jnp.concatenate([rows[order], jnp.zeros((window, d), dt)])

  def body(i, out):
    e = jnp.sum(ends <= i).astype(jnp.int32)  # the segment holding window i
    j = i - (ends[e] - n_win[e])
    start = starts[e] + j * window
    x = lax.dynamic_slice(xs, (start, 0), (window, d))
    h = jax.nn.silu(x @ w_gate[e].astype(dt)) * (x @ w_up[e].astype(dt))
    y = h @ w_down[e].astype(dt)
    keep = (jnp.arange(window) + j * window < counts[e])[:, None]
    cur = lax.dynamic_slice(out, (start, 0), (window, d))
    return lax.dynamic_update_slice(out, jnp.where(keep, y, cur), (start, 0))

  out = lax.fori_loop(0, ends[-1], body, jnp.zeros((n + window, d), dt))[:n]
  out = jnp.zeros((n, d), dt).at[order].set(out, unique_indices=True)
  return jnp.where((expert >= 0)[:, None], out, jnp.zeros((), dt))


def capacity_experts(rows: jax.Array, expert: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                     w_down: jax.Array, capacity: int, window: int) -> jax.Array:
  """Same result as `grouped_experts`, faster when most experts get a few rows (decode).

  The first `capacity` rows of each expert go through one batched product per projection,
  [E, capacity, D] x [E, D, F] (every expert's weights read once, no loop); the rows beyond
  (an expert with more than `capacity` rows) go through `grouped_experts`, whose loop then
  has (almost) nothing to do. Dropless for any load.

  Args:
    rows, expert, w_gate, w_up, w_down: see `grouped_experts`.
    capacity: rows per expert in the batched part (static).
    window: window of the overflow loop (static).

  Returns:
    [N, D] in rows.dtype.
  """
  n, d = rows.shape
  e_count = w_gate.shape[0]
  dt = rows.dtype
  onehot = expert[:, None] == jnp.arange(e_count, dtype=expert.dtype)[None, :]  # [N, E]
  rank = jnp.sum(jnp.where(onehot, jnp.cumsum(onehot, axis=0, dtype=jnp.int32) - 1, 0), axis=1)
  kept = (expert >= 0) & (rank < capacity)
  slot = jnp.where(kept, expert * capacity + rank, e_count * capacity)
  buf = jnp.zeros((e_count * capacity + 1, d), dt).at[slot].set(rows, mode="drop")
  buf = buf[:e_count * capacity].reshape(e_count, capacity, d)
  h = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, w_gate.astype(dt)))
       * jnp.einsum("ecd,edf->ecf", buf, w_up.astype(dt)))
  y = jnp.einsum("ecf,efd->ecd", h, w_down.astype(dt)).reshape(e_count * capacity, d)
  y = jnp.concatenate([y, jnp.zeros((1, d), dt)])[slot]
  spill = jnp.where((expert >= 0) & ~kept, expert, -1)
  over = lax.cond(jnp.any(spill >= 0),
                  lambda: grouped_experts(rows, spill, w_gate, w_up, w_down, window),
                  lambda: jnp.zeros((n, d), dt))
  return jnp.where(kept[:, None], y, over)


def local_moe(moe: DeepSeekMoE, x: jax.Array, mask: jax.Array) -> jax.Array:
  """The MoE layer on one device (all experts local).

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
  if n_experts <= rows <= 16 * n_experts:  # decode batches: a few rows per expert
    capacity = decode_window(2 * rows, n_experts)
    out = capacity_experts(jnp.repeat(tokens, k, axis=0), idx, *weights, capacity, 4)
  else:  # one sequence (few experts touched) or a prefill (many rows per expert)
    out = grouped_experts(jnp.repeat(tokens, k, axis=0), idx, *weights,
                          decode_window(rows, n_experts))
  y = jnp.einsum("tkd,tk->td", out.reshape(b * s, k, d), routing.topk_weight.astype(out.dtype))
  y = y.reshape(b, s, d)
  if moe.shared_experts is not None:
    y = y + moe.shared_experts(x)
  return y
