"""The training step: the optimizer, one jitted train step and the eval step, at every size.

One step (DESIGN.md "Data flow"): data -> model (+ MTP) -> loss -> grads -> optax update ->
auxiliary-loss-free bias update from the step's per-expert loads (padding excluded) -> metrics.
`make_train_step` builds it for any model with DeepSeekMoE layers and any loss (experiments
train a single MoE layer with it); `make_step_fns` builds the language-model train and eval
steps of `trainer.train`.

On a mesh the forward and backward passes run per device inside one `jax.shard_map` over the
mesh axes (`node`, `gpu`, and `replica` with EP groups over a subset of nodes): each device holds
its share of the batch and its experts, the MoE dispatch uses explicit all_to_alls. How the
gradients of replicated parameters are summed over devices (`grad_sum`, one of `GRAD_SUMS`):

* "mesh": by shard_map's transpose, one all-reduce over every device of the mesh; the optimizer
  update runs on the global arrays (GSPMD). (Leaving the dense parts to GSPMD instead of
  shard_map made it insert all-gathers of activations on the emulated mesh.)
* "per_axis": replicated parameters are cast to device-varying before differentiating and their
  gradients summed over one mesh axis at a time (`gpu` first, then `node`, then `replica`); the
  loss metrics, the global gradient norm (clipping), the optimizer and the bias update run in the
  same shard_map, so no collective of the step spans more than one mesh axis (except the `flat`
  schedule's own all_to_all over (`node`, `gpu`)). Past 256 devices the emulation runs as several
  processes, where a reduction over one N-member group needs N - 1 sockets per device and does
  not fit the open-file limit at 2048 (README, "More than 256 devices"; results/scale_2048.md);
  real clusters reduce hierarchically too. Equal to "mesh" up to float summation order.
* "auto": "per_axis" above `PER_AXIS_ABOVE_DEVICES` devices, else "mesh".

With `zero1` (train.shard_optimizer_state; `train/zero1.py`, V3 report §3.2) the optimizer
state of each parameter is partitioned over the devices that hold that parameter: its gradient
is reduce-scattered to the state slices (per_axis: one mesh axis at a time), each device updates
its slice, and the new parameters are all-gathered (per_axis: axis by axis, in the shard_map).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax import xla_cpu
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.moe import DeepSeekMoE
from dsv3_jax.train import zero1 as zero1_lib
from dsv3_jax.train.losses import bias_update, compute_losses, make_batch
from dsv3_jax.train.zero1 import optimizer_state_shardings  # noqa: F401  (re-exported)
from dsv3_jax.vma import varying_axes

GRAD_SUMS = ("auto", "mesh", "per_axis")
# One process of XLA:CPU blocks at most 256 devices in a collective (README, "More than 256
# devices"); above, the emulation is multi-process and reduces axis by axis.
PER_AXIS_ABOVE_DEVICES = 256
# XLA:CPU options of the train and eval steps by default (`xla_cpu.NO_YNNPACK`, LLVM at -O2:
# `xla_cpu.LLVM_O2`); the step builders take `cpu_options` to override them ({} = XLA's
# defaults: benchmark_step's A/B row).
TRAIN_CPU_OPTIONS = {**xla_cpu.NO_YNNPACK, **xla_cpu.LLVM_O2}

# A loss: (model, data, capacity) -> (objective, (metrics, moe_stats)). `objective` is this
# device's share of the loss (the loss is its sum over devices); `metrics` a dict of per-device
# float32 scalars, averaged over devices; `moe_stats` the model's `MoEStats`, one per MoE layer in
# the order of `moe_layers(model)` (their dispatch statistics are already summed over devices).
LossFn = Callable[[Any, Any, tuple], tuple[jax.Array, tuple[dict, list]]]


def _jit(fn, cpu_options: Optional[dict], **kwargs):
  return xla_cpu.cpu_jit(fn, TRAIN_CPU_OPTIONS if cpu_options is None else cpu_options, **kwargs)


# ----------------------------------------------------------------------------- optimizer


def _sum_axes(x: jax.Array, axes) -> jax.Array:
  """psum over each of `axes` (given in mesh order) in turn, minor axis first: groups of one
  axis's size only."""
  for axis in reversed(tuple(axes)):
    x = jax.lax.psum(x, axis)
  return x


def global_norm(tree) -> jax.Array:
  """L2 norm of a pytree of arrays, whole-mesh inside `shard_map`.

  Outside shard_map (or with no device-varying leaf) it is `optax.tree.norm`. Inside, a leaf
  that varies over mesh axes (a shard of expert weights) contributes its squares summed over
  those axes, one axis at a time; invariant leaves (replicated, already summed) count once.

  Args:
    tree: pytree of float arrays (gradients).

  Returns:
    [] float32 (the leaves' dtype), invariant over every mesh axis.
  """
  leaves = jax.tree.leaves(tree)
  if not any(varying_axes(x) for x in leaves):
    return optax.tree.norm(tree)
  order = jax.sharding.get_abstract_mesh().axis_names
  by_axes: dict[tuple, jax.Array] = {}
  for x in leaves:
    key = tuple(a for a in order if a in varying_axes(x))
    s = jnp.sum(jnp.square(x))
    by_axes[key] = by_axes[key] + s if key in by_axes else s
  return jnp.sqrt(sum(_sum_axes(s, axes) for axes, s in by_axes.items()))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` with the norm of `global_norm`, so that it clips by the whole
  model's norm also inside `shard_map` (grad_sum="per_axis"). Outside it is optax's, op for op,
  with the same (empty) state."""

  def update_fn(updates, state, params=None):
    del params
    g_norm = global_norm(updates)
    trigger = jnp.squeeze(g_norm < max_norm)
    clip = lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay to min_learning_rate_ratio * peak, global-norm
  clipping at `grad_clip_norm` (0 turns clipping off), and weight decay on matrices only (not on
  norms' scales or 1-D vectors)."""
  t = train_cfg
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1),
      end_value=t.learning_rate * t.min_learning_rate_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  clip = [clip_by_global_norm(t.grad_clip_norm)] if t.grad_clip_norm else []  # 0: no clipping
  return optax.chain(
      *clip,
      optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))


# ----------------------------------------------------------------------------- steps


class StepFns(NamedTuple):
  train_step: Callable  # (params, other, opt_state, window, capacity) -> (params, other, opt, metrics)
  eval_step: Callable  # (params, other, window, capacity) -> (nats, predicted tokens, needed cap.)


def resolve_grad_sum(grad_sum: str, mesh) -> str:
  """"mesh" or "per_axis" for `grad_sum` on `mesh` (None: one device, "mesh").

  Raises:
    ValueError: `grad_sum` not in `GRAD_SUMS`.
  """
  if grad_sum not in GRAD_SUMS:
    raise ValueError(f"grad_sum={grad_sum!r}; allowed: {GRAD_SUMS}")
  if grad_sum == "auto":
    big = mesh is not None and mesh.size > PER_AXIS_ABOVE_DEVICES
    return "per_axis" if big else "mesh"
  return grad_sum


def moe_layers(model) -> list:
  """The DeepSeekMoE layers of a `Transformer` (its `moe_layers`), or [model] for one layer."""
  if isinstance(model, DeepSeekMoE):
    return [model]
  return list(getattr(model, "moe_layers", ()))


def _dispatch_totals(stats) -> dict[str, jax.Array]:
  """Step totals over MoE layers (already summed over devices by the dispatch)."""
  dsum = lambda f: sum((getattr(st.dispatch, f) for st in stats), jnp.float32(0.0))
  counts = jnp.stack([st.dispatch.expert_counts for st in stats]) if stats else jnp.ones((1, 1))
  load = jnp.max(counts, axis=1) / jnp.maximum(jnp.mean(counts, axis=1), 1e-9)
  return dict(
      expert_counts=counts,
      expert_load_max_over_mean=jnp.max(load),
      dropped_tokens=dsum("dropped"),
      rows_inter_node=dsum("rows_inter_node"), rows_intra_node=dsum("rows_intra_node"),
      buffer_rows_inter_node=dsum("buffer_rows_inter_node"),
      buffer_rows_intra_node=dsum("buffer_rows_intra_node"),
      needed_capacity=needed_capacity(stats))


def needed_capacity(stats) -> jax.Array:
  """[hops] int32: the largest capacity any MoE layer needed this step."""
  if not stats:
    return jnp.zeros((1,), jnp.int32)
  return jnp.max(jnp.stack([st.dispatch.needed_capacity for st in stats]), axis=0)


def _specs(shardings):
  return jax.tree.map(lambda sh: sh.spec, shardings)


def _spec_axes(spec: P) -> set:
  """The mesh axes a PartitionSpec shards over."""
  out = set()
  for entry in spec:
    if entry is not None:
      out.update((entry,) if isinstance(entry, str) else entry)
  return out


def make_train_step(graphdef, optimizer: optax.GradientTransformation, loss_fn: LossFn, *,
                    bias_update_speed: float, mesh=None, param_shardings=None,
                    other_shardings=None, opt_shardings=None, grad_sum: str = "auto",
                    donate: bool = False, discard_overflow: bool = False, zero1: bool = False,
                    cpu_options: Optional[dict] = None):
  """The jitted training step of a split nnx model with DeepSeekMoE layers.

  Args:
    graphdef, optimizer: from `nnx.split(model, nnx.Param, ...)` and e.g. `make_optimizer`.
    loss_fn: see `LossFn`; runs per device on a mesh.
    bias_update_speed: gamma of the router-bias update (report §2.1.2).
    mesh: None (one device) or the mesh; data then enters sharded over every mesh axis on its
      leading dimension ([B_{node,gpu}, ...]).
    param_shardings, other_shardings, opt_shardings: NamedSharding trees of the state on `mesh`
      (`opt_shardings` is needed with grad_sum="per_axis"; with `zero1` it must be
      `zero1.optimizer_state_shardings(opt_state, mesh, shard_replicated=True)`).
    grad_sum: one of `GRAD_SUMS` (module docstring).
    donate: donate the state buffers (params, other, opt_state) to the step, so that the new
      state reuses their memory instead of living beside it (on the emulated 4 x 8 mesh each
      replicated leaf has 32 copies). The arrays passed in are deleted by the call: use only
      the returned state afterwards.
    discard_overflow: return the state it was given (nothing updated, as for a non-finite step)
      when an MoE layer needed more than `capacity` rows, so that a dropless caller can rerun
      the step with a larger capacity from the returned (unchanged) state, also with `donate`.
    zero1: ZeRO-1 (`train/zero1.py`): the gradients of replicated parameters are
      reduce-scattered to the optimizer-state slices, each device updates its slice, the new
      parameters are all-gathered; "per_axis" does all three one mesh axis at a time inside
      the shard_map, "mesh" scatters over the whole mesh at once and leaves the sliced update
      and the gather to GSPMD. Needs a mesh. The same update up to float summation order (the
      clipping norm sums slices; tests/train/test_zero1.py).
    cpu_options: XLA:CPU compiler options (DebugOptions fields, e.g. `xla_cpu.NO_YNNPACK`);
      None = `TRAIN_CPU_OPTIONS`, {} = XLA's defaults. Ignored on other backends.

  Returns:
    train_step(params, other, opt_state, data, capacity) -> (params, other, opt_state, metrics),
    jitted with `capacity` (tuple of ints, per-hop buffer rows) static. `metrics`: the loss
    metrics averaged over devices, the dispatch totals of `_dispatch_totals`, "grad_norm"
    (before clipping), "skipped" (1.0 when the gradient norm or the metrics' "total_loss"
    was not finite: the step then returns the state it was given, nothing updated) and
    "discarded" (1.0 when `discard_overflow` and a finite step overflowed `capacity`: the
    state is returned unchanged as well).

  Raises:
    ValueError: a bad `grad_sum`, grad_sum="per_axis" or `zero1` without the shardings, or
      `zero1` without a mesh.
  """
  gamma = float(bias_update_speed)
  mode = resolve_grad_sum(grad_sum, mesh)
  axes = tuple(mesh.axis_names) if mesh is not None else ()
  n_dev = 1 if mesh is None else mesh.size
  if zero1 and mesh is None:
    raise ValueError("zero1=True (train.shard_optimizer_state) needs a mesh: on one device "
                     "there is nothing to partition")
  if mode == "per_axis" or zero1:
    if param_shardings is None or other_shardings is None or opt_shardings is None:
      raise ValueError(f"grad_sum={mode!r}{' with zero1' if zero1 else ''} needs "
                       "param_shardings, other_shardings and opt_shardings")
    mean = lambda x: _sum_axes(x, axes) / n_dev
    # Per parameter, the mesh axes it is replicated over (all of them, but the experts').
    is_p = lambda s: isinstance(s, P)
    replicated_over = jax.tree.map(
        lambda s: tuple(a for a in axes if a not in _spec_axes(s)),
        _specs(param_shardings), is_leaf=is_p)
  elif mesh is not None:
    mean = lambda x: jax.lax.pmean(x, axes)
  else:
    mean = lambda x: x
  if zero1 and mode == "mesh":
    replicated_over = jax.tree.map(
        lambda s: tuple(a for a in axes if a not in _spec_axes(s)),
        _specs(param_shardings), is_leaf=lambda s: isinstance(s, P))

  def per_device_grads(params, other, data, capacity, plans=None):
    if mode == "per_axis" or zero1:
      # Per-device copies of the replicated parameters: their gradients stay per device (no
      # implicit all-device psum from shard_map's transpose) and are summed axis by axis.
      diff = jax.tree.map(lambda p, ax: jax.lax.pcast(p, ax, to="varying") if ax else p,
                          params, replicated_over)
    else:
      diff = params

    def objective(params):
      model = nnx.merge(graphdef, params, other)
      loss, (metrics, stats) = loss_fn(model, data, capacity)
      return loss, (metrics, stats)

    (_, (scalars, stats)), grads = jax.value_and_grad(objective, has_aux=True)(diff)
    if zero1:  # reduce-scatter to the optimizer-state slices (zero1.reduce_gradient)
      grads = jax.tree.map(lambda g, lf: zero1_lib.reduce_gradient(g, lf, mode == "per_axis"),
                           grads, plans)
    elif mode == "per_axis":
      grads = jax.tree.map(_sum_axes, grads, replicated_over)
    metrics = {k: mean(v) for k, v in scalars.items()}
    metrics.update(_dispatch_totals(stats))
    return grads, metrics

  def apply(params, other, opt_state, grads, metrics, capacity, plans=None):
    grad_norm = global_norm(grads)
    if zero1 and mode == "per_axis":  # each device updates its slices, then gathers them
      local = jax.tree.map(zero1_lib.local_slice, params, plans)
      updates, new_opt = optimizer.update(grads, opt_state, local)
      new_params = jax.tree.map(zero1_lib.gather, optax.apply_updates(local, updates), plans)
    else:
      updates, new_opt = optimizer.update(grads, opt_state, params)
      if zero1:  # GSPMD: update the slices; out_shardings all-gathers the new parameters
        updates = jax.lax.with_sharding_constraint(updates, jax.tree.map(
            lambda lf: NamedSharding(mesh, lf.state_spec), plans))
      new_params = optax.apply_updates(params, updates)
    # The router-bias update below writes into Variables that nnx.merge may share with
    # `other`: keep the incoming values aside, so that a skipped or discarded step returns them.
    other_leaves, other_def = jax.tree.flatten(other)
    model = nnx.merge(graphdef, new_params, other)
    for moe, counts in zip(moe_layers(model), metrics["expert_counts"]):
      b = moe.gate.e_score_correction_bias
      b[...] = bias_update(b[...], counts, gamma)
    new_other = nnx.state(model, nnx.Not(nnx.Param))
    # A non-finite loss or gradient norm skips the whole update (parameters, optimizer state,
    # router biases stay as they were); the trainer counts and stops on repeated ones.
    finite = jnp.isfinite(grad_norm)
    if "total_loss" in metrics:
      finite = finite & jnp.isfinite(metrics["total_loss"])
    applied = finite
    if discard_overflow:
      fits = jnp.all(metrics["needed_capacity"] <= jnp.asarray(capacity, jnp.int32))
      applied = finite & fits
      metrics["discarded"] = (finite & jnp.logical_not(fits)).astype(jnp.float32)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, old)
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = jnp.logical_not(finite).astype(jnp.float32)
    return (keep(new_params, params), keep(new_other, jax.tree.unflatten(other_def, other_leaves)),
            keep(new_opt, opt_state), metrics)

  # ZeRO-1: each parameter's state placement, from its global shape (zero1.leaf_plan).
  get_plans = lambda p: zero1_lib.plans(p, param_shardings, mesh) if zero1 else None
  if mode == "per_axis":
    def per_device_step(params, other, opt_state, data, capacity, plans):
      grads, metrics = per_device_grads(params, other, data, capacity, plans)
      return apply(params, other, opt_state, grads, metrics, capacity, plans)

    p_spec, o_spec, s_spec = (_specs(param_shardings), _specs(other_shardings),
                              _specs(opt_shardings))

    def train_step(p, o, s, d, c):
      plans = get_plans(p)
      return jax.shard_map(
          lambda p, o, s, d: per_device_step(p, o, s, d, c, plans), mesh=mesh,
          in_specs=(p_spec, o_spec, s_spec, P(axes)),
          out_specs=(p_spec, o_spec, s_spec, P()))(p, o, s, d)
  else:
    if mesh is not None:
      p_spec, o_spec = _specs(param_shardings), _specs(other_shardings)

      def grads_fn(p, o, d, c):
        plans = get_plans(p)
        g_spec = p_spec if plans is None else jax.tree.map(lambda lf: lf.state_spec, plans)
        return jax.shard_map(
            lambda p, o, d: per_device_grads(p, o, d, c, plans), mesh=mesh,
            in_specs=(p_spec, o_spec, P(axes)), out_specs=(g_spec, P()))(p, o, d)
    else:
      grads_fn = per_device_grads

    def train_step(params, other, opt_state, data, capacity):
      grads, metrics = grads_fn(params, other, data, capacity)
      return apply(params, other, opt_state, grads, metrics, capacity, get_plans(params))

  donated = (0, 1, 2) if donate else ()
  if mesh is None:
    return _jit(train_step, cpu_options, static_argnums=(4,), donate_argnums=donated)
  state_sh = (param_shardings, other_shardings, opt_shardings)
  return _jit(train_step, cpu_options, static_argnums=(4,), donate_argnums=donated,
              in_shardings=state_sh + (NamedSharding(mesh, P(axes)),),
              out_shardings=state_sh + (None,))


def make_step_fns(graphdef, optimizer, model_cfg: ModelConfig, train_cfg, seq_len: int,
                  mesh=None, param_shardings=None, other_shardings=None,
                  opt_shardings=None, grad_sum: str = "auto", donate: bool = False,
                  discard_overflow: bool = False, zero1: bool = False,
                  cpu_options: Optional[dict] = None) -> StepFns:
  """Builds the jitted language-model train and eval steps for a split `Transformer`.

  The train step's loss is CE + lambda * MTP + alpha * balance (`losses.compute_losses`) over
  token windows [B, S + 1 + D] int32 (`losses.make_batch`); see `make_train_step` for the
  arguments, the mesh, `grad_sum`, `donate`, `discard_overflow`, `zero1` and `cpu_options`
  (both steps compile with them). The eval step returns the held-out nats summed over
  every predicted token, their count, and the capacity the step needed.

  Raises:
    ValueError: as `make_train_step`.
  """
  depth = model_cfg.mtp_depth
  mtp_w, alpha = float(train_cfg.mtp_loss_weight), float(train_cfg.balance_loss_alpha)
  remat = bool(train_cfg.get("remat", False))
  mode = resolve_grad_sum(grad_sum, mesh)
  axes = tuple(mesh.axis_names) if mesh is not None else ()
  n_dev = 1 if mesh is None else mesh.size

  def lm_loss(model, window, capacity):
    batch = make_batch(window, seq_len, depth)
    out = model.forward(batch.inputs, mtp_tokens=batch.mtp_tokens if depth else None,
                        mask=batch.mask, capacity=capacity, with_mtp=depth > 0, remat=remat)
    losses = compute_losses(out, batch, mtp_weight=mtp_w, balance_alpha=alpha)
    # Every device holds the same number of sequences, so the global mean loss is the mean
    # of the per-device losses (the sum of these shares over devices).
    metrics = dict(loss=losses.ce, mtp_loss=losses.mtp, balance_loss=losses.balance,
                   total_loss=losses.total)
    return losses.total / n_dev, (metrics, out.moe_stats)

  train_jit = make_train_step(
      graphdef, optimizer, lm_loss, bias_update_speed=train_cfg.bias_update_speed, mesh=mesh,
      param_shardings=param_shardings, other_shardings=other_shardings,
      opt_shardings=opt_shardings, grad_sum=mode, donate=donate,
      discard_overflow=discard_overflow, zero1=zero1, cpu_options=cpu_options)

  def per_device_eval(params, other, window, capacity):
    model = nnx.merge(graphdef, params, other)
    batch = make_batch(window, seq_len, depth)
    out = model.forward(batch.inputs, mask=batch.mask, capacity=capacity, with_mtp=False)
    logz = jax.nn.logsumexp(out.logits, axis=-1)
    gold = jnp.take_along_axis(out.logits, batch.targets[..., None], axis=-1)[..., 0]
    m = batch.mask.astype(jnp.float32)
    nats, count = jnp.sum((logz - gold) * m), jnp.sum(m)
    if mode == "per_axis":
      nats, count = _sum_axes(nats, axes), _sum_axes(count, axes)
    elif mesh is not None:
      nats, count = jax.lax.psum(nats, axes), jax.lax.psum(count, axes)
    return nats, count, needed_capacity(out.moe_stats)

  if mesh is None:
    return StepFns(train_jit, _jit(per_device_eval, cpu_options, static_argnums=(3,)))
  p_spec, o_spec, tok = _specs(param_shardings), _specs(other_shardings), P(axes)
  eval_fn = lambda p, o, w, c: jax.shard_map(
      lambda p, o, w: per_device_eval(p, o, w, c), mesh=mesh, in_specs=(p_spec, o_spec, tok),
      out_specs=(P(), P(), P()))(p, o, w)
  eval_jit = _jit(eval_fn, cpu_options, static_argnums=(3,),
                  in_shardings=(param_shardings, other_shardings, NamedSharding(mesh, tok)))
  return StepFns(train_jit, eval_jit)
