"""Executed pipeline parallelism: a static slot table run per device inside `jax.shard_map`.

Sources: DeepSeek-V3 technical report §3.2.1 (DualPipe, Fig. 5, Table 2); 1F1B (Narayanan et
al. 2021); ZB1P / ZB-H1 (Qi et al. 2023, backward split into input-gradient B and
weight-gradient W). The schedules are `parallel.pipeline_schedule.SlotTable`s derived from
`analysis.timeline`'s simulator: this module only executes them.

`execute` runs on every device of a mesh with a stage axis (`parallel.mesh.STAGE_AXIS`), as
one `lax.scan` over the slots. In a slot each rank looks up its op in the table (indexed by
`lax.axis_index(stage)`) and `lax.switch`es to it:

* F (forward): runs the stage on the received activation (the first stage embeds its tokens
  inside `stage_fn`), stores the stage input, sends the output to the next stage;
* B (input gradient): recomputes the stage from its stored input and pulls the output
  gradient back to the input with `jax.vjp` (w.r.t. the input only), stores the output
  gradient, sends the input gradient to the previous stage;
* W (weight gradient): recomputes the stage and pulls the stored output gradient back to the
  parameters (`jax.vjp` w.r.t. the parameters only), accumulating them;
* idle.

After the op two `lax.ppermute`s over the stage axis move the slot's message one rank up and
one rank down (activations of direction 0 and gradients of direction 1 travel up; the others
down); the receiver files it into its inbox entry given by the table. DualPipe ranks hold two
chunks: stage r of direction 0 and stage pp - 1 - r of direction 1 (the second copy of the
parameters comes from rank pp - 1 - r by one ppermute, its gradients go back the same way and
are added). The stage axis is the only axis `execute` communicates over; collectives inside
`stage_fn` (the MoE dispatch over (`node`, `gpu`)) run among the devices of one stage, which
always take the same branch.

Every message and buffer entry carries a tag (kind, direction, micro-batch): the executor counts
tags that differ from what the table expects (`PipelineRun.mismatches`, 0 when the schedule's
dependencies hold), the idle slots it ran and the peak of stored stage inputs alive (F to W),
the activation memory of Table 2.

Stage transfer (`transfer`). "ppermute" (default) moves each message with `lax.ppermute`: the
fewest bytes (one message per direction). On XLA:CPU + gloo a ppermute's communicator spans
every device of the program even over a 16-member axis (NOTES-2048.md in the shared
reference folder), which at 2048 devices cannot fit the open-file limit. "all_gather" moves the
same message with one `lax.all_gather` over the stage axis (a group of pp members only) and
each rank keeps the entry of its neighbour (rank - 1 for the upward message, rank + 1 for the downward one; the
DualPipe mirror exchange keeps entry pp - 1 - rank). Byte cost per slot and device: ppermute
sends the message twice (up and down) = 2 x M bytes; all_gather receives (pp - 1) x M, i.e.
(pp - 1) / 2 times as many (7.5x at pp = 16), and holds a [pp, *act_shape] buffer. The results
are identical (the same values are selected; tests/parallel/test_pipeline_transfer.py).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dsv3_jax.parallel.mesh import STAGE_AXIS
from dsv3_jax.parallel.pipeline_schedule import (ACTIVATION, BWD_INPUT, COL, FWD, GRADIENT, IDLE,
                                                 SlotTable)
from dsv3_jax.vma import varying_axes

# stage_fn(params, consts, shared, shared_consts, x, *, direction, micro_batch, stage)
#   -> ((y, loss), (sums, maxes)):
# one stage on one micro-batch. params / consts: the chunk's parameters and constants (pytrees);
# shared / shared_consts: those every rank holds (embedding, head, ...); x [*act_shape] the
# stage input (ignored on stage 0); direction: static int; micro_batch, stage: int32 [] (micro-batch index within all
# micro-batches, model stage). y: [*act_shape] the stage output (unused on the last stage);
# loss: [] float32 this micro-batch's loss share on this stage (its cotangent is
# `loss_scale`); sums / maxes: pytrees of statistics summed / maxed over the stage's
# micro-batches.
StageFn = Callable[..., Any]


class PipelineRun(NamedTuple):
  """What `execute` returns on one device.

  stage_grads: gradient of the rank's own stage parameters (DualPipe: both chunks' gradients,
    the second chunk's sent back to its owner), same tree as `stage_params`, not yet summed
    over data-parallel devices.
  shared_grads: gradient of `shared`, this device's part (sum it over every axis).
  sums, maxes: per direction, the statistics of `stage_fn` accumulated over the micro-batches
    the rank ran forward in that direction.
  idle: [] int32 idle slots this rank ran.
  peak_activations: [] int32 peak of stored stage inputs alive (forward to weight gradient).
  mismatches: [] int32 messages or buffer reads whose tag was not the expected one.
  """

  stage_grads: Any
  shared_grads: Any
  sums: tuple
  maxes: tuple
  idle: jax.Array
  peak_activations: jax.Array
  mismatches: jax.Array


def _manual_axes() -> tuple:
  return tuple(jax.sharding.get_abstract_mesh().manual_axes)


def _vary(tree):
  """Casts every leaf to vary over every manual mesh axis (switch / cond / scan carries)."""
  axes = _manual_axes()

  def leaf(x):
    x = jnp.asarray(x)
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(leaf, tree)


TRANSFERS = ("ppermute", "all_gather")


def _shift(tree, perm, stage_axis: str, transfer: str):
  """Sends every leaf along `perm` ([(source, destination)] stage ranks) over `stage_axis`;
  ranks that are no destination get zeros (as `lax.ppermute`). "all_gather": one all_gather
  over the stage axis, then each rank selects its source's entry."""
  if transfer == "ppermute":
    return jax.lax.ppermute(tree, stage_axis, perm)
  pp = dict(jax.sharding.get_abstract_mesh().shape)[stage_axis]
  src = [-1] * pp
  for s, d in perm:
    src[d] = s
  me = jnp.asarray(src, jnp.int32)[jax.lax.axis_index(stage_axis)]
  return _pick(jax.tree.map(lambda x: jax.lax.all_gather(x, stage_axis), tree), me)


def _pick(gathered, src):
  """Entry `src` (a traced stage rank; -1 = none: zeros) of every [pp, ...] leaf."""
  return jax.tree.map(lambda a: jnp.where(src >= 0, jax.lax.dynamic_index_in_dim(
      a, jnp.clip(src, 0, a.shape[0] - 1), 0, keepdims=False), jnp.zeros_like(a[0])), gathered)


def exchange_neighbours(tree, stage_axis: str, transfer: str):
  """Every stage rank's `tree` to both neighbours: (from the rank below, from the rank
  above), zeros where there is no such rank (rank 0 below, rank pp - 1 above). "ppermute":
  two ppermutes (one per direction); "all_gather": one all_gather over the stage axis serves
  both. The same values either way (tests/parallel/test_pipeline_transfer.py)."""
  pp = dict(jax.sharding.get_abstract_mesh().shape)[stage_axis]
  if transfer == "ppermute":
    return (jax.lax.ppermute(tree, stage_axis, [(r, r + 1) for r in range(pp - 1)]),
            jax.lax.ppermute(tree, stage_axis, [(r + 1, r) for r in range(pp - 1)]))
  rank = jax.lax.axis_index(stage_axis)
  g = jax.tree.map(lambda x: jax.lax.all_gather(x, stage_axis), tree)  # one gather, both sides
  return _pick(g, rank - 1), _pick(g, jnp.where(rank < pp - 1, rank + 1, -1))


def _tag(kind: int, direction, micro_batch, per_direction: int):
  """Unique positive int32 per (kind, direction, micro-batch)."""
  return 1 + (kind * 2 + direction) * per_direction + micro_batch


def execute(table: SlotTable, stage_fn: StageFn, stage_params, shared, *, act_shape: Sequence[int],
            act_dtype, loss_scale: float, stage_consts=(), shared_consts=(),
            stage_axis: str = STAGE_AXIS, transfer: str = "ppermute") -> PipelineRun:
  """Runs one step of the pipeline schedule `table` on this device (inside `jax.shard_map`).

  Args:
    table: the schedule (`pipeline_schedule.build_slot_table`); its pp must be the size of
      `stage_axis`.
    stage_fn: see `StageFn`.
    stage_params: pytree, this rank's stage parameters (stage r), differentiated.
    shared: pytree of parameters every rank holds, differentiated.
    stage_consts, shared_consts: pytrees passed to `stage_fn` beside them and not
      differentiated (router biases); DualPipe's second chunk gets its stage's constants too.
    act_shape, act_dtype: the activation passed between stages, e.g. [b, S, D] float32.
    loss_scale: cotangent of every micro-batch's loss (e.g. 1 / (devices x micro-batches)).
    stage_axis: the mesh axis of the pipeline ranks.
    transfer: how messages move between stages (pipeline.transfer): "ppermute" (default) or
      "all_gather" (groups of the stage axis only; see the module docstring for the bytes).

  Returns:
    `PipelineRun`.

  Raises:
    ValueError: the stage axis size differs from the table's pp, or an unknown transfer.
  """
  if transfer not in TRANSFERS:
    raise ValueError(f"pipeline.transfer={transfer!r}; allowed: {', '.join(TRANSFERS)}")
  pp, n_dir, per_dir = table.pp, table.directions, table.micro_batches_per_direction
  size = dict(jax.sharding.get_abstract_mesh().shape).get(stage_axis)
  if size != pp:
    raise ValueError(f"the slot table has {pp} stages but mesh axis {stage_axis!r} has {size}")
  rank = jax.lax.axis_index(stage_axis)
  stage_params, shared = _vary(stage_params), _vary(shared)
  stage_consts, shared_consts = _vary(stage_consts), _vary(shared_consts)
  chunks, consts = [stage_params], [stage_consts]
  if n_dir == 2:  # DualPipe: the copy of stage pp - 1 - r, from rank pp - 1 - r
    mirror = [(s, pp - 1 - s) for s in range(pp)]
    chunks.append(_shift(stage_params, mirror, stage_axis, transfer))
    consts.append(_shift(stage_consts, mirror, stage_axis, transfer))
  stage_of = lambda d: rank if d == 0 else pp - 1 - rank
  zeros = lambda n: jnp.zeros((n,) + tuple(act_shape), act_dtype)
  stats0 = []
  for d in range(n_dir):
    probe = jax.eval_shape(
        lambda p, s, x: stage_fn(p, consts[d], s, shared_consts, x, direction=d,
                                 micro_batch=jnp.int32(0), stage=jnp.int32(0))[1],
        chunks[d], shared, jnp.zeros(act_shape, act_dtype))
    stats0.append(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), probe))
  e = table.entries
  carry = dict(
      act=zeros(e["act_in"]), act_tag=jnp.zeros(e["act_in"], jnp.int32),
      grad=zeros(e["grad_in"]), grad_tag=jnp.zeros(e["grad_in"], jnp.int32),
      x=zeros(e["x"]), x_tag=jnp.zeros(e["x"], jnp.int32),
      dy=zeros(e["dy"]), dy_tag=jnp.zeros(e["dy"], jnp.int32),
      grads=[jax.tree.map(jnp.zeros_like, c) for c in chunks],
      shared_grads=jax.tree.map(jnp.zeros_like, shared),
      sums=[s[0] for s in stats0], maxes=[s[1] for s in stats0],
      idle=jnp.int32(0), live=jnp.int32(0), peak=jnp.int32(0), bad=jnp.int32(0))
  carry = _vary(carry)
  seed = jnp.float32(loss_scale)

  def call(d, params, sh, x, m):
    return stage_fn(params, consts[d], sh, shared_consts, x, direction=d,
                    micro_batch=d * per_dir + m, stage=stage_of(d))

  def check(c, ok):
    c["bad"] = c["bad"] + jnp.where(ok, 0, 1).astype(jnp.int32)
    return c

  def idle(c, my):
    c = dict(c)
    c["idle"] = c["idle"] + 1
    return _vary((c, zeros(1)[0], jnp.int32(0)))

  def fwd(d):
    def branch(c, my):
      c = dict(c)
      m, s = my[COL["micro_batch"]], stage_of(d)
      x_in = c["act"][my[COL["in_entry"]]]
      c = check(c, (s == 0) |
                (c["act_tag"][my[COL["in_entry"]]] == _tag(ACTIVATION, d, m, per_dir)))
      (y, _), (sums, maxes) = call(d, chunks[d], shared, x_in, m)
      c["x"] = c["x"].at[my[COL["x_entry"]]].set(x_in)
      c["x_tag"] = c["x_tag"].at[my[COL["x_entry"]]].set(_tag(FWD, d, m, per_dir))
      c["sums"] = [jax.tree.map(jnp.add, a, b) if i == d else a
                   for i, (a, b) in enumerate(zip(c["sums"], [sums] * n_dir))]
      c["maxes"] = [jax.tree.map(jnp.maximum, a, b) if i == d else a
                    for i, (a, b) in enumerate(zip(c["maxes"], [maxes] * n_dir))]
      c["live"] = c["live"] + 1
      c["peak"] = jnp.maximum(c["peak"], c["live"])
      tag = jnp.where(s < pp - 1, _tag(ACTIVATION, d, m, per_dir), 0)
      return _vary((c, y.astype(act_dtype), tag))
    return branch

  def bwd_input(d):
    def branch(c, my):
      c = dict(c)
      m, s = my[COL["micro_batch"]], stage_of(d)
      x_in = c["x"][my[COL["x_entry"]]]
      c = check(c, c["x_tag"][my[COL["x_entry"]]] == _tag(FWD, d, m, per_dir))
      g = c["grad"][my[COL["in_entry"]]]
      last = s == pp - 1
      c = check(c, last | (c["grad_tag"][my[COL["in_entry"]]] == _tag(GRADIENT, d, m, per_dir)))
      dy = jnp.where(last, jnp.zeros_like(g), g)
      _, pull = jax.vjp(lambda x: call(d, chunks[d], shared, x, m)[0], x_in)
      (dx,) = pull(_vary((dy, seed)))
      c["dy"] = c["dy"].at[my[COL["dy_entry"]]].set(dy)
      c["dy_tag"] = c["dy_tag"].at[my[COL["dy_entry"]]].set(_tag(BWD_INPUT, d, m, per_dir))
      tag = jnp.where(s > 0, _tag(GRADIENT, d, m, per_dir), 0)
      return _vary((c, dx.astype(act_dtype), tag))
    return branch

  def bwd_weight(d):
    def branch(c, my):
      c = dict(c)
      m = my[COL["micro_batch"]]
      x_in, dy = c["x"][my[COL["x_entry"]]], c["dy"][my[COL["dy_entry"]]]
      c = check(c, (c["x_tag"][my[COL["x_entry"]]] == _tag(FWD, d, m, per_dir))
                & (c["dy_tag"][my[COL["dy_entry"]]] == _tag(BWD_INPUT, d, m, per_dir)))
      _, pull = jax.vjp(lambda p, sh: call(d, p, sh, x_in, m)[0], chunks[d], shared)
      dp, dsh = pull(_vary((dy, seed)))
      c["grads"] = [jax.tree.map(jnp.add, a, dp) if i == d else a
                    for i, a in enumerate(c["grads"])]
      c["shared_grads"] = jax.tree.map(jnp.add, c["shared_grads"], dsh)
      c["live"] = c["live"] - 1
      return _vary((c, zeros(1)[0], jnp.int32(0)))
    return branch

  branches = ([idle] + [fwd(d) for d in range(n_dir)] + [bwd_input(d) for d in range(n_dir)]
              + [bwd_weight(d) for d in range(n_dir)])
  def receive(c, msg, tag, my, side):
    kind, entry = my[COL[side]], my[COL[side + "_entry"]]
    d, m = my[COL[side + "_direction"]], my[COL[side + "_micro_batch"]]
    c = check(c, (kind == 0) | (tag == _tag(kind, d, m, per_dir)))
    for k, buf in ((ACTIVATION, "act"), (GRADIENT, "grad")):
      hit = kind == k
      c[buf] = c[buf].at[entry].set(jnp.where(hit, msg, c[buf][entry]))
      c[buf + "_tag"] = c[buf + "_tag"].at[entry].set(jnp.where(hit, tag, c[buf + "_tag"][entry]))
    return c

  def slot(c, row):
    my = jnp.take(row, rank, axis=0)
    op, d = my[COL["op"]], my[COL["direction"]]
    code = jnp.where(op == IDLE, 0, 1 + (op - 1) * n_dir + d)
    c, msg, tag = jax.lax.switch(code, branches, c, my)
    c = dict(c)
    from_below, from_above = exchange_neighbours((msg, tag), stage_axis, transfer)
    c = receive(c, *from_below, my, "recv_up")
    c = receive(c, *from_above, my, "recv_down")
    return _vary(c), None

  carry, _ = jax.lax.scan(slot, carry, jnp.asarray(table.table))
  grads = carry["grads"][0]
  if n_dir == 2:  # the second copy's gradient back to the rank that owns that stage
    back = _shift(carry["grads"][1], [(s, pp - 1 - s) for s in range(pp)], stage_axis, transfer)
    grads = jax.tree.map(jnp.add, grads, back)
  return PipelineRun(stage_grads=grads, shared_grads=carry["shared_grads"],
                     sums=tuple(carry["sums"]), maxes=tuple(carry["maxes"]), idle=carry["idle"],
                     peak_activations=carry["peak"], mismatches=carry["bad"])
