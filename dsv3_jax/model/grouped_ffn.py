"""Dropless grouped SwiGLU experts: rows sorted by expert, computed window by window.

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

`grouped_swiglu_fp8` is the same loop with the three expert GEMMs in FP8 (report §3.3.2); the
float path `grouped_swiglu` is untouched by it.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from dsv3_jax.quant import fp8 as fp8_lib


def _zeros(shape, dtype, *like):
  """Zeros with the varying-manual-axes type of `like` (a loop carry inside shard_map must
  have the same type as the body's output)."""
  z = jnp.zeros(shape, dtype)
  vma = frozenset().union(*(_varying_axes(a) for a in like))
  return jax.lax.pcast(z, tuple(sorted(vma)), to="varying") if vma else z


def _varying_axes(a) -> frozenset:
  mat = getattr(jax.typeof(a), "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", ()) or ())


def _sum_to_type_of(g, primal):
  """Sums a cotangent over the manual axes it varies along but its primal does not: a weight
  replicated across data-parallel groups gets the sum of every group's gradient (what autodiff
  does for an invariant input; a custom VJP must do it itself)."""
  extra = tuple(sorted(_varying_axes(g) - _varying_axes(primal)))
  return jax.lax.psum(g, extra) if extra else g


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
  """y[r] = down_e(silu(gate_e(x[r])) * up_e(x[r])), e = the expert of row r's segment.

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
  return _forward(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window,
                  keep_activations=False)[0][:x.shape[0]]


def _forward(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window, keep_activations):
  """y [R, D], and when `keep_activations` the gate and up pre-activations [R, F] each."""
  r, d = x.shape
  f = w_gate.shape[-1]
  dt = x.dtype
  xp = jnp.concatenate([x, jnp.zeros((window, d), dt)])
  n_win, ends, total = _window_table(seg_len, window)
  like = (x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down)

  def body(i, carry):
    g, start, _ = _locate(i, seg_start, seg_len, n_win, ends, window)
    e = seg_expert[g]
    xw = lax.dynamic_slice_in_dim(xp, start, window)
    gate = xw @ w_gate[e].astype(dt)
    up = xw @ w_up[e].astype(dt)
    # Rows past the segment's end belong to later segments (or the padding tail): windows run
    # in increasing row order, so the later window overwrites them with the right values.
    out = lax.dynamic_update_slice_in_dim(carry[0], (jax.nn.silu(gate) * up) @ w_down[e].astype(dt),
                                          start, 0)
    if not keep_activations:
      return (out,)
    return (out, lax.dynamic_update_slice_in_dim(carry[1], gate, start, 0),
            lax.dynamic_update_slice_in_dim(carry[2], up, start, 0))

  init = (_zeros((r + window, d), dt, *like),)
  if keep_activations:
    init += (_zeros((r + window, f), dt, *like), _zeros((r + window, f), dt, *like))
  return lax.fori_loop(0, total, body, init)


def _fwd_rule(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window):
  y, gate, up = _forward(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window,
                         keep_activations=True)
  return y[:x.shape[0]], (x, gate, up, seg_start, seg_len, seg_expert, w_gate, w_up, w_down)


def _bwd_rule(window, res, dy):
  x, gate_all, up_all, seg_start, seg_len, seg_expert, w_gate, w_up, w_down = res
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
    pre = lax.dynamic_slice_in_dim(gate_all, start, window)
    up = lax.dynamic_slice_in_dim(up_all, start, window)
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
  return (dx[:r], None, None, None, _sum_to_type_of(dwg, w_gate), _sum_to_type_of(dwu, w_up),
          _sum_to_type_of(dwd, w_down))


grouped_swiglu.defvjp(_fwd_rule, _bwd_rule)


# ------------------------------------------------------------------------------------------
# FP8 variant (DeepSeek-V3 report §3.3.2, Figure 6 applied to each expert's three GEMMs).


def _qdq_rows(a, recipe, fmt, axis=-1):
  """Quantize-dequantize float32 `a` in 1 x tile tiles along `axis` (float32 out)."""
  return fp8_lib.qdq_tiles(a, tile=recipe.tile, fmt=fmt, pow2_scale=recipe.pow2_scale,
                           axis=axis)


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
  Master weights and their
  gradients stay in the weights' dtype (float32); activations are cast to float32 for the
  quantization, so any compute dtype works.

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


def _fp8_forward(xq, seg_start, seg_len, seg_expert, wg, wu, wd, window, recipe, dt,
                 keep_activations):
  """y [R + window, D] in dt, and when `keep_activations` the float32 gate and up
  pre-activations [R + window, F] each (from the FP8 operands)."""
  r, d = xq.shape
  f = wg.shape[-1]
  xp = jnp.concatenate([xq, jnp.zeros((window, d), xq.dtype)])
  n_win, ends, total = _window_table(seg_len, window)
  gemm = lambda a, b: fp8_lib._gemm(a, b, recipe)  # pylint: disable=protected-access
  like = (xq, seg_start, seg_len, seg_expert, wg, wu, wd)

  def body(i, carry):
    g, start, _ = _locate(i, seg_start, seg_len, n_win, ends, window)
    e = seg_expert[g]
    xw = lax.dynamic_slice_in_dim(xp, start, window)
    gate, up = gemm(xw, wg[e]), gemm(xw, wu[e])
    out = gemm(_qdq_rows(jax.nn.silu(gate) * up, recipe, recipe.fmt_forward), wd[e]).astype(dt)
    # As in `_forward`: rows past the segment's end are overwritten by later windows.
    out = lax.dynamic_update_slice_in_dim(carry[0], out, start, 0)
    if not keep_activations:
      return (out,)
    return (out, lax.dynamic_update_slice_in_dim(carry[1], gate, start, 0),
            lax.dynamic_update_slice_in_dim(carry[2], up, start, 0))

  init = (_zeros((r + window, d), dt, *like),)
  if keep_activations:
    init += (_zeros((r + window, f), jnp.float32, *like),) * 2
  return lax.fori_loop(0, total, body, init)


def _fp8_fwd_rule(x, seg_start, seg_len, seg_expert, w_gate, w_up, w_down, window, recipe,
                  keep_activations=True):
  recipe = fp8_lib.Fp8Recipe() if recipe is None else recipe
  xq = _qdq_rows(x.astype(jnp.float32), recipe, recipe.fmt_forward)  # [R, D]
  wg, wu, wd = _quantized_weights(w_gate, w_up, w_down, recipe)
  out = _fp8_forward(xq, seg_start, seg_len, seg_expert, wg, wu, wd, window, recipe, x.dtype,
                     keep_activations)
  y = out[0][:x.shape[0]]
  if not keep_activations:
    return y, None
  # Residuals: the dequantized FP8 rows and weights in float32 (the same numbers as cached FP8
  # codes + scales; the memory saving is not emulated) and the gate / up pre-activations (as
  # `grouped_swiglu` keeps them). Zero-size arrays carry the primal dtypes.
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w_gate.dtype))
  return y, (xq, out[1], out[2], seg_start, seg_len, seg_expert, wg, wu, wd, dtypes)


def _fp8_bwd_rule(window, recipe, res, dy):
  recipe = fp8_lib.Fp8Recipe() if recipe is None else recipe
  xq, gate_all, up_all, seg_start, seg_len, seg_expert, wg, wu, wd, (x_like, w_like) = res
  r, d = xq.shape
  f32 = jnp.float32
  xp = jnp.concatenate([xq, jnp.zeros((window, d), f32)])
  dyp = jnp.concatenate([dy.astype(f32), jnp.zeros((window, d), f32)])
  n_win, ends, total = _window_table(seg_len, window)
  rows = jnp.arange(window)
  gemm = lambda a, b: fp8_lib._gemm(a, b, recipe)  # pylint: disable=protected-access
  fwd, bwd = recipe.fmt_forward, recipe.fmt_backward
  along_rows = lambda a, fmt: _qdq_rows(a, recipe, fmt, axis=0)  # wgrad operands

  def body(i, carry):
    dx, dwg, dwu, dwd = carry
    g, start, n_valid = _locate(i, seg_start, seg_len, n_win, ends, window)
    e = seg_expert[g]
    valid = (rows < n_valid)[:, None]
    xw = jnp.where(valid, lax.dynamic_slice_in_dim(xp, start, window), 0.0)
    dyw = jnp.where(valid, lax.dynamic_slice_in_dim(dyp, start, window), 0.0)
    pre = lax.dynamic_slice_in_dim(gate_all, start, window)
    up = lax.dynamic_slice_in_dim(up_all, start, window)
    act = jax.nn.silu(pre)
    hq = jnp.where(valid, _qdq_rows(act * up, recipe, fwd), 0.0)  # the forward's FP8 h
    # Down projection: dgrad with dy in tiles along D, wgrad with both operands along rows.
    dh = gemm(_qdq_rows(dyw, recipe, bwd), wd[e].T)
    dwd = dwd.at[e].add(gemm(along_rows(hq, fwd).T, along_rows(dyw, bwd)).astype(dwd.dtype))
    d_up = dh * act
    d_pre = dh * up * _silu_grad(pre)
    dwg = dwg.at[e].add(gemm(along_rows(xw, fwd).T, along_rows(d_pre, bwd)).astype(dwg.dtype))
    dwu = dwu.at[e].add(gemm(along_rows(xw, fwd).T, along_rows(d_up, bwd)).astype(dwu.dtype))
    dxw = (gemm(_qdq_rows(d_pre, recipe, bwd), wg[e].T) +
           gemm(_qdq_rows(d_up, recipe, bwd), wu[e].T))
    dx = lax.dynamic_update_slice_in_dim(dx, dxw, start, 0)
    return dx, dwg, dwu, dwd

  like = (xq, dy, seg_start, seg_len, seg_expert, wg, wu, wd)
  init = (_zeros((r + window, d), f32, *like), _zeros(wg.shape, w_like.dtype, *like),
          _zeros(wu.shape, w_like.dtype, *like), _zeros(wd.shape, w_like.dtype, *like))
  dx, dwg, dwu, dwd = lax.fori_loop(0, total, body, init)
  # wg, wu, wd vary over the same mesh axes as the primal weights.
  return (dx[:r].astype(x_like.dtype), None, None, None, _sum_to_type_of(dwg, wg),
          _sum_to_type_of(dwu, wu), _sum_to_type_of(dwd, wd))


grouped_swiglu_fp8.defvjp(_fp8_fwd_rule, _fp8_bwd_rule)
