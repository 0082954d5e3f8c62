"""The pipelined train step with the state kept in the stacked pipeline layout.

Sources: DeepSeek-V3 technical report §3.2 (16-way pipeline parallelism, DualPipe §3.2.1),
§2.1.2 (the router-bias update). `train.pipeline_step.make_pipeline_step_fns` takes the
model's own state; this module's `make_stacked_pipeline_step` keeps every stage's layers
stacked and sharded over `stage` so that the compiled program holds only one-axis groups
(results/pipeline_2048.md gives why that matters at 2048 devices).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.parallel.mesh import STAGE_AXIS
from dsv3_jax.train.losses import bias_update
from dsv3_jax.train.pipeline_step import _METRIC_KEYS, _key, _pipeline_body, guard_update
from dsv3_jax.train.step import global_norm


class PipelineState(NamedTuple):
  """The model state in the pipeline layout (`make_stacked_pipeline_step`).

  stage_params / stage_other: [MoE layers per stage][leaves per layer] arrays [pp, ...]: the
  same leaf of every stage's j-th MoE layer stacked over the stages, sharded
  P('stage', *the leaf's spec), so a device holds only its own stage's layers. shared_params /
  shared_other: the other leaves (embedding, dense layers, final norm, head, MTP modules) in
  the model's layout, replicated over `stage`. Other = the router biases (not trained by the
  optimizer; the bias update of report §2.1.2).
  """
  stage_params: list
  shared_params: list
  stage_other: list
  shared_other: list


class StackedPipelineStep(NamedTuple):
  """`make_stacked_pipeline_step`'s result.

  train_step(state, opt_state, window [B, S + 1 + D] int32, capacity) ->
    (state, opt_state, metrics), jitted, the state and optimizer state donated when asked;
    metrics as `make_pipeline_step_fns`'s.
  to_pipeline(params, other) -> PipelineState: model-layout trees (host numpy arrays: numpy
    stacks, e.g. to place with `jax.make_array_from_callback` on many processes) to the
    pipeline layout.
  to_model(state) -> (params, other): the model-layout trees back (stage arrays unstacked;
    fetch to host first on a multi-process mesh).
  shardings: a PipelineState of NamedShardings (every leaf's).
  opt_shardings(opt_state) -> its NamedSharding tree (parameter-shaped leaves as their
    parameter, the rest replicated), for an optimizer state of `optimizer.init((state.
    stage_params, state.shared_params))`.
  """
  train_step: Callable
  to_pipeline: Callable
  to_model: Callable
  shardings: PipelineState
  opt_shardings: Callable


def make_stacked_pipeline_step(graphdef, optimizer: optax.GradientTransformation,
                               model_cfg: ModelConfig, train_cfg, seq_len: int, mesh,
                               param_shardings, other_shardings, *, schedule: str,
                               micro_batches: int, donate: bool = False,
                               discard_overflow: bool = False,
                               transfer: str = "all_gather") -> StackedPipelineStep:
  """The pipelined train step with the state kept in the pipeline layout, the whole step
  (gradients, global-norm, optimizer, router-bias update) inside one `shard_map`.

  `make_pipeline_step_fns` takes the model's own state, replicated over `stage`, and moves it
  into and out of the stacked layout inside the jitted step; the GSPMD partitioner implements
  those moves with collectives over groups spanning `stage` and the data axes (at PP16 x DP2 x
  EP64, 240 collective-permutes over all 2048 devices: results/pipeline_2048.md), and every
  device holds the whole model's gradients. Here the state stays stacked ([pp, ...] sharded
  over `stage`, `PipelineState`), the optimizer updates each device's own shards in place, and
  the compiled program's collectives are the layout's: the stage transfer over `stage`, the
  MoE all-to-alls over `node` and `gpu`, the gradient and metric sums one mesh axis at a time
  (XLA may fold consecutive sums into one group over (`node`, `gpu`), inside a node group's
  process): groups small enough for the gloo limits of ../shared/NOTES-2048.md. Executed at
  2048 devices, PP16 x DP2 x EP64 on 16 processes (experiments/pipeline_2048.py,
  results/pipeline_2048.md; across processes: tests/cluster/test_pipeline_processes.py).

  The optimizer sees each stage leaf without its stage dimension (its own stage's array), so
  masks and per-leaf rules (AdamW's decay mask on matrices) treat a leaf as in the model
  layout; inside `shard_map` `train.step.global_norm` sums the squares one axis at a time, so
  `train.step.clip_by_global_norm` (make_optimizer) clips by the whole model's norm. Losses,
  gradients and updates equal `make_pipeline_step_fns`'s (tests/parallel/test_pipeline.py).

  Args:
    graphdef, optimizer, model_cfg, train_cfg, seq_len, mesh, param_shardings,
    other_shardings, schedule, micro_batches, discard_overflow: as `make_pipeline_step_fns`
      (the shardings give each leaf's spec inside a stage; the optimizer must be elementwise
      apart from what `global_norm` computes: SGD, Adam(W), with or without clipping).
    donate: donate the state and optimizer state.
    transfer: the stage transfer; default "all_gather" (groups of `stage` only).

  Returns:
    `StackedPipelineStep`.

  Raises:
    ValueError: as `make_pipeline_step_fns`.
  """
  b = _pipeline_body(graphdef, model_cfg, train_cfg, seq_len, mesh, param_shardings,
                     other_shardings, schedule=schedule, micro_batches=micro_batches,
                     transfer=transfer)
  c, pp = model_cfg, int(mesh.shape[STAGE_AXIS])
  gamma = float(train_cfg.bias_update_speed)
  n, n_moe = b.p_lay.per_stage, c.num_hidden_layers - c.first_k_dense_replace
  p_tdef, o_tdef = jax.tree.structure(param_shardings), jax.tree.structure(other_shardings)
  specs = PipelineState(*b.in_specs[:4])
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  param_specs = (specs.stage_params, specs.shared_params)
  is_stage = (jax.tree.map(lambda _: True, specs.stage_params),
              [False] * len(specs.shared_params))
  # Router biases: stage other leaves by position, shared ones (MTP modules) by MTP index.
  o_paths = [tuple(_key(k) for k in path) for path, _ in
             jax.tree_util.tree_flatten_with_path(other_shardings)[0]]
  is_bias = lambda i: "e_score_correction_bias" in o_paths[i]
  stage_bias = [[is_bias(per[0]) for per in layer] for layer in b.o_lay.stage_leaves]
  shared_bias = [n_moe + int(o_paths[i][1]) if is_bias(i) and o_paths[i][0] == "mtp" else None
                 for i in b.o_lay.shared_leaves]
  if any(is_bias(i) and o_paths[i][0] != "mtp" for i in b.o_lay.shared_leaves):
    raise ValueError("a router bias outside the stage layers and the MTP modules")

  def opt_specs(opt_state):
    return optax.tree_map_params(optimizer, lambda _, s: s, opt_state, param_specs,
                                 transform_non_params=lambda _: P())

  def view(opt_state, to_local: bool):
    """Stage leaves of the optimizer state without (True) or with (False) their [1] dim."""
    f = (lambda v, st: v[0] if st else v) if to_local else (lambda v, st: v[None] if st else v)
    return optax.tree_map_params(optimizer, f, opt_state, is_stage)

  drop = lambda tree: [[a[0] for a in layer] for layer in tree]
  add = lambda tree: [[a[None] for a in layer] for layer in tree]

  def per_device(state, opt_state, window, capacity):
    sp, hp, so, ho = state
    stage_g, shared_g, metrics = b.per_device(sp, hp, so, ho, window, capacity)
    params, grads = (drop(sp), list(hp)), (drop(stage_g), list(shared_g))
    grad_norm = global_norm(grads)
    local_opt = view(opt_state, True)
    updates, new_opt = optimizer.update(grads, local_opt, params)
    new_sp, new_hp = optax.apply_updates(params, updates)
    new_sp, new_opt = add(new_sp), view(new_opt, False)
    counts = metrics["expert_counts"]  # [n_moe + depth, E], equal on every device
    rank = jax.lax.axis_index(STAGE_AXIS)
    row = lambda j: jax.lax.dynamic_index_in_dim(counts, rank * n + j, 0, keepdims=False)
    new_so = [[bias_update(a[0], row(j), gamma)[None] if bias else a
               for a, bias in zip(layer, flags)]
              for j, (layer, flags) in enumerate(zip(so, stage_bias))]
    new_ho = [a if r is None else bias_update(a, counts[r], gamma)
              for a, r in zip(ho, shared_bias)]
    keep = guard_update(grad_norm, metrics, capacity, discard_overflow)
    new_state = PipelineState(new_sp, new_hp, new_so, new_ho)
    return keep(new_state, state), keep(new_opt, opt_state), metrics

  per_rank = {"idle_slots", "peak_activations", "schedule_mismatches"}
  metric_keys = _METRIC_KEYS + ("grad_norm", "skipped") + (
      ("discarded",) if discard_overflow else ())

  def train_step(state, opt_state, window, capacity):
    window = jax.lax.with_sharding_constraint(window, NamedSharding(mesh, P(b.data_axes)))
    o_specs = opt_specs(opt_state)
    metric_out = {k: (P(STAGE_AXIS) if k in per_rank else P()) for k in metric_keys}
    return jax.shard_map(
        lambda s, o, w: per_device(s, o, w, capacity), mesh=mesh,
        in_specs=(specs, o_specs, b.in_specs[4]),
        out_specs=(specs, o_specs, metric_out))(state, opt_state, window)

  # No in/out shardings: shard_map's specs are the layout (the state arrives placed as
  # `shardings`, the optimizer state as `opt_shardings`; the outputs leave that way).
  train_jit = jax.jit(train_step, static_argnums=(3,), donate_argnums=(0, 1) if donate else ())

  def to_pipeline(params, other):
    import numpy as np

    stack = lambda xs: (np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs)
                        else jnp.stack(xs))
    sp, hp = b.p_lay.split(jax.tree.leaves(params), stack)
    so, ho = b.o_lay.split(jax.tree.leaves(other), stack)
    return PipelineState(sp, hp, so, ho)

  def to_model(state):
    return (jax.tree.unflatten(p_tdef, b.p_lay.merge(state.stage_params, state.shared_params)),
            jax.tree.unflatten(o_tdef, b.o_lay.merge(state.stage_other, state.shared_other)))

  return StackedPipelineStep(train_jit, to_pipeline, to_model, shardings,
                             lambda o: jax.tree.map(lambda s: NamedSharding(mesh, s),
                                                    opt_specs(o)))
