"""Dropless grouped SwiGLU experts: rows sorted by expert, computed window by window.

XLA needs static shapes, so the usual JAX MoE pads every expert to a common capacity, and its
cost grows with the most loaded expert (E x max load rows). Here rows are sorted by expert into
segments and a `while` loop walks fixed-size windows of each segment: the work is
sum_e ceil(n_e / W) * W rows, i.e. the real load plus at most W - 1 rows per expert, whatever
the imbalance, and no row is ever dropped. `jax.lax.ragged_dot` would express the same grouped
GEMM, but XLA:CPU lowers it to a dense masked product over all groups (E times the work).

The loop has a data-dependent trip count, which reverse-mode autodiff cannot differentiate, so
the backward pass is hand-written (`jax.custom_vjp`): it walks the same windows, recomputes the
gate/up activations (as DeepSeek-V3 recomputes SwiGLU, report §3.2.3) and accumulates the
weight gradients per expert.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def _zeros(shape, dtype, *like):
  """Zeros with the varying-manual-axes type of `like` (a loop carry inside shard_map must
  have the same type as the body's output)."""
  z = jnp.zeros(shape, dtype)
  vma = frozenset().union(*(_varying_axes(a) for a in like))
  return jax.lax.pcast(z, tuple(sorted(vma)), to="varying") if vma else z


def _varying_axes(a) -> frozenset:
  mat = getattr(jax.typeof(a), "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", ()) or ())


def _silu_grad(g):
  s = jax.nn.sigmoid(g)
  return s * (1.0 + g * (1.0 - s))


def _window_table(seg_len, window):
  n_win = (seg_len + window - 1) // window
  ends = jnp.cumsum(n_win)
  return n_win, ends, ends[-1]


def _locate(i, seg_start, seg_len, n_win, ends, window):
  """Window i -> (segment, first row, rows of the segment inside the window)."""
  g = jnp.searchsorted(ends, i, side="right")
  j = i - (ends[g] - n_win[g])
  return g, seg_start[g] + j * window, jnp.minimum(window, seg_len[g] - j * window)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def grouped_swiglu(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window: int = 128):
  """down_e(silu(up... )): y[r] = FFN_{e(r)}(x[r]) for rows grouped in contiguous segments.

  Args:
    x: [R, D] rows, sorted so that segment g occupies rows [seg_start[g], seg_start[g] +
      seg_len[g]); segments are in increasing start order and do not overlap.
    seg_start, seg_len: [G] int32.
    seg_expert: [G] int32 expert of each segment.
    w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    window: rows per matmul (static).

  Returns:
    [R, D] in x.dtype; rows outside every segment are unspecified (callers mask them).
  """
  return _forward(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window)


def _forward(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window):
  r, d = x.shape
  dt = x.dtype
  xp = jnp.concatenate([x, jnp.zeros((window, d), dt)])
  n_win, ends, total = _window_table(seg_len, window)

  def body(i, y):
    g, start, _ = _locate(i, seg_start, seg_len, n_win, ends, window)
    e = seg_expert[g]
    xw = lax.dynamic_slice_in_dim(xp, start, window)
    h = jax.nn.silu(xw @ w_gate[e].astype(dt)) * (xw @ w_up[e].astype(dt))
    # Rows past the segment's end belong to later segments (or the padding tail): windows run
    # in increasing row order, so the later window overwrites them with the right values.
    return lax.dynamic_update_slice_in_dim(y, h @ w_down[e].astype(dt), start, 0)

  y0 = _zeros((r + window, d), dt, x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down)
  y = lax.fori_loop(0, total, body, y0)
  return y[:r]


def _fwd_rule(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window):
  y = _forward(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window)
  return y, (x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down)


def _bwd_rule(window, res, dy):
  x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down = res
  r, d = x.shape
  dt = x.dtype
  xp = jnp.concatenate([x, jnp.zeros((window, d), dt)])
  dyp = jnp.concatenate([dy.astype(dt), jnp.zeros((window, d), dt)])
  n_win, ends, total = _window_table(seg_len, window)
  rows = jnp.arange(window)

  def body(i, carry):
    dx, dwg, dwu, dwd = carry
    g, start, n_valid = _locate(i, seg_start, seg_len, n_win, ends, window)
    e = seg_expert[g]
    xw = lax.dynamic_slice_in_dim(xp, start, window)
    dyw = jnp.where((rows < n_valid)[:, None], lax.dynamic_slice_in_dim(dyp, start, window), 0)
    wg, wu, wd = w_gate[e].astype(dt), w_up[e].astype(dt), w_down[e].astype(dt)
    pre = xw @ wg
    up = xw @ wu
    act = jax.nn.silu(pre)
    dh = dyw @ wd.T
    d_up = dh * act
    d_pre = dh * up * _silu_grad(pre)
    dwd = dwd.at[e].add(((act * up).T @ dyw).astype(dwd.dtype))
    dwg = dwg.at[e].add((xw.T @ d_pre).astype(dwg.dtype))
    dwu = dwu.at[e].add((xw.T @ d_up).astype(dwu.dtype))
    dx = lax.dynamic_update_slice_in_dim(dx, d_pre @ wg.T + d_up @ wu.T, start, 0)
    return dx, dwg, dwu, dwd

  like = (x, dy, seg_start, seg_len, seg_expert, w_gate, w_up, w_down)
  init = (_zeros((r + window, d), dt, *like), _zeros(w_gate.shape, w_gate.dtype, *like),
          _zeros(w_up.shape, w_up.dtype, *like), _zeros(w_down.shape, w_down.dtype, *like))
  dx, dwg, dwu, dwd = lax.fori_loop(0, total, body, init)
  return dx[:r], None, None, None, dwg, dwu, dwd


grouped_swiglu.defvjp(_fwd_rule, _bwd_rule)
