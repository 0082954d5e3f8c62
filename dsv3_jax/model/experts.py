"""Routed-expert compute: the dropless grouped SwiGLU, in float and in FP8, and the call that
applies each row's expert.

XLA needs static shapes, so the usual JAX MoE pads every expert to a common capacity, and its
cost grows with the most loaded expert (E x max load rows). Here rows are sorted by expert into
segments and a `while` loop walks fixed-size windows of each segment: the work is
sum_e ceil(n_e / W) * W rows, i.e. the real load plus at most W - 1 rows per expert, whatever
the imbalance, and no row is ever dropped. `jax.lax.ragged_dot` would express the same grouped
GEMM, but XLA:CPU lowers it to a dense masked product over all groups (E times the work).

The loop has a data-dependent trip count, which reverse-mode autodiff cannot differentiate, so
the backward pass is hand-written (`jax.custom_vjp`): it walks the same windows with the gate
and up pre-activations saved by the forward pass ([R, F] each) and accumulates the weight
gradients per expert.

The float kernel (`grouped_swiglu`) and the FP8 kernel (`grouped_swiglu_fp8`, report §3.3.2)
share the window loops; they differ only in their GEMMs (`_FLOAT_GEMMS`, `_fp8_gemms`).
`expert_compute` is what the dispatch schedules run on the rows a device receives.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from dsv3_jax.parallel.dispatch import take_rows
from dsv3_jax.quant import fp8 as fp8_lib
from dsv3_jax.vma import sum_to_type_of, zeros_varying_like


def _silu_grad(g):
  s = jax.nn.sigmoid(g)
  return s * (1.0 + g * (1.0 - s))


# --------------------------------------------------------------------------- window loops


class _Gemms(NamedTuple):
  """The four GEMM kinds of a SwiGLU expert, forward and backward.

  forward(a [W, K], w [K, N]) -> [W, N]: the forward products.
  activation(h [W, F]) -> [W, F]: what the down projection sees of silu(gate) * up.
  dgrad(g [W, N], w [K, N]) -> [W, K]: g @ w^T.
  wgrad(a [W, K], g [W, N]) -> [K, N]: a^T @ g (a contraction over the window's rows).
  """

  forward: Callable
  activation: Callable
  dgrad: Callable
  wgrad: Callable


_FLOAT_GEMMS = _Gemms(
    forward=lambda a, w: a @ w.astype(a.dtype),
    activation=lambda h: h,
    dgrad=lambda g, w: g @ w.astype(g.dtype).T,
    wgrad=lambda a, g: a.T @ g,
)


def _window_table(seg_len, window):
  n_win = (seg_len + window - 1) // window
  ends = jnp.cumsum(n_win)
  return n_win, ends, ends[-1]


def _window_loop(seg_start, seg_len, seg_expert, window, body, init):
  """Runs body(expert, first_row, rows_in_segment, carry) -> carry over every window of every
  segment, in increasing row order."""
  n_win, ends, total = _window_table(seg_len, window)

  def step(i, carry):
    g = jnp.searchsorted(ends, i, side="right")
    j = i - (ends[g] - n_win[g])
    start = seg_start[g] + j * window
    return body(seg_expert[g], start, jnp.minimum(window, seg_len[g] - j * window), carry)

  return lax.fori_loop(0, total, step, init)


def _two_level_loop(seg_start, seg_len, seg_expert, window, tail_window, make_body, init):
  """Every segment's rows in windows: `tail_window`-row windows over what is left after its
  full `window`-row windows (first, in increasing row order), then the full windows.

  A tail window may run past its segment's end into later rows; every full window is entirely
  inside its segment and runs after all the tail windows, and later tail windows start further
  on, so each row's last writer is its own window (see `_grouped_forward`). The padding is then
  at most tail_window - 1 rows per expert while most rows go through the large GEMMs.
  `make_body(w)` returns the loop body for windows of w rows.
  """
  if tail_window is None or tail_window >= window:
    return _window_loop(seg_start, seg_len, seg_expert, window, make_body(window), init)
  full = (seg_len // window) * window
  carry = _window_loop(seg_start + full, seg_len - full, seg_expert, tail_window,
                       make_body(tail_window), init)
  return _window_loop(seg_start, full, seg_expert, window, make_body(window), carry)


def pad_rows(rows: int, window: int, tail_window: Optional[int] = None) -> int:
  """Padding rows the window loops need after `rows` sorted rows.

  A tail window (or, with no tail window, any window) may read and write up to its size minus
  one rows past its segment's end, and a `window`-row slice must fit in the buffer even when no
  full window runs.

  Args:
    rows: R, the sorted rows (static int).
    window, tail_window: as `grouped_swiglu`'s (static).

  Returns:
    max(tail window, window - R) rows (int): `grouped_swiglu_padded` takes R + that many rows.
  """
  tail = tail_window if tail_window is not None and tail_window < window else window
  return max(tail, window - rows)


def _pad(x, rows):
  return jnp.concatenate([x, jnp.zeros((rows,) + x.shape[1:], x.dtype)])


def _grouped_forward(xp, segs, w_gate, w_up, w_down, window, gemms, act_dtype, keep_activations,
                     tail_window=None):
  """xp: [R + pad_rows, D], the rows with `pad_rows(R, window, tail_window)` padding rows last.
  Returns y [R + pad_rows, D] in xp.dtype, and when `keep_activations` the gate and up
  pre-activations [R + pad_rows, F] each in `act_dtype`."""
  rp, d = xp.shape
  f = w_gate.shape[-1]
  like = (xp, *segs, w_gate, w_up, w_down)

  def make_body(window):
    return partial(body, window)

  def body(window, e, start, _, carry):
    xw = lax.dynamic_slice_in_dim(xp, start, window)
    gate, up = gemms.forward(xw, w_gate[e]), gemms.forward(xw, w_up[e])
    out = gemms.forward(gemms.activation(jax.nn.silu(gate) * up), w_down[e]).astype(xp.dtype)
    # Rows past the segment's end belong to later segments (or the padding tail): windows run
    # in increasing row order, so the later window overwrites them with the right values.
    out = lax.dynamic_update_slice_in_dim(carry[0], out, start, 0)
    if not keep_activations:
      return (out,)
    return (out, lax.dynamic_update_slice_in_dim(carry[1], gate.astype(act_dtype), start, 0),
            lax.dynamic_update_slice_in_dim(carry[2], up.astype(act_dtype), start, 0))

  init = (zeros_varying_like((rp, d), xp.dtype, *like),)
  if keep_activations:
    init += (zeros_varying_like((rp, f), act_dtype, *like),) * 2
  return _two_level_loop(*segs, window, tail_window, make_body, init)


def _grouped_backward(xp, dyp, gate_all, up_all, segs, w_gate, w_up, w_down, grad_dtype, window,
                      gemms, tail_window=None):
  """(dx [R + pad_rows, D] in xp.dtype, dW_gate, dW_up, dW_down in `grad_dtype`), unsummed
  over devices; xp, dyp, gate_all, up_all: [R + pad_rows, .] as `_grouped_forward`'s.

  Rows of a window outside its segment are zeroed in x, dy and the activation, so they add
  nothing to the weight gradients (and never set an FP8 scale).
  """
  rp, d = xp.shape
  dyp = dyp.astype(xp.dtype)

  def make_body(window):
    return partial(body, window)

  def body(window, e, start, n_valid, carry):
    dx, dwg, dwu, dwd = carry
    valid = (jnp.arange(window) < n_valid)[:, None]
    xw = jnp.where(valid, lax.dynamic_slice_in_dim(xp, start, window), 0)
    dyw = jnp.where(valid, lax.dynamic_slice_in_dim(dyp, start, window), 0)
    pre = lax.dynamic_slice_in_dim(gate_all, start, window)
    up = lax.dynamic_slice_in_dim(up_all, start, window)
    act = jax.nn.silu(pre)
    h = jnp.where(valid, gemms.activation(act * up), 0)  # what the forward's down GEMM saw
    dh = gemms.dgrad(dyw, w_down[e])
    d_up = dh * act
    d_pre = dh * up * _silu_grad(pre)
    dwd = dwd.at[e].add(gemms.wgrad(h, dyw).astype(grad_dtype))
    dwg = dwg.at[e].add(gemms.wgrad(xw, d_pre).astype(grad_dtype))
    dwu = dwu.at[e].add(gemms.wgrad(xw, d_up).astype(grad_dtype))
    dxw = gemms.dgrad(d_pre, w_gate[e]) + gemms.dgrad(d_up, w_up[e])
    return lax.dynamic_update_slice_in_dim(dx, dxw.astype(xp.dtype), start, 0), dwg, dwu, dwd

  like = (xp, dyp, *segs, w_gate, w_up, w_down)
  init = (zeros_varying_like((rp, d), xp.dtype, *like),) + tuple(
      zeros_varying_like(w.shape, grad_dtype, *like) for w in (w_gate, w_up, w_down))
  return _two_level_loop(*segs, window, tail_window, make_body, init)


# --------------------------------------------------------------------------- float kernel


def grouped_swiglu(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window: int = 128,
                   tail_window: Optional[int] = None):
  """y[r] = down_e(silu(gate_e(x[r])) * up_e(x[r])), e = the expert of row r's segment.

  Args:
    x: [R, D] rows, sorted so that segment g occupies rows [seg_start[g], seg_start[g] +
      seg_len[g]); segments are in increasing start order and do not overlap.
    seg_start, seg_len: [G] int32.
    seg_expert: [G] int32 expert of each segment.
    w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    window: rows per matmul (static).
    tail_window: None, or rows per matmul (static, < window) for what is left of each segment
      after its full `window`-row windows: the padded work drops from up to window - 1 to up
      to tail_window - 1 rows per expert, while most rows still run in `window`-row GEMMs.
      The outputs are the same; the weight gradients sum the windows in another order.

  Returns:
    [R, D] in x.dtype; rows outside every segment are unspecified (callers mask them).
  """
  r = x.shape[0]
  xp = _pad(x, pad_rows(r, window, tail_window))
  return grouped_swiglu_padded(xp, seg_start, seg_len, seg_expert, w_gate, w_up, w_down,
                               window, tail_window)[:r]


@partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def grouped_swiglu_padded(xp, seg_start, seg_len, seg_expert, w_gate, w_up, w_down,
                          window: int = 128, tail_window: Optional[int] = None):
  """`grouped_swiglu` on rows that carry their own padding.

  `expert_compute` gathers its sorted rows straight into this shape, so neither pass copies
  [R, D] rows into a padded buffer or slices the padding off again (the cotangent arrives
  padded too).

  Args:
    xp: [R + pad_rows(R, window, tail_window), D] rows, sorted as for `grouped_swiglu`; the
      last pad_rows rows belong to no segment (the window loops read them; zeros keep them
      finite).
    seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window, tail_window: as
      `grouped_swiglu`'s.

  Returns:
    [R + pad_rows, D] in xp.dtype; rows outside every segment are unspecified.
  """
  segs = (seg_start, seg_len, seg_expert)
  return _grouped_forward(xp, segs, w_gate, w_up, w_down, window, _FLOAT_GEMMS, xp.dtype,
                          keep_activations=False, tail_window=tail_window)[0]


def _fwd_rule(xp, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window, tail_window):
  segs = (seg_start, seg_len, seg_expert)
  y, gate, up = _grouped_forward(xp, segs, w_gate, w_up, w_down, window, _FLOAT_GEMMS,
                                 xp.dtype, keep_activations=True, tail_window=tail_window)
  return y, (xp, gate, up, segs, w_gate, w_up, w_down)


def _bwd_rule(window, tail_window, res, dy):
  xp, gate, up, segs, w_gate, w_up, w_down = res
  dx, dwg, dwu, dwd = _grouped_backward(xp, dy, gate, up, segs, w_gate, w_up, w_down,
                                        w_gate.dtype, window, _FLOAT_GEMMS, tail_window)
  return (dx, None, None, None, sum_to_type_of(dwg, w_gate), sum_to_type_of(dwu, w_up),
          sum_to_type_of(dwd, w_down))


grouped_swiglu_padded.defvjp(_fwd_rule, _bwd_rule)


# --------------------------------------------------------------------------- FP8 kernel
# DeepSeek-V3 report §3.3.2, Figure 6 applied to each expert's three GEMMs.


def _qdq_rows(a, recipe, fmt, axis=-1):
  """Quantize-dequantize float32 `a` in 1 x tile tiles along `axis` (float32 out)."""
  return fp8_lib.qdq_tiles(a, tile=recipe.tile, fmt=fmt, pow2_scale=recipe.pow2_scale,
                           axis=axis)


def _fp8_gemms(recipe) -> _Gemms:
  """`fp8_matmul`'s recipe per GEMM (the weights arrive block-quantized already)."""
  fwd, bwd = recipe.fmt_forward, recipe.fmt_backward
  gemm = lambda a, b: fp8_lib.gemm(a, b, recipe)
  return _Gemms(
      forward=gemm,
      activation=lambda h: _qdq_rows(h, recipe, fwd),
      dgrad=lambda g, w: gemm(_qdq_rows(g, recipe, bwd), w.T),
      wgrad=lambda a, g: gemm(_qdq_rows(a, recipe, fwd, axis=0).T,
                              _qdq_rows(g, recipe, bwd, axis=0)),
  )


def _quantized_weights(w_gate, w_up, w_down, recipe):
  """Every expert's weights, block-quantized 128 x 128 (per expert) and dequantized, float32."""
  q = lambda w: fp8_lib.qdq_blocks(w.astype(jnp.float32), block=recipe.block,
                                   fmt=recipe.fmt_forward, pow2_scale=recipe.pow2_scale)
  return q(w_gate), q(w_up), q(w_down)


@partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def grouped_swiglu_fp8(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down,
                       window: int = 128, recipe=None):
  """`grouped_swiglu` with the three expert GEMMs in FP8 (fine-grained scaling, report §3.3.2).

  Per expert, each GEMM follows `quant.fp8.fp8_matmul`'s recipe:

  * forward: the rows x are quantized in 1 x `recipe.tile` tiles along D, each expert's
    gate / up / down weights in `recipe.block` x `recipe.block` blocks, and the SwiGLU
    activation h = silu(x W_gate) * (x W_up) (computed in float32 from the FP32-accumulated
    GEMMs) in 1 x tile tiles along F before the down projection;
  * backward: the incoming output gradient dy is quantized in 1 x tile tiles along D for the
    dgrad dh = dy W_down^T, the SwiGLU input gradients in 1 x tile tiles along F for
    dx = d_pre W_gate^T + d_up W_up^T (the forward's FP8 weights, transposed); for the wgrad
    GEMMs (dW = A^T dY, a contraction over an expert's rows) both operands are re-quantized in
    tiles along the rows, i.e. per window of the expert's rows: with `window` equal to
    `recipe.tile` (the default 128) these are the 128-row tiles `fp8_matmul` would use on the
    expert's rows, so the result equals applying `fp8_matmul` to each expert's three GEMMs.
    Rows of a window outside its segment are zeroed first, so they never set a scale.

  The gate / up pre-activations are kept from the forward pass (float32 [R, F] each, as
  `grouped_swiglu` keeps them), not recomputed. The products are accumulated in float32 (or
  in the emulated tensor-core accumulator if `recipe.accumulator_mantissa_bits` is set).
  Master weights and their gradients stay in the weights' dtype (float32); activations are
  cast to float32 for the quantization, so any compute dtype works.

  Args:
    x: [R, D] rows sorted by segment (as for `grouped_swiglu`), any float dtype.
    seg_start, seg_len, seg_expert: [G] int32 (see `grouped_swiglu`).
    w_gate, w_up: [E, D, F]; w_down: [E, F, D], float32 master weights.
    window: rows per matmul (static).
    recipe: `quant.fp8.Fp8Recipe` (static); None = `Fp8Recipe()`.

  Returns:
    [R, D] in x.dtype; rows outside every segment are unspecified (callers mask them).
  """
  return _fp8_fwd_rule(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window,
                       recipe, keep_activations=False)[0]


def _fp8_fwd_rule(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window, recipe,
                  keep_activations=True):
  recipe = fp8_lib.Fp8Recipe() if recipe is None else recipe
  segs = (seg_start, seg_len, seg_expert)
  pad = pad_rows(x.shape[0], window)
  xq = _pad(_qdq_rows(x.astype(jnp.float32), recipe, recipe.fmt_forward), pad)  # [R + pad, D]
  wg, wu, wd = _quantized_weights(w_gate, w_up, w_down, recipe)
  out = _grouped_forward(xq, segs, wg, wu, wd, window, _fp8_gemms(recipe), jnp.float32,
                         keep_activations)
  y = out[0][:x.shape[0]].astype(x.dtype)
  if not keep_activations:
    return y, None
  # Residuals: the dequantized FP8 rows and weights in float32 (the same numbers as cached FP8
  # codes + scales; the memory saving is not emulated) and the gate / up pre-activations (as
  # `grouped_swiglu` keeps them). Zero-size arrays carry the primal dtypes.
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w_gate.dtype))
  return y, (xq, out[1], out[2], segs, wg, wu, wd, dtypes)


def _fp8_bwd_rule(window, recipe, res, dy):
  recipe = fp8_lib.Fp8Recipe() if recipe is None else recipe
  xq, gate, up, segs, wg, wu, wd, (x_like, w_like) = res
  pad = xq.shape[0] - dy.shape[0]
  dx, dwg, dwu, dwd = _grouped_backward(xq, _pad(dy.astype(jnp.float32), pad), gate, up,
                                        segs, wg, wu, wd, w_like.dtype, window,
                                        _fp8_gemms(recipe))
  # wg, wu, wd vary over the same mesh axes as the primal weights.
  return (dx[:dy.shape[0]].astype(x_like.dtype), None, None, None, sum_to_type_of(dwg, wg),
          sum_to_type_of(dwu, wu), sum_to_type_of(dwd, wd))


grouped_swiglu_fp8.defvjp(_fp8_fwd_rule, _fp8_bwd_rule)


# --------------------------------------------------------------------------- expert call


# Float kernel: rows per matmul for each expert's rows past its full 128-row windows (measured
# on XLA:CPU at the tiny config's skewed loads: results/profile_step.md).
FLOAT_TAIL_WINDOW = 32


def expert_compute(rows: jax.Array, expert: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, *, window: int = 128, fp8_recipe=None,
                   tail_window: Optional[int] = FLOAT_TAIL_WINDOW) -> jax.Array:
  """Applies each row's local expert, at the cost of the valid rows only.

  Rows are stably sorted by expert (invalid rows last; gathered with the kernel's padding
  rows after them), run through `grouped_swiglu_padded` (or `grouped_swiglu_fp8` when
  `fp8_recipe` is set, report §3.3), and put back in their original order. This is the
  `experts` callable the dispatch schedules run on received rows.

  Args:
    rows: [N, D] (compute dtype).
    expert: [N] int32 local expert id in [0, E_l), or -1 for an empty buffer row.
    w_gate, w_up: [E_l, D, F]; w_down: [E_l, F, D].
    window: rows per matmul in the grouped kernel.
    fp8_recipe: a `quant.fp8.Fp8Recipe` to run the expert GEMMs in FP8, or None.
    tail_window: float kernel only: `grouped_swiglu`'s tail_window (None = every window has
      `window` rows). The FP8 kernel always uses `window`-row windows (its weight-gradient
      tiles are the windows).

  Returns:
    [N, D]: FFN_{expert[r]}(rows[r]), zero where expert[r] < 0.
  """
  n = rows.shape[0]
  e_local = w_gate.shape[0]
  key = jnp.where(expert >= 0, expert, e_local).astype(jnp.int32)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  position = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32),
                                                       unique_indices=True)
  bounds = jnp.searchsorted(key[order], jnp.arange(e_local + 1, dtype=jnp.int32), side="left")
  seg_start, seg_len = bounds[:-1], bounds[1:] - bounds[:-1]
  segs = (seg_start.astype(jnp.int32), seg_len.astype(jnp.int32),
          jnp.arange(e_local, dtype=jnp.int32))
  if fp8_recipe is None:
    # The sorted rows are gathered with the kernel's padding rows (index -1: zeros) after them.
    pad = jnp.full((pad_rows(n, window, tail_window),), -1, jnp.int32)
    order = jnp.concatenate([order, pad])
    sorted_rows = take_rows(rows, order, position[:, None])
    out = grouped_swiglu_padded(sorted_rows, *segs, w_gate, w_up, w_down, window, tail_window)
  else:
    sorted_rows = take_rows(rows, order, position[:, None])
    out = grouped_swiglu_fp8(sorted_rows, *segs, w_gate, w_up, w_down, window, fp8_recipe)
  out = take_rows(out, position, order[:, None])
  return jnp.where((expert >= 0)[:, None], out, jnp.zeros((), out.dtype))


def bind_experts(w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *, window: int = 128,
                 fp8_recipe=None):
  """The `parallel.dispatch.ExpertsFn` of these experts: (rows [N, D], local expert id [N])
  -> [N, D], i.e. `expert_compute` with the weights (and the FP8 recipe) bound."""
  return lambda rows, expert: expert_compute(rows, expert, w_gate, w_up, w_down, window=window,
                                             fp8_recipe=fp8_recipe)


# --------------------------------------------------------------------------- decode-sized calls
# A decode step routes only batch x k rows (128 at batch 32 over 32 experts, ~4 per expert):
# 128-row windows would compute ~30x the real rows, so serving picks the window from the load,
# and when every expert gets a few rows runs them as one batched product (forward only).


def decode_window(rows: int, n_experts: int) -> int:
  """Grouped-kernel window for `rows` routed rows over `n_experts` experts: the power of two
  >= the mean load per expert, clipped to [4, 128] (static)."""
  mean = max(1, -(-rows // n_experts))
  w = 4
  while w < mean and w < 128:
    w *= 2
  return w


def capacity_expert_compute(rows: jax.Array, expert: jax.Array, w_gate: jax.Array,
                            w_up: jax.Array, w_down: jax.Array, *, capacity: int,
                            window: int) -> jax.Array:
  """`expert_compute`'s result, faster when most experts get a few rows (batched decode).

  The first `capacity` rows of each expert go through one batched product per projection,
  [E, capacity, D] x [E, D, F] (every expert's weights read once, no loop); the rows beyond
  (an expert with more than `capacity` rows) go through `expert_compute` with `window`-row
  windows, whose loop then has (almost) nothing to do. Dropless for any load. Forward only
  (serving).

  Args:
    rows: [N, D] (compute dtype); expert: [N] int32 in [0, E), -1 = no expert.
    w_gate, w_up: [E, D, F]; w_down: [E, F, D] (cast to rows.dtype).
    capacity: rows per expert in the batched part (static).
    window: window of the overflow loop (static).

  Returns:
    [N, D] in rows.dtype, zero where expert < 0.
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
                  lambda: expert_compute(rows, spill, w_gate, w_up, w_down, window=window,
                                         tail_window=None),
                  lambda: jnp.zeros((n, d), dt))
  return jnp.where(kept[:, None], y, over)
