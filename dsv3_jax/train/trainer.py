"""Config-driven training: losses, the jitted step, dropless capacity control, evaluation.

One step (DESIGN.md "Data flow"): tokens -> model (+ MTP) -> loss = CE + lambda * MTP +
alpha * balance -> grads -> optax AdamW -> auxiliary-loss-free bias update from the step's
per-expert loads (padding excluded) -> metrics.

Dropless mode (`train.dropless`): MoE buffers have a static capacity (XLA needs static shapes);
each step reports the capacity it needed, and a step that would have dropped a token is
discarded and recomputed with a larger capacity (one recompilation per growth). The applied
update therefore never drops a token, and the steady-state cost is that of the observed maximum
load rather than of the worst case.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.moe import RouterBias
from dsv3_jax.model.transformer import ModelOutput, Transformer


# ----------------------------------------------------------------------------- losses


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats over positions where mask is True.

  Args:
    logits: [B, S, V] float32; targets: [B, S] int32; mask: [B, S] bool.
  """
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  return jnp.sum((logz - gold) * m) / jnp.maximum(jnp.sum(m), 1.0)


class Batch(NamedTuple):
  """One step's tensors (B sequences of S inputs, MTP depth D).

  inputs [B, S] t_0..t_{S-1}; targets [B, S] t_1..t_S; mask [B, S] bool (input and target are
  real tokens); mtp_tokens [B, S + D] t_0..t_{S+D-1} (depth d embeds t_{i+d}); mtp_targets and
  mtp_masks: D arrays [B, S], depth d's target t_{i+d+1} and where it is a real token.
  """

  inputs: jax.Array
  targets: jax.Array
  mask: jax.Array
  mtp_tokens: jax.Array
  mtp_targets: tuple
  mtp_masks: tuple


def make_batch(window: jax.Array, seq_len: int, mtp_depth: int,
               token_mask: Optional[jax.Array] = None) -> Batch:
  """Splits token windows into inputs, targets and MTP targets with their loss masks.

  The data pipeline reads windows of S + 1 + D tokens, so every depth supervises every
  position. Shorter windows, or `token_mask` False (padding), leave positions whose target falls
  off the end of the real tokens unsupervised (mask False) at every depth.

  Args:
    window: [B, L] int32 tokens, L >= seq_len + 1 (missing tail tokens count as padding).
    seq_len: S.
    mtp_depth: D >= 0.
    token_mask: optional [B, L] bool, True for real tokens (default: all of the window).
  """
  b, length = window.shape
  if length < seq_len + 1:
    raise ValueError(f"windows of {length} tokens cannot give {seq_len} inputs and targets")
  if token_mask is None:
    token_mask = jnp.ones((b, length), jnp.bool_)
  full = seq_len + 1 + mtp_depth
  if length < full:
    window = jnp.pad(window, ((0, 0), (0, full - length)))
    token_mask = jnp.pad(token_mask, ((0, 0), (0, full - length)), constant_values=False)
  s = seq_len
  real_in = token_mask[:, :s]
  tgt = lambda k: window[:, k:k + s]
  tgt_mask = lambda k: real_in & token_mask[:, k:k + s]
  return Batch(
      inputs=window[:, :s], targets=tgt(1), mask=tgt_mask(1),
      mtp_tokens=window[:, :s + mtp_depth],
      mtp_targets=tuple(tgt(d + 1) for d in range(1, mtp_depth + 1)),
      mtp_masks=tuple(tgt_mask(d + 1) for d in range(1, mtp_depth + 1)))


class LossOutput(NamedTuple):
  total: jax.Array
  ce: jax.Array
  mtp: jax.Array
  balance: jax.Array


def compute_losses(out: ModelOutput, batch: Batch, *, mtp_weight: float,
                   balance_alpha: float) -> LossOutput:
  """L = CE + lambda/D * sum_d CE_d + alpha * sum_layers sum_i f_i P_i (report eqs. 17-25)."""
  ce = cross_entropy(out.logits, batch.targets, batch.mask)
  if out.mtp_logits:
    mtp = sum(cross_entropy(lg, tg, m)
              for lg, tg, m in zip(out.mtp_logits, batch.mtp_targets, batch.mtp_masks))
    mtp = mtp / len(out.mtp_logits)
  else:
    mtp = jnp.float32(0.0)
  balance = sum((st.balance_loss for st in out.moe_stats), jnp.float32(0.0))
  total = ce + mtp_weight * mtp + balance_alpha * balance
  return LossOutput(total, ce, mtp, balance)


def bias_update(bias: jax.Array, counts: jax.Array, gamma: float) -> jax.Array:
  """Aux-loss-free balancing (report §2.1.2): b_i -= gamma if expert i is overloaded
  (load above the mean), += gamma if underloaded; unchanged at exactly the mean.

  Args:
    bias: [E] float32; counts: [E] float32 this step's assignments per expert (no padding).
  """
  return bias + gamma * jnp.sign(jnp.mean(counts) - counts)


# ----------------------------------------------------------------------------- state


@dataclasses.dataclass
class TrainState:
  """Everything a step reads and writes; `params`, `other` and `opt_state` are pytrees."""

  step: int
  params: Any  # nnx.State of nnx.Param
  other: Any  # nnx.State of everything else (the RouterBias variables)
  opt_state: Any
  capacity: tuple[int, ...]


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay to min_learning_rate_ratio * peak, global-norm
  clipping, and weight decay on matrices only (not on norms' scales or 1-D vectors)."""
  t = train_cfg
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1),
      end_value=t.learning_rate * t.min_learning_rate_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip_norm),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))


class StepFns(NamedTuple):
  train_step: Callable  # (params, other, opt_state, window, capacity) -> (params, other, opt, metrics)
  eval_step: Callable  # (params, other, window, capacity) -> (nats, predicted tokens, needed cap.)


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
      needed_capacity=_needed(stats))


def make_step_fns(graphdef, optimizer, model_cfg: ModelConfig, train_cfg, seq_len: int,
                  mesh=None, param_shardings=None, other_shardings=None,
                  opt_shardings=None) -> StepFns:
  """Builds the jitted train and eval steps for a split nnx model.

  On a mesh the forward and backward passes run per device inside one `jax.shard_map` over
  (`node`, `gpu`): each device holds B / n_dev sequences and its E / n_dev experts, the MoE
  dispatch uses explicit all_to_alls, and the gradients of replicated parameters are summed over
  devices by shard_map's transpose. (Leaving the dense parts to GSPMD instead made it insert
  all-gathers of activations on the emulated mesh.) The optimizer update runs on the global
  arrays.
  """
  depth = model_cfg.mtp_depth
  gamma = float(train_cfg.bias_update_speed)
  mtp_w, alpha = float(train_cfg.mtp_loss_weight), float(train_cfg.balance_loss_alpha)
  axes = tuple(mesh.axis_names) if mesh is not None else ()
  n_dev = 1 if mesh is None else mesh.size
  mean = (lambda x: jax.lax.pmean(x, axes)) if mesh is not None else (lambda x: x)

  def per_device_grads(params, other, window, capacity):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, other)
      batch = make_batch(window, seq_len, depth)
      out = model.forward(batch.inputs, mtp_tokens=batch.mtp_tokens if depth else None,
                          mask=batch.mask, capacity=capacity, with_mtp=depth > 0)
      losses = compute_losses(out, batch, mtp_weight=mtp_w, balance_alpha=alpha)
      # Every device holds the same number of sequences, so the global mean loss is the mean
      # of the per-device losses; shard_map sums replicated parameters' gradients over devices.
      return losses.total / n_dev, (losses, out.moe_stats)

    (_, (losses, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics = dict(loss=mean(losses.ce), mtp_loss=mean(losses.mtp),
                   balance_loss=mean(losses.balance), total_loss=mean(losses.total),
                   **_dispatch_totals(stats))
    return grads, metrics

  def per_device_eval(params, other, window, capacity):
    model = nnx.merge(graphdef, params, other)
    batch = make_batch(window, seq_len, depth)
    out = model.forward(batch.inputs, mask=batch.mask, capacity=capacity, with_mtp=False)
    logz = jax.nn.logsumexp(out.logits, axis=-1)
    gold = jnp.take_along_axis(out.logits, batch.targets[..., None], axis=-1)[..., 0]
    m = batch.mask.astype(jnp.float32)
    nats, count = jnp.sum((logz - gold) * m), jnp.sum(m)
    if mesh is not None:
      nats, count = jax.lax.psum(nats, axes), jax.lax.psum(count, axes)
    return nats, count, _needed(out.moe_stats)

  if mesh is not None:
    spec = lambda shardings: jax.tree.map(lambda sh: sh.spec, shardings)
    p_spec, o_spec, tok = spec(param_shardings), spec(other_shardings), P(axes)
    grads_fn = lambda p, o, w, c: jax.shard_map(
        lambda p, o, w: per_device_grads(p, o, w, c), mesh=mesh, in_specs=(p_spec, o_spec, tok),
        out_specs=(p_spec, P()))(p, o, w)
    eval_fn = lambda p, o, w, c: jax.shard_map(
        lambda p, o, w: per_device_eval(p, o, w, c), mesh=mesh, in_specs=(p_spec, o_spec, tok),
        out_specs=(P(), P(), P()))(p, o, w)
  else:
    grads_fn, eval_fn = per_device_grads, per_device_eval

  def train_step(params, other, opt_state, window, capacity):
    grads, metrics = grads_fn(params, other, window, capacity)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    model = nnx.merge(graphdef, params, other)
    for moe, counts in zip(model.moe_layers, metrics["expert_counts"]):
      b = moe.gate.e_score_correction_bias
      b[...] = bias_update(b[...], counts, gamma)
    other = nnx.state(model, nnx.Not(nnx.Param))
    metrics["grad_norm"] = optax.tree.norm(grads)
    return params, other, opt_state, metrics

  if mesh is not None:
    batch_sharding = NamedSharding(mesh, P(axes))
    state_sh = (param_shardings, other_shardings, opt_shardings)
    train_jit = jax.jit(train_step, static_argnums=(4,),
                        in_shardings=state_sh + (batch_sharding,),
                        out_shardings=state_sh + (None,))
    eval_jit = jax.jit(eval_fn, static_argnums=(3,),
                       in_shardings=(param_shardings, other_shardings, batch_sharding))
  else:
    train_jit = jax.jit(train_step, static_argnums=(4,))
    eval_jit = jax.jit(eval_fn, static_argnums=(3,))
  return StepFns(train_jit, eval_jit)


def _needed(stats) -> jax.Array:
  """[hops] int32: the largest capacity any MoE layer needed this step."""
  if not stats:
    return jnp.zeros((1,), jnp.int32)
  return jnp.max(jnp.stack([st.dispatch.needed_capacity for st in stats]), axis=0)


def grow_capacity(capacity: tuple[int, ...], needed: np.ndarray, worst: tuple[int, ...],
                  headroom: float = 1.25) -> tuple[int, ...]:
  """New per-hop capacity after an overflow: needed * headroom rounded up to 8, capped at the
  worst case (which can never overflow)."""
  out = []
  for c, n, w in zip(capacity, needed, worst):
    n = int(n)
    out.append(c if n <= c else int(min(w, 8 * math.ceil(n * headroom / 8))))
  return tuple(out)


# ----------------------------------------------------------------------------- the job


def validate(cfg) -> ModelConfig:
  """Checks a training ConfigDict before any work is done or any file is written.

  Raises:
    ValueError / FileNotFoundError: naming the setting and the allowed values.
  """
  from dsv3_jax.train import data as data_lib

  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  nodes, gpus = cfg.mesh.nodes, cfg.mesh.gpus_per_node
  for name, v in (("mesh.nodes", nodes), ("mesh.gpus_per_node", gpus)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  n_dev = nodes * gpus
  have = jax.device_count()
  if have < n_dev:
    raise ValueError(
        f"the mesh mesh.nodes x mesh.gpus_per_node = {nodes} x {gpus} needs {n_dev} devices but "
        f"jax has {have}; set XLA_FLAGS=--xla_force_host_platform_device_count={n_dev} before "
        "importing jax (dsv3-train does this)")
  ep_nodes = cfg.mesh.get("ep_nodes") or nodes
  if not isinstance(ep_nodes, int) or ep_nodes < 1 or nodes % ep_nodes:
    raise ValueError(f"mesh.ep_nodes={ep_nodes!r} must be a positive divisor of "
                     f"mesh.nodes={nodes}")
  ep = ep_nodes * gpus
  if model_cfg.n_routed_experts % ep:
    raise ValueError(
        f"model.n_routed_experts={model_cfg.n_routed_experts} is not divisible by the "
        f"expert-parallel size mesh.ep_nodes x mesh.gpus_per_node = {ep}; allowed: a multiple "
        f"of {ep}")
  if ep_nodes > 1 and model_cfg.n_group != ep_nodes:
    raise ValueError(
        f"model.n_group={model_cfg.n_group} must equal the {ep_nodes} nodes of the "
        "expert-parallel group (mesh.ep_nodes, default mesh.nodes): expert groups are nodes, so "
        "that model.topk_group bounds the nodes a token reaches (node-limited routing, report "
        "§2.1.2)")
  t = cfg.train
  for name in ("batch_size", "steps", "log_every", "eval_every", "checkpoint_every"):
    v = t[name]
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"train.{name} must be a positive integer, got {v!r}")
  if t.batch_size % n_dev:
    raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the {n_dev} devices "
                     f"of the mesh (data parallelism); allowed: multiples of {n_dev}")
  if not isinstance(t.warmup_steps, int) or t.warmup_steps < 0:
    raise ValueError(f"train.warmup_steps must be >= 0, got {t.warmup_steps!r}")
  if t.learning_rate <= 0:
    raise ValueError(f"train.learning_rate must be > 0, got {t.learning_rate}")
  seq = cfg.data.seq_len
  if not isinstance(seq, int) or not 1 <= seq <= model_cfg.max_position_embeddings:
    raise ValueError(f"data.seq_len={seq!r}; allowed: 1..model.max_position_embeddings="
                     f"{model_cfg.max_position_embeddings}")
  if not 0.0 < cfg.data.heldout_fraction < 1.0:
    raise ValueError(f"data.heldout_fraction must be in (0, 1), got {cfg.data.heldout_fraction}")
  data_lib.list_corpus_files(cfg.data.paths)  # raises on a missing path / no files
  return model_cfg


def _link_bytes(metrics, moe, model_cfg: ModelConfig) -> dict[str, float]:
  """Per-step bytes per link class: token rows x the wire bytes of one row, dispatch plus
  combine (each row that goes out comes back), for the rows carrying tokens and for the padded
  buffers the all_to_alls actually move. Metadata (expert ids, gates) is not counted."""
  if moe is None:
    return {}
  from dsv3_jax.parallel.dispatch import payload_bytes_per_row

  d, dt = model_cfg.hidden_size, model_cfg.dtype
  per_row = (payload_bytes_per_row(moe.schedule.dispatch_codec, d, dt) +
             payload_bytes_per_row(moe.schedule.combine_codec, d, dt))
  out = {}
  for k in ("rows_inter_node", "rows_intra_node", "buffer_rows_inter_node",
            "buffer_rows_intra_node"):
    out[k.replace("rows", "bytes")] = float(metrics[k]) * per_row
  return out


def _eval_loss(fns: StepFns, params, other, windows: np.ndarray, batch_size: int,
               capacity, worst, put) -> float:
  """Held-out cross-entropy in nats per predicted byte (dropless: a batch whose loads exceed
  `capacity` is recomputed at the worst-case capacity)."""
  total, count = 0.0, 0.0
  for i in range(0, len(windows) - batch_size + 1, batch_size):
    w = put(windows[i:i + batch_size])
    nats, n, needed = fns.eval_step(params, other, w, capacity)
    if np.any(np.asarray(needed) > np.asarray(capacity)):
      nats, n, _ = fns.eval_step(params, other, w, worst)
    total += float(nats)
    count += float(n)
  return total / max(count, 1.0)


def train(cfg, *, progress: bool = True, log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the training job described by `cfg` (see configs/tiny.py).

  Writes `<workdir>/config.json`, `metrics.jsonl`, `summary.json` and orbax checkpoints every
  `train.checkpoint_every` steps; if the workdir holds a checkpoint, training resumes from it.

  Returns:
    The summary dict (held-out loss in nats/byte, step time, tokens/s, compile time, ...).

  Raises:
    ValueError / FileNotFoundError: a bad config, before any file is written.
  """
  import json
  import os

  from tqdm.auto import tqdm

  from dsv3_jax.parallel.mesh import make_mesh, shard_model, state_shardings
  from dsv3_jax.train import data as data_lib
  from dsv3_jax.train.checkpoint import Checkpointer
  from dsv3_jax.train.metrics import MetricsWriter, format_line, to_python

  model_cfg = validate(cfg)
  t, dcfg = cfg.train, cfg.data
  corpus = data_lib.load_corpus(dcfg.paths, dcfg.heldout_fraction)
  h1, h2 = data_lib.byte_entropies(corpus.heldout)
  log(f"data: {corpus.n_train_files} train files ({len(corpus.train) / 1e6:.2f} MB), "
      f"{corpus.n_heldout_files} held-out ({len(corpus.heldout) / 1e6:.2f} MB); held-out byte "
      f"entropy: unigram {h1:.3f}, bigram conditional {h2:.3f} nats")
  depth = model_cfg.mtp_depth
  seq = dcfg.seq_len
  windows = data_lib.eval_windows(corpus.heldout, seq_len=seq, extra=depth,
                                  n=dcfg.eval_sequences)
  dataset = data_lib.train_dataset(corpus.train, seq_len=seq, extra=depth,
                                   batch_size=t.batch_size, seed=dcfg.seed)

  n_dev = cfg.mesh.nodes * cfg.mesh.gpus_per_node
  mesh = (make_mesh(cfg.mesh.nodes, cfg.mesh.gpus_per_node, cfg.mesh.get("ep_nodes"))
          if n_dev > 1 else None)
  model = Transformer(model_cfg, mesh=mesh, rngs=nnx.Rngs(t.seed))
  if mesh is not None:
    shard_model(model, mesh)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  optimizer = make_optimizer(t)
  opt_state = optimizer.init(params)
  if mesh is not None:
    # Moments inherit the parameters' shardings; scalars (the step count) are replicated.
    replicated = NamedSharding(mesh, P())
    opt_state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        opt_state)
    sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    p_sh, o_sh, opt_sh = sh(params), sh(other), sh(opt_state)
    batch_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    put = lambda x: jax.device_put(np.asarray(x), batch_sharding)
  else:
    p_sh = o_sh = opt_sh = None
    put = jnp.asarray
  fns = make_step_fns(graphdef, optimizer, model_cfg, t, seq, mesh, p_sh, o_sh, opt_sh)
  moe0 = model.moe_layers[0] if model.moe_layers else None
  tokens_per_step = t.batch_size * seq
  worst = moe0.worst_case_capacity(tokens_per_step) if moe0 else (1,)
  capacity = moe0.initial_capacity(tokens_per_step) if moe0 else (1,)

  os.makedirs(t.workdir, exist_ok=True)
  ckpt = Checkpointer(t.workdir, save_every=t.checkpoint_every)
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:  # restore first: a mismatching config fails before anything is written
    state, meta = ckpt.restore(latest, {"params": params, "other": other, "opt_state": opt_state})
    params, other, opt_state = state["params"], state["other"], state["opt_state"]
    capacity = tuple(meta["capacity"])
    start = int(meta["step"])
    log(f"resumed from {ckpt.directory} at step {start} (MoE capacity {capacity})")
  with open(os.path.join(t.workdir, "config.json"), "w") as f:
    f.write(cfg.to_json(indent=2))
  writer = MetricsWriter(t.workdir)

  pbar = tqdm(total=t.steps, initial=start, disable=not progress, desc=cfg.get("name", "train"),
              dynamic_ncols=True)
  write = pbar.write if progress else log
  first_step_s, recompiles, step_times, last = None, 0, [], {}
  heldout = None
  for step in range(start, t.steps):
    window = put(dataset[step])
    t0 = time.perf_counter()
    while True:
      cached = fns.train_step._cache_size()
      new_params, new_other, new_opt, metrics = fns.train_step(params, other, opt_state, window,
                                                               capacity)
      metrics = jax.device_get(metrics)
      compiled = fns.train_step._cache_size() != cached
      recompiles += int(compiled and first_step_s is not None)
      needed = np.asarray(metrics["needed_capacity"])
      if t.dropless and np.any(needed > np.asarray(capacity)):
        capacity = grow_capacity(capacity, needed, worst)  # discard the step, recompute bigger
        continue
      break
    dt = time.perf_counter() - t0
    params, other, opt_state = new_params, new_other, new_opt
    if first_step_s is None:
      first_step_s = dt  # includes compilation
    else:
      step_times.append(dt)
    pbar.update(1)
    done = step + 1
    if done % t.log_every == 0 or done == t.steps:
      recent = step_times[-t.log_every:] or [dt]
      st = float(np.median(recent))
      last = dict(to_python(metrics), step=done, step_time_s=st,
                  tokens_per_s=tokens_per_step / st, capacity=list(capacity),
                  recompiles=recompiles, **_link_bytes(metrics, moe0, model_cfg))
      writer.write(last)
      write(format_line(last))
    if done % t.eval_every == 0 or done == t.steps:
      heldout = _eval_loss(fns, params, other, windows, t.batch_size, capacity, worst, put)
      writer.write({"step": done, "heldout_loss": heldout})
      write(f"step {done} | held-out loss {heldout:.4f} nats/byte")
    if done % t.checkpoint_every == 0 or done == t.steps:
      ckpt.save(done, {"params": params, "other": other, "opt_state": opt_state},
                {"step": done, "capacity": list(capacity)}, force=True)
  pbar.close()
  ckpt.close()
  if heldout is None:  # resumed a finished run: evaluate what was restored
    heldout = _eval_loss(fns, params, other, windows, t.batch_size, capacity, worst, put)
  times = step_times or [float("nan")]
  summary = dict(
      name=cfg.get("name", ""), steps=t.steps, resumed_from=start,
      heldout_loss=heldout, heldout_unigram_entropy=h1, heldout_bigram_entropy=h2,
      step_time_s=float(np.median(times)), tokens_per_s=tokens_per_step / float(np.median(times)),
      first_step_s=first_step_s, recompiles=recompiles, capacity=list(capacity),
      devices=n_dev, tokens_per_step=tokens_per_step, final=last)
  summary_path = os.path.join(t.workdir, "summary.json")
  if first_step_s is None and os.path.exists(summary_path):
    # Resumed a finished run: no step ran now, so keep the timings of the run that trained it.
    with open(summary_path) as f:
      before = json.load(f)
    for key in ("step_time_s", "tokens_per_s", "first_step_s", "recompiles", "final"):
      if key in before:
        summary[key] = before[key]
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=2)
  log(f"held-out loss {heldout:.4f} nats/byte (bigram entropy {h2:.3f}) | step "
      f"{summary['step_time_s']:.3f} s | {summary['tokens_per_s']:.0f} tokens/s")
  return summary


def load_trained(workdir: str, *, step: Optional[int] = None, mesh=None):
  """The model of a training run, restored from its checkpoints (newest unless `step`).

  Reads `<workdir>/config.json`; by default the model is rebuilt on one device (no mesh), which
  is what analysis scripts want; pass a mesh to keep expert parallelism.

  Returns:
    (config ConfigDict, Transformer with the trained parameters and router biases, step).

  Raises:
    FileNotFoundError: no config.json or no checkpoint in `workdir`.
  """
  import json
  import os

  from ml_collections import config_dict

  from dsv3_jax.train.checkpoint import Checkpointer

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not a training run directory")
  with open(path) as f:
    cfg = config_dict.ConfigDict(json.load(f))
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  model = Transformer(model_cfg, mesh=mesh, rngs=nnx.Rngs(0))
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  opt_state = make_optimizer(cfg.train).init(params)
  ckpt = Checkpointer(workdir, save_every=cfg.train.checkpoint_every)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
  state, _ = ckpt.restore(step, {"params": params, "other": other, "opt_state": opt_state})
  ckpt.close()
  return cfg, nnx.merge(graphdef, state["params"], state["other"]), step
