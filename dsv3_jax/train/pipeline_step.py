"""The language-model training step on a pipeline-parallel mesh (1F1B, ZB1P, DualPipe).

Sources: DeepSeek-V3 technical report §3.2 (16-way pipeline parallelism with DualPipe,
§3.2.1, Fig. 5, Table 2; the shallowest layers with the embedding and the deepest with the
output head and the MTP module), §2.2 (MTP). The schedule is executed by
`parallel.pipeline.execute` from a `parallel.pipeline_schedule.SlotTable`.

Layout. On a (`stage`, [`replica`,] `node`, `gpu`) mesh (`parallel.mesh.make_pipeline_mesh`)
the MoE layers (`num_hidden_layers - first_k_dense_replace` of them) are split into `stages`
equal groups: stage s holds MoE layers first_k_dense_replace + s * n .. + n - 1, stacked over
the stage axis (W[stage, ...], experts W[stage, E_{node,gpu}, ...]), so each device holds its
own stage's layers (DualPipe: also the mirror stage's, by one ppermute). The embedding and the
first_k_dense_replace dense layers run on stage 0 only, the final norm, the head, the loss and
the MTP modules on the last stage; these parameters are replicated over every device (they
stay in the model's layout). Expert parallelism runs inside each stage over (`node`, `gpu`).

State. The step takes and returns the model's usual state (`nnx.split(model, nnx.Param, ...)`,
sharded as `parallel.mesh.state_shardings` on the pipeline mesh: replicated over `stage`), so
the optimizer, the router-bias update, checkpoints and the evaluation are the unpipelined
ones. Inside the jitted step the stage layers are stacked into the pipeline layout and their
gradients unstacked back. The objective per micro-batch and device is its total loss
(`losses.compute_losses`) / (data-parallel devices x micro-batches): with full windows (no
padding) it is the unpipelined step's loss, and losses and gradients equal
`train.step.make_step_fns` up to float summation order (tests/parallel/test_pipeline.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.model.transformer import ModelOutput
from dsv3_jax.parallel import pipeline as pipeline_lib
from dsv3_jax.parallel.mesh import STAGE_AXIS
from dsv3_jax.parallel.pipeline_schedule import SlotTable, build_slot_table
from dsv3_jax.train.losses import bias_update, compute_losses, make_batch
from dsv3_jax.train.pipeline_layout import StageLayout, _key, stage_layers  # noqa: F401 (re-exported)
from dsv3_jax.train.step import StepFns, global_norm, moe_layers, needed_capacity

_DISPATCH_SUMS = ("dropped", "rows_inter_node", "rows_intra_node", "buffer_rows_inter_node",
                  "buffer_rows_intra_node")


def _stage_spec(spec: P) -> P:
  return P(STAGE_AXIS, *spec)


def _spec_axes(spec: P) -> set:
  out = set()
  for e in spec:
    if e is not None:
      out.update((e,) if isinstance(e, str) else e)
  return out


def _sum_over(x, axes):
  """psum over each axis in turn, minor first (groups of one axis only)."""
  for a in reversed(tuple(axes)):
    x = jax.lax.psum(x, a)
  return x


def _same_over(x, axes):
  """A value equal on the devices of `axes` (already reduced over them, e.g. by the MoE
  dispatch) typed as invariant over them: pmax, one axis at a time."""
  for a in reversed(tuple(axes)):
    x = jax.lax.pmax(x, a)
  return x


class _Body(NamedTuple):
  """What both state layouts of the pipelined step share (`_pipeline_body`)."""
  per_device: Callable  # (stage_p, shared_p, stage_o, shared_o, window, capacity) -> grads, metrics
  p_lay: StageLayout
  o_lay: StageLayout
  in_specs: tuple  # (stage params, shared params, stage other, shared other, window)
  p_specs: list
  o_specs: list
  data_axes: tuple
  n_dp: int


def _pipeline_body(graphdef, model_cfg: ModelConfig, train_cfg, seq_len: int, mesh,
                   param_shardings, other_shardings, *, schedule: str, micro_batches: int,
                   transfer: str) -> _Body:
  """Checks the settings and builds the per-device gradient function (inside `shard_map`).

  Raises:
    ValueError: as `make_pipeline_step_fns`.
  """
  if STAGE_AXIS not in mesh.axis_names:
    raise ValueError(f"a pipeline step needs a mesh with a {STAGE_AXIS!r} axis "
                     "(parallel.mesh.make_pipeline_mesh); got axes {mesh.axis_names}")
  pp = int(mesh.shape[STAGE_AXIS])
  if transfer not in pipeline_lib.TRANSFERS:
    raise ValueError(f"pipeline.transfer={transfer!r}; allowed: "
                     f"{', '.join(pipeline_lib.TRANSFERS)}")
  table: SlotTable = build_slot_table(schedule, pp, micro_batches)
  c = model_cfg
  depth, n_layers_moe = c.mtp_depth, c.num_hidden_layers - c.first_k_dense_replace
  mtp_w, alpha = float(train_cfg.mtp_loss_weight), float(train_cfg.balance_loss_alpha)
  data_axes = tuple(a for a in mesh.axis_names if a != STAGE_AXIS)
  n_dp = mesh.size // pp
  batch = train_cfg.get("batch_size") if hasattr(train_cfg, "get") else None
  if batch is not None and (batch % n_dp or (batch // n_dp) % micro_batches):
    raise ValueError(
        f"train.batch_size={batch} must split into {n_dp} data-parallel devices per stage x "
        f"pipeline.micro_batches={micro_batches} micro-batches; allowed: a multiple of "
        f"{n_dp * micro_batches}")
  p_lay = StageLayout.build(param_shardings, c, pp)
  o_lay = StageLayout.build(other_shardings, c, pp)
  n, k = p_lay.per_stage, p_lay.first_dense
  p_tdef, o_tdef = jax.tree.structure(param_shardings), jax.tree.structure(other_shardings)
  p_specs = [sh.spec for sh in jax.tree.leaves(param_shardings)]
  o_specs = [sh.spec for sh in jax.tree.leaves(other_shardings)]
  stage_specs = lambda lay, specs: [[_stage_spec(specs[per[0]]) for per in layer]
                                    for layer in lay.stage_leaves]
  shared_specs = lambda lay, specs: [specs[i] for i in lay.shared_leaves]
  in_specs = (stage_specs(p_lay, p_specs), shared_specs(p_lay, p_specs),
              stage_specs(o_lay, o_specs), shared_specs(o_lay, o_specs), P(data_axes))
  act_dtype = jnp.dtype(c.dtype)

  def per_device(stage_p, shared_p, stage_o, shared_o, window, capacity):
    b_local = window.shape[0]
    if b_local % micro_batches:
      raise ValueError(f"pipeline.micro_batches={micro_batches} must divide the "
                       f"{b_local} sequences per data-parallel device (train.batch_size / "
                       f"{n_dp})")
    bm = b_local // micro_batches
    local = lambda tree: jax.tree.map(lambda a: a[0], tree)  # [1, ...] -> this stage's
    window = pipeline_lib._vary(window)

    def stage_fn(params, consts, shared, shared_consts, x, *, direction, micro_batch, stage):
      del direction
      model = nnx.merge(graphdef,
                        jax.tree.unflatten(p_tdef, p_lay.merge(params, shared, stacked=False)),
                        jax.tree.unflatten(o_tdef, o_lay.merge(consts, shared_consts,
                                                               stacked=False)))
      w = jax.lax.dynamic_slice_in_dim(window, micro_batch * bm, bm, axis=0)
      batch = make_batch(w, seq_len, depth)
      cos, sin = rope_cos_sin(jnp.arange(seq_len), jnp.asarray(model.rope_inv_freq, jnp.float32),
                              model.rope_attention_scaling)
      kw = dict(mask=batch.mask, capacity=capacity)

      def prologue(x):
        h = model.embed(batch.inputs)
        for i in range(k):
          h, _ = model.layers[i](h, cos, sin, **kw)
        return pipeline_lib._vary(h.astype(act_dtype))

      h = jax.lax.cond(stage == 0, prologue, lambda x: pipeline_lib._vary(x), x)
      stats = []
      for j in range(n):
        h, st = model.layers[k + j](h, cos, sin, **kw)
        stats.append(st)
      balance = sum((st.balance_loss for st in stats), jnp.float32(0.0))

      def tail(h):
        logits = model.head(model.norm(h))
        mtp_logits, mtp_stats, h_prev = [], [], h
        for d, module in enumerate(model.mtp, start=1):
          emb = model.embed(batch.mtp_tokens[:, d:d + seq_len])
          h_prev, normed, st = module(h_prev, emb, cos, sin, **kw)
          mtp_stats.append(st)
          mtp_logits.append(model.head(normed))
        out = ModelOutput(logits, tuple(mtp_logits), tuple(mtp_stats), ())
        losses = compute_losses(out, batch, mtp_weight=mtp_w, balance_alpha=alpha)
        return pipeline_lib._vary(dict(
            ce=losses.ce, mtp=losses.mtp, balance=losses.balance, total=losses.total,
            counts=_stack([st.dispatch.expert_counts for st in mtp_stats], c.n_routed_experts),
            **{f: sum((getattr(st.dispatch, f) for st in mtp_stats), jnp.float32(0.0))
               for f in _DISPATCH_SUMS}, needed=needed_capacity(mtp_stats)))

      shapes = jax.eval_shape(tail, h)
      zero = lambda h: pipeline_lib._vary(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                       shapes))
      t = jax.lax.cond(stage == pp - 1, tail, zero, h)
      loss = alpha * balance + t["total"]
      sums = dict(loss=t["ce"], mtp_loss=t["mtp"], balance_loss=balance + t["balance"],
                  total_loss=loss, counts=_stack([st.dispatch.expert_counts for st in stats],
                                                 c.n_routed_experts),
                  mtp_counts=t["counts"],
                  **{f: sum((getattr(st.dispatch, f) for st in stats), jnp.float32(0.0)) + t[f]
                     for f in _DISPATCH_SUMS})
      needed = needed_capacity(stats)
      maxes = dict(needed=jnp.maximum(needed, t["needed"]) if depth else needed)
      return (h, loss), (sums, maxes)

    run = pipeline_lib.execute(
        table, stage_fn, local(stage_p), shared_p, act_shape=(bm, seq_len, c.hidden_size),
        act_dtype=act_dtype, loss_scale=1.0 / (n_dp * micro_batches),
        stage_consts=local(stage_o), shared_consts=shared_o, transfer=transfer)
    # Gradients: summed over the data-parallel devices that hold the same parameters (experts
    # are sharded over (node, gpu): only over the axes outside their spec), shared ones also
    # over the stages (only the first and last contribute).
    stage_g = [[_sum_over(g, [a for a in data_axes if a not in _spec_axes(p_specs[per[0]])])[None]
                for g, per in zip(layer_g, layer)]
               for layer_g, layer in zip(run.stage_grads, p_lay.stage_leaves)]
    shared_g = [_sum_over(g, [a for a in mesh.axis_names if a not in _spec_axes(p_specs[i])])
                for g, i in zip(run.shared_grads, p_lay.shared_leaves)]
    rank = jax.lax.axis_index(STAGE_AXIS)
    mean = lambda x: _sum_over(x, data_axes) / n_dp
    tot = lambda key: sum(s[key] for s in run.sums)
    metrics = {key: mean(jax.lax.psum(tot(key), STAGE_AXIS)) / micro_batches
               for key in ("loss", "mtp_loss", "balance_loss", "total_loss")}
    counts = jnp.zeros((n_layers_moe, c.n_routed_experts), jnp.float32)
    for d, s in enumerate(run.sums):
      st = rank if d == 0 else pp - 1 - rank
      counts = counts + jax.lax.dynamic_update_slice(
          jnp.zeros_like(counts), s["counts"], (st * n, 0))
    counts = jnp.concatenate([counts, tot("mtp_counts")], axis=0)
    counts = _same_over(jax.lax.psum(counts, STAGE_AXIS), data_axes)
    # The dispatch statistics are already summed over (node, gpu) by the MoE layers.
    load = jnp.max(counts, axis=1) / jnp.maximum(jnp.mean(counts, axis=1), 1e-9)
    metrics.update(expert_counts=counts, expert_load_max_over_mean=jnp.max(load),
                   dropped_tokens=_same_over(jax.lax.psum(tot("dropped"), STAGE_AXIS), data_axes),
                   **{f: _same_over(jax.lax.psum(tot(f), STAGE_AXIS), data_axes)
                      for f in _DISPATCH_SUMS[1:]})
    needed = run.maxes[0]["needed"]
    for mx in run.maxes[1:]:
      needed = jnp.maximum(needed, mx["needed"])
    metrics["needed_capacity"] = _same_over(needed, (STAGE_AXIS,) + data_axes)
    for name, v in (("idle_slots", run.idle), ("peak_activations", run.peak_activations),
                    ("schedule_mismatches", run.mismatches)):
      metrics[name] = _same_over(v, data_axes)[None]  # equal over a stage's devices
    return stage_g, shared_g, metrics

  return _Body(per_device, p_lay, o_lay, in_specs, p_specs, o_specs, data_axes, n_dp)


def make_pipeline_step_fns(graphdef, optimizer: optax.GradientTransformation,
                           model_cfg: ModelConfig, train_cfg, seq_len: int, mesh,
                           param_shardings, other_shardings, opt_shardings, *,
                           schedule: str, micro_batches: int, donate: bool = False,
                           discard_overflow: bool = False, transfer: str = "ppermute") -> StepFns:
  """The jitted train and eval steps of a split `Transformer` on a pipeline mesh.

  Args:
    graphdef, optimizer, model_cfg, train_cfg, seq_len: as `train.step.make_step_fns`; the
      model must have been built with a (`node`, `gpu`) mesh of one stage's shape (its MoE
      topology), or without a mesh for 1 x 1 stages.
    mesh: a `make_pipeline_mesh` mesh (axes `stage`, [`replica`,] `node`, `gpu`).
    param_shardings, other_shardings, opt_shardings: NamedSharding trees of the model state on
      `mesh` (`parallel.mesh.state_shardings`).
    schedule: "1F1B", "ZB1P" or "DualPipe" (pipeline.schedule).
    micro_batches: micro-batches per step (pipeline.micro_batches); the per-device batch
      (batch / data-parallel devices) must divide into them.
    donate, discard_overflow: as `make_step_fns`.
    transfer: the stage transfer, "ppermute" or "all_gather" (`parallel.pipeline.execute`;
      pipeline.transfer).

  Returns:
    `StepFns`: train_step(params, other, opt_state, window [B, S + 1 + D] int32, capacity) ->
    (params, other, opt_state, metrics), metrics as `make_step_fns`'s plus "idle_slots",
    "peak_activations" and "schedule_mismatches" ([stages] int32, measured by the executor);
    eval_step as `make_step_fns`'s (data parallel over every device).

  Raises:
    ValueError: a mesh without a stage axis, stages not dividing the MoE layers, a bad
      schedule or micro-batch count (naming mesh.stages, pipeline.schedule,
      pipeline.micro_batches).
  """
  b = _pipeline_body(graphdef, model_cfg, train_cfg, seq_len, mesh, param_shardings,
                     other_shardings, schedule=schedule, micro_batches=micro_batches,
                     transfer=transfer)
  p_lay, o_lay, in_specs, per_device = b.p_lay, b.o_lay, b.in_specs, b.per_device
  p_tdef, o_tdef = jax.tree.structure(param_shardings), jax.tree.structure(other_shardings)
  gamma = float(train_cfg.bias_update_speed)
  data_axes = b.data_axes
  c = model_cfg
  per_rank = {"idle_slots", "peak_activations", "schedule_mismatches"}

  def grads_fn(params, other, window, capacity):
    sp, hp = p_lay.split(jax.tree.leaves(params))
    so, ho = o_lay.split(jax.tree.leaves(other))
    place = lambda arrays, specs: [
        [jax.lax.with_sharding_constraint(a, NamedSharding(mesh, sp_)) for a, sp_ in zip(al, sl)]
        for al, sl in zip(arrays, specs)]
    sp, so = place(sp, in_specs[0]), place(so, in_specs[2])

    def body(sp, hp, so, ho, w):
      return per_device(sp, hp, so, ho, w, capacity)

    metric_out = {key: (P(STAGE_AXIS) if key in per_rank else P()) for key in _METRIC_KEYS}
    g_stage, g_shared, metrics = jax.shard_map(
        body, mesh=mesh, in_specs=in_specs,
        out_specs=(in_specs[0], in_specs[1], metric_out))(sp, hp, so, ho, window)
    grads = jax.tree.unflatten(p_tdef, p_lay.merge(g_stage, g_shared))
    return grads, metrics

  def train_step(params, other, opt_state, window, capacity):
    window = jax.lax.with_sharding_constraint(window, NamedSharding(mesh, P(data_axes)))
    grads, metrics = grads_fn(params, other, window, capacity)
    return _apply(graphdef, optimizer, gamma, discard_overflow, params, other, opt_state, grads,
                  metrics, capacity)

  state_sh = (param_shardings, other_shardings, opt_shardings)
  # The batch may arrive sharded over every axis (the trainer's eval layout): resharded inside.
  train_jit = jax.jit(train_step, static_argnums=(4,), donate_argnums=(0, 1, 2) if donate else (),
                      in_shardings=state_sh + (None,), out_shardings=state_sh + (None,))
  return StepFns(train_jit, _make_eval(graphdef, c, seq_len, mesh, param_shardings,
                                       other_shardings))


_METRIC_KEYS = ("loss", "mtp_loss", "balance_loss", "total_loss", "expert_counts",
                "expert_load_max_over_mean", "dropped_tokens", "rows_inter_node",
                "rows_intra_node", "buffer_rows_inter_node", "buffer_rows_intra_node",
                "needed_capacity", "idle_slots", "peak_activations", "schedule_mismatches")


def _stack(arrays, n_experts: int) -> jax.Array:
  return jnp.stack(arrays) if arrays else jnp.zeros((0, n_experts), jnp.float32)


def guard_update(grad_norm, metrics: dict, capacity, discard_overflow: bool) -> Callable:
  """The skip rule of the train steps: an update is applied only when the gradient norm and
  the loss are finite (and, with `discard_overflow`, every MoE layer's needed capacity fits
  `capacity`). Writes metrics "grad_norm", "skipped" (and "discarded") [] float32.

  Returns:
    keep(new, old): `new` where the update applies, else `old` (pytrees).
  """
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["total_loss"])
  applied = finite
  if discard_overflow:
    fits = jnp.all(metrics["needed_capacity"] <= jnp.asarray(capacity, jnp.int32))
    applied = finite & fits
    metrics["discarded"] = (finite & jnp.logical_not(fits)).astype(jnp.float32)
  metrics["grad_norm"] = grad_norm
  metrics["skipped"] = jnp.logical_not(finite).astype(jnp.float32)
  return lambda new, old: jax.tree.map(lambda x, y: jnp.where(applied, x, y), new, old)


def _apply(graphdef, optimizer, gamma, discard_overflow, params, other, opt_state, grads,
           metrics, capacity):
  """The optimizer and router-bias update of `train.step.make_train_step` (GSPMD, "mesh")."""
  grad_norm = global_norm(grads)
  updates, new_opt = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  other_leaves, other_def = jax.tree.flatten(other)  # kept aside: merge shares the Variables
  model = nnx.merge(graphdef, new_params, other)
  for moe, counts in zip(moe_layers(model), metrics["expert_counts"]):
    b = moe.gate.e_score_correction_bias
    b[...] = bias_update(b[...], counts, gamma)
  new_other = nnx.state(model, nnx.Not(nnx.Param))
  keep = guard_update(grad_norm, metrics, capacity, discard_overflow)
  return (keep(new_params, params), keep(new_other, jax.tree.unflatten(other_def, other_leaves)),
          keep(new_opt, opt_state), metrics)


def _make_eval(graphdef, model_cfg: ModelConfig, seq_len: int, mesh, param_shardings,
               other_shardings):
  """Held-out nats, their count and the needed capacity, data parallel over every device."""
  axes = tuple(mesh.axis_names)

  def per_device(params, other, window, capacity):
    model = nnx.merge(graphdef, params, other)
    batch = make_batch(window, seq_len, model_cfg.mtp_depth)
    out = model.forward(batch.inputs, mask=batch.mask, capacity=capacity, with_mtp=False)
    logz = jax.nn.logsumexp(out.logits, axis=-1)
    gold = jnp.take_along_axis(out.logits, batch.targets[..., None], axis=-1)[..., 0]
    m = batch.mask.astype(jnp.float32)
    nats, count = _sum_over(jnp.sum((logz - gold) * m), axes), _sum_over(jnp.sum(m), axes)
    return nats, count, jax.lax.pmax(needed_capacity(out.moe_stats), STAGE_AXIS)

  spec = lambda tree: jax.tree.map(lambda sh: sh.spec, tree)
  fn = lambda p, o, w, cap: jax.shard_map(
      lambda p, o, w: per_device(p, o, w, cap), mesh=mesh,
      in_specs=(spec(param_shardings), spec(other_shardings), P(axes)),
      out_specs=(P(), P(), P()))(p, o, w)
  return jax.jit(fn, static_argnums=(3,), in_shardings=(param_shardings, other_shardings,
                                                         NamedSharding(mesh, P(axes))))


def trainer_step_fns(cfg, graphdef, optimizer, model_cfg: ModelConfig, params, other, opt_state,
                     *, donate: bool = True, discard_overflow: bool = False):
  """What `train.trainer` needs to train on `cfg.mesh.stages` > 1 pipeline stages.

  Builds the (`stage`, [`replica`,] `node`, `gpu`) mesh, re-places the state built on one
  stage's (`node`, `gpu`) mesh onto it (replicated over `stage`, experts as before), and the
  step functions for `cfg.pipeline.schedule` / `cfg.pipeline.micro_batches`.

  Returns:
    (StepFns, mesh, params, other, opt_state, put), `put(window)` placing a host batch
    [B, L] sharded over every mesh axis (the eval step's layout; the train step reshards it).

  Raises:
    ValueError: as `make_pipeline_step_fns` and `parallel.mesh.make_pipeline_mesh`, and a
      config without a `pipeline` group (naming it).
  """
  import numpy as np

  from dsv3_jax.parallel.mesh import make_pipeline_mesh

  if jax.process_count() > 1:
    raise ValueError("mesh.stages > 1 runs in one process (the multi-process pipeline is not "
                     "built); allowed: --processes 1")
  pipe = cfg.get("pipeline")
  if pipe is None:
    raise ValueError("mesh.stages > 1 needs a `pipeline` config group with `schedule` "
                     "(1F1B, ZB1P or DualPipe) and `micro_batches` (see configs/orion_pp.py)")
  mesh = make_pipeline_mesh(cfg.mesh.stages, cfg.mesh.nodes, cfg.mesh.gpus_per_node,
                            cfg.mesh.get("ep_nodes"))
  move = lambda tree: jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, getattr(x.sharding, "spec", P()))), tree)
  params, other, opt_state = move(params), move(other), move(opt_state)
  sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  fns = make_pipeline_step_fns(graphdef, optimizer, model_cfg, cfg.train, cfg.data.seq_len, mesh,
                               sh(params), sh(other), sh(opt_state), schedule=pipe.schedule,
                               micro_batches=pipe.micro_batches, donate=donate,
                               discard_overflow=discard_overflow)
  batch = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  return fns, mesh, params, other, opt_state, lambda x: jax.device_put(np.asarray(x), batch)
