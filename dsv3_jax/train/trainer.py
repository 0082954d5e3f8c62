"""Config-driven training: the job around the step (build, restore, loop, summary).

`train(cfg)` runs a training job from an ml_collections config (configs/tiny.py): it checks the
config (`validate`), builds the data, the model on its mesh and the jitted steps (`step.py`),
restores the newest checkpoint, runs the steps with dropless capacity control, evaluates, and
writes `<workdir>/{config.json, metrics.jsonl, events.out.tfevents.* (TensorBoard),
summary.json, checkpoints/}`. The objective lives in `losses.py`, the step in `step.py`; their
public names are re-exported here.

Multi-process (`jax.process_count() > 1`, e.g. started by `dsv3_jax.cluster.launch` through
`cli.train_target`): every process runs this same code on one global (`node`, `gpu`) mesh over
`cluster.launch.cluster_devices` (N / P devices of each of the P processes, process 0's first).
Every process reads the same deterministic data and builds the same initial state; each global
array is assembled from the slices this process's devices hold (`make_array_from_callback`).
Host values (metrics, held-out loss, the replica check's checksums) are replicated outputs or
all-gathered, so every process takes the same decisions (capacity growth, skipped steps,
stops). orbax saves and restores on every process (the checkpoint directory is shared: the
processes run on one machine); only process 0 writes config.json, metrics.jsonl, the
TensorBoard events, summary.json and run_history.jsonl.

Dropless mode (`train.dropless`): MoE buffers have a static capacity (XLA needs static shapes);
each step reports the capacity it needed, and a step that would have dropped a token is
discarded and recomputed with a larger capacity (one recompilation per growth). The applied
update therefore never drops a token, and the steady-state cost is that of the observed maximum
load rather than of the worst case.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel.dispatch import EPTopology
from dsv3_jax.train import integrity
from dsv3_jax.train import metrics as metrics_lib
from dsv3_jax.train.losses import (Batch, LossOutput, bias_update, compute_losses,  # noqa: F401
                                   cross_entropy, make_batch)
from dsv3_jax.train.step import (GRAD_SUMS, StepFns, make_optimizer,  # noqa: F401
                                 make_step_fns, make_train_step, optimizer_state_shardings,
                                 resolve_grad_sum)


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


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(cfg, log: Optional[Callable[[str], None]] = None) -> ModelConfig:
  """Checks a training ConfigDict before any work is done or any file is written.

  Settings that are legal but probably not meant (train.steps < train.warmup_steps) are
  reported through `log` as a warning.

  Raises:
    ValueError / FileNotFoundError: naming the setting and the allowed values.
  """
  from dsv3_jax.train import data as data_lib

  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  m = cfg.model
  if not _number(m.rope_theta) or m.rope_theta <= 0:
    raise ValueError(f"model.rope_theta must be a number > 0 (RoPE base), got {m.rope_theta!r}")
  if not _number(m.rms_norm_eps) or m.rms_norm_eps <= 0:
    raise ValueError(f"model.rms_norm_eps must be > 0, got {m.rms_norm_eps!r}")
  nodes, gpus = cfg.mesh.nodes, cfg.mesh.gpus_per_node
  for name, v in (("mesh.nodes", nodes), ("mesh.gpus_per_node", gpus)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v!r}")
  n_dev = nodes * gpus
  have = jax.device_count()
  procs = jax.process_count()
  if procs > 1 and (n_dev % procs or n_dev // procs > jax.local_device_count()):
    raise ValueError(
        f"the mesh mesh.nodes x mesh.gpus_per_node = {nodes} x {gpus} = {n_dev} devices must "
        f"split evenly over the {procs} processes, at most {jax.local_device_count()} (the "
        f"local devices of each) per process; allowed sizes: multiples of {procs} up to "
        f"{procs * jax.local_device_count()}")
  if have < n_dev:
    raise ValueError(
        f"the mesh mesh.nodes x mesh.gpus_per_node = {nodes} x {gpus} needs {n_dev} devices but "
        f"jax has {have}; set XLA_FLAGS=--xla_force_host_platform_device_count={n_dev} before "
        "importing jax (dsv3-train does this)")
  ep_nodes = cfg.mesh.get("ep_nodes") or nodes
  if not isinstance(ep_nodes, int) or ep_nodes < 1 or nodes % ep_nodes:
    raise ValueError(f"mesh.ep_nodes={ep_nodes!r} must be a positive divisor of "
                     f"mesh.nodes={nodes}")
  # The expert layout rules (experts divide over the EP group; n_group = EP nodes), checked by
  # the same code that checks a DeepSeekMoE built on a mesh directly.
  EPTopology(n_nodes=ep_nodes, gpus_per_node=gpus).validate(model_cfg.n_routed_experts,
                                                            model_cfg.n_group)
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
  if not _number(t.learning_rate) or t.learning_rate <= 0:
    raise ValueError(f"train.learning_rate must be > 0, got {t.learning_rate}")
  checks = (  # (setting, ok, allowed)
      ("min_learning_rate_ratio", lambda v: 0 <= v <= 1, "[0, 1]"),
      ("weight_decay", lambda v: v >= 0, ">= 0"),
      ("b1", lambda v: 0 <= v < 1, "[0, 1)"),
      ("b2", lambda v: 0 <= v < 1, "[0, 1)"),
      ("grad_clip_norm", lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
      ("bias_update_speed", lambda v: v >= 0, ">= 0"),
      ("balance_loss_alpha", lambda v: v >= 0, ">= 0"),
      ("mtp_loss_weight", lambda v: v >= 0, ">= 0"),
  )
  for name, ok, allowed in checks:
    v = t[name]
    if not _number(v) or not ok(v):
      raise ValueError(f"train.{name}={v!r}; allowed: {allowed}")
  for name, default, low in (("max_nonfinite_steps", 3, 1), ("sdc_check_every", 50, 0)):
    v = t.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
      raise ValueError(f"train.{name} must be an integer >= {low}, got {v!r}")
  if not isinstance(t.get("shard_optimizer_state", False), bool):
    raise ValueError(f"train.shard_optimizer_state={t.shard_optimizer_state!r}; allowed: True "
                     "(ZeRO-1, train/zero1.py) or False")
  if t.warmup_steps > t.steps and log is not None:
    log(f"warning: train.warmup_steps={t.warmup_steps} > train.steps={t.steps}: the learning "
        "rate never reaches train.learning_rate")
  ev = cfg.data.eval_sequences
  if not isinstance(ev, int) or isinstance(ev, bool) or ev < 1:
    raise ValueError(f"data.eval_sequences must be a positive integer (held-out windows), "
                     f"got {ev!r}")
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


@dataclasses.dataclass
class _Job:
  """What `train` builds from a config before it touches the workdir."""

  cfg: Any  # the ConfigDict
  model_cfg: ModelConfig
  entropies: tuple[float, float]  # held-out byte unigram / bigram conditional entropy, nats
  windows: np.ndarray  # [N, S + 1 + D] int32 held-out windows
  dataset: Any  # dataset[step] -> [B, S + 1 + D] int32 training windows
  n_dev: int
  fns: StepFns
  mesh: Any  # the jax Mesh, or None on one device
  put: Callable  # host [B, L] batch -> device array (sharded over the mesh)
  moe0: Any  # the first DeepSeekMoE layer (capacities, payload codecs), or None
  tokens_per_step: int
  worst: tuple[int, ...]  # per-hop capacity that can never overflow
  initial_capacity: tuple[int, ...]
  state: dict  # {"params", "other", "opt_state"}: the checkpointed pytrees
  processes: int = 1  # jax.process_count()


def _global_put(tree, shardings):
  """Multi-process: a pytree of process-local arrays, the same value on every process, placed
  as global arrays with `shardings` (a matching tree of NamedShardings): each process copies
  only the slices its own devices hold (`jax.make_array_from_callback`; no collective, unlike
  `jax.device_put`, which first checks that every process passed the same value)."""
  def put(x, sharding):
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(put, tree, shardings)


def _load_data(cfg, model_cfg: ModelConfig, log):
  """The corpus split, held-out windows and the training dataset (data.py)."""
  from dsv3_jax.train import data as data_lib

  dcfg, t = cfg.data, cfg.train
  depth, seq = model_cfg.mtp_depth, dcfg.seq_len
  corpus = data_lib.load_corpus(dcfg.paths, dcfg.heldout_fraction, window=seq + 1 + depth)
  h1, h2 = data_lib.byte_entropies(corpus.heldout)
  how = ("by file" if corpus.split == "files" else
         f"within files: the last {dcfg.heldout_fraction:.0%} of each held out")
  log(f"data: {corpus.n_train_files} train files ({len(corpus.train) / 1e6:.2f} MB), "
      f"{corpus.n_heldout_files} held-out ({len(corpus.heldout) / 1e6:.2f} MB), split {how}; "
      f"held-out byte entropy: unigram {h1:.3f}, bigram conditional {h2:.3f} nats")
  windows = data_lib.eval_windows(corpus.heldout, seq_len=seq, extra=depth,
                                  n=dcfg.eval_sequences)
  dataset = data_lib.train_dataset(corpus.train, seq_len=seq, extra=depth,
                                   batch_size=t.batch_size, seed=dcfg.seed)
  return (h1, h2), windows, dataset


def _build(cfg, model_cfg: ModelConfig, log,
           mark: Callable[[str], Any] = lambda _: None) -> _Job:
  """Data, the model placed on its mesh, the optimizer state and the jitted steps (`mark(phase)`
  is called at the end of each: `memory.PhaseLog.mark`)."""
  from dsv3_jax.parallel.mesh import make_mesh, shard_model

  t, seq = cfg.train, cfg.data.seq_len
  entropies, windows, dataset = _load_data(cfg, model_cfg, log)
  mark("data")
  n_dev = cfg.mesh.nodes * cfg.mesh.gpus_per_node
  procs = jax.process_count()
  if procs > 1:
    from dsv3_jax.cluster.launch import cluster_devices, warm_up_collectives
    from dsv3_jax.parallel.mesh import state_shardings

    mesh = make_mesh(cfg.mesh.nodes, cfg.mesh.gpus_per_node, cfg.mesh.get("ep_nodes"),
                     devices=cluster_devices(n_dev))
    # Every gloo communicator of the mesh's axes before the first collective (members of a
    # group reaching its first collective > ~30 s apart fail or hang; see the function).
    warm_up_collectives(mesh, log=log)
    # The same seed on every process: the same initial values, placed slice by slice.
    model = Transformer(model_cfg, mesh=mesh, rngs=nnx.Rngs(t.seed))
    state = nnx.state(model)
    nnx.update(model, _global_put(state, state_shardings(state, mesh)))
  else:
    mesh = (make_mesh(cfg.mesh.nodes, cfg.mesh.gpus_per_node, cfg.mesh.get("ep_nodes"))
            if n_dev > 1 else None)
    model = Transformer(model_cfg, mesh=mesh, rngs=nnx.Rngs(t.seed))
    if mesh is not None:
      shard_model(model, mesh)
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  mark("mesh + model init")
  optimizer = make_optimizer(t)
  opt_state = optimizer.init(params)
  if mesh is not None:
    # Moments inherit the parameters' shardings; scalars (the step count) are replicated.
    replicated = NamedSharding(mesh, P())
    if procs > 1:
      opt_state = jax.tree.map(
          lambda x: x if isinstance(x.sharding, NamedSharding) else _global_put(x, replicated),
          opt_state)
    else:
      opt_state = jax.tree.map(
          lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
          opt_state)
    sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    p_sh, o_sh = sh(params), sh(other)
    # ZeRO-1 (train/zero1.py), opt-in with train.shard_optimizer_state: each parameter's
    # Adam moments partitioned over the devices that hold that parameter. Off by default:
    # every step then all-gathers each replicated parameter from the slice one device updated,
    # which overwrites (or spreads) a corrupted replica before the replica check can see it,
    # and each moment has one copy, so the SDC check (train.sdc_check_every) would no longer
    # find a bit flip in a parameter copy or a moment.
    zero1 = bool(t.get("shard_optimizer_state", False))
    if zero1 and t.get("sdc_check_every", 0):
      log("note: train.shard_optimizer_state (ZeRO-1) hides silent data corruption in the "
          "replicated parameters and the moments from the replica check (README, Reliability)")
    opt_sh = optimizer_state_shardings(opt_state, mesh, shard_replicated=zero1)
    opt_state = jax.jit(lambda s: s, out_shardings=opt_sh)(opt_state)
    batch_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    if procs > 1:
      # Every process holds the whole global batch (the same deterministic windows) and
      # hands its devices their rows: x[B_{node,gpu}, L].
      def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, batch_sharding, lambda idx: x[idx])
    else:
      put = lambda x: jax.device_put(np.asarray(x), batch_sharding)
  else:
    p_sh = o_sh = opt_sh = None
    put = jnp.asarray
  mark("optimizer state")
  # The state is donated to the step (its new value reuses the buffers); a dropless step that
  # overflows returns the state unchanged and is rerun from it (`_train_step`).
  fns = make_step_fns(graphdef, optimizer, model_cfg, t, seq, mesh, p_sh, o_sh, opt_sh,
                      grad_sum=t.get("grad_sum", "auto"), donate=True,
                      discard_overflow=bool(t.dropless),
                      zero1=mesh is not None and bool(t.get("shard_optimizer_state", False)))
  if cfg.mesh.get("stages", 1) > 1:  # pipeline parallelism (train/pipeline_step.py)
    from dsv3_jax.train import pipeline_step
    fns, mesh, params, other, opt_state, put = pipeline_step.trainer_step_fns(
        cfg, graphdef, optimizer, model_cfg, params, other, opt_state,
        discard_overflow=bool(t.dropless))
  moe0 = model.moe_layers[0] if model.moe_layers else None
  tokens_per_step = t.batch_size * seq
  return _Job(
      cfg=cfg, model_cfg=model_cfg, entropies=entropies, windows=windows, dataset=dataset,
      n_dev=n_dev, fns=fns, mesh=mesh, put=put, moe0=moe0, tokens_per_step=tokens_per_step,
      worst=moe0.worst_case_capacity(tokens_per_step) if moe0 else (1,),
      initial_capacity=moe0.initial_capacity(tokens_per_step) if moe0 else (1,),
      state={"params": params, "other": other, "opt_state": opt_state}, processes=procs)


def _damaged_anywhere(job: _Job, ckpt, step: int, err):
  """Multi-process: the restore of `step` counts as damaged when it failed on any process
  (a data file can be unreadable in one process's slices only); returns the
  `CheckpointDamaged` to act on (this process's own, or one naming the processes that failed),
  or None when every process restored it. Single-process: `err` unchanged."""
  if job.processes == 1:
    return err
  from dsv3_jax.train.checkpoint import CheckpointDamaged

  n = job.mesh.size
  sharding = NamedSharding(job.mesh, P(tuple(job.mesh.axis_names)))
  flag = np.int32(err is not None)
  flags = jax.make_array_from_callback(
      (n,), sharding, lambda idx: np.full(len(range(n)[idx[0]]), flag, np.int32))
  flags = integrity._host(flags)
  if err is not None or not flags.any():
    return err
  failed = sorted({d.process_index for d, f in zip(job.mesh.devices.reshape(-1), flags) if f})
  return CheckpointDamaged(ckpt.directory, step, "state",
                           f"could not be read on process(es) {failed}")


def _restore(job: _Job, ckpt, log) -> tuple[dict, tuple[int, ...], int]:
  """(state, capacity, first step to run): the newest intact checkpoint's, or the initial ones.

  A damaged checkpoint (`checkpoint.CheckpointDamaged`: unreadable item, content checksum
  mismatch) is moved to `<workdir>/checkpoints_damaged/` with a warning naming the step and
  the item, and the next older one is tried.

  Raises:
    checkpoint.CheckpointMismatch (a ValueError): the checkpoint holds another model's state.
  """
  from dsv3_jax.train.checkpoint import CheckpointDamaged

  for step in reversed(ckpt.all_steps()):
    err = None
    try:
      state, meta = ckpt.restore(step, job.state)
    except CheckpointDamaged as e:
      err = e
    err = _damaged_anywhere(job, ckpt, step, err)
    if err is not None:
      where = ckpt.set_aside(step)
      older = [s for s in ckpt.all_steps() if s < step]
      log(f"warning: {err}; moved it to {where}; "
          + (f"falling back to step {older[-1]}" if older else "no older checkpoint: "
             "training starts from step 0"))
      continue
    capacity, start = tuple(meta["capacity"]), int(meta["step"])
    log(f"resumed from {ckpt.directory} at step {start} (MoE capacity {capacity}; restored "
        f"and verified in {ckpt.restore_s:.2f} s)")
    return state, capacity, start
  return job.state, job.initial_capacity, 0


class TrainingStopped(RuntimeError):
  """The run stopped before train.steps: non-finite steps in a row, a non-finite state that
  would have been checkpointed, or replicas that disagree (silent data corruption). The
  message says which, at what step, and where the last good checkpoint is."""


@dataclasses.dataclass
class _Run:
  """What the step loop leaves behind."""

  state: dict
  capacity: tuple[int, ...]
  first_step_s: Optional[float] = None  # the first step run now (includes compilation)
  recompiles: int = 0  # compilations after the first step (capacity growth)
  step_times: list = dataclasses.field(default_factory=list)  # seconds, later steps
  last: dict = dataclasses.field(default_factory=dict)  # the last logged metrics
  heldout: Optional[float] = None  # the last held-out loss, nats/byte
  nonfinite_steps: int = 0  # steps skipped for a non-finite loss / gradient norm (this run)
  nonfinite_in_a_row: int = 0
  sdc_checks: int = 0
  sdc_check_s: list = dataclasses.field(default_factory=list)  # seconds per check
  checkpoint_save_s: list = dataclasses.field(default_factory=list)  # seconds per save
  checkpoint_checksum_s: list = dataclasses.field(default_factory=list)  # within save_s
  checkpoint_restore_s: Optional[float] = None  # restore + checksum verification, seconds
  eval_s: list = dataclasses.field(default_factory=list)  # seconds per held-out evaluation
  wall_s: list = dataclasses.field(default_factory=list)  # seconds per loop iteration (all)
  warmup_s: Optional[float] = None  # compiling the eval / check programs before the loop


def _train_step(job: _Job, run: _Run, window) -> dict:
  """One applied step (dropless: recomputed with a larger capacity while it would drop);
  updates `run` and returns the step's metrics on the host. A step with a non-finite loss or
  gradient norm leaves the state as it was (the step function skips it) and is counted."""
  fns = job.fns
  while True:
    s = run.state
    cached = fns.train_step._cache_size()
    # The state is donated: `s` is deleted by the call, only its result may be used.
    new_params, new_other, new_opt, metrics = fns.train_step(
        s["params"], s["other"], s["opt_state"], window, run.capacity)
    del s
    # Unchanged (bit for bit) when the step was skipped (non-finite) or discarded (overflow).
    run.state = {"params": new_params, "other": new_other, "opt_state": new_opt}
    metrics = jax.device_get(metrics)
    compiled = fns.train_step._cache_size() != cached
    run.recompiles += int(compiled and run.first_step_s is not None)
    if float(metrics.get("skipped", 0.0)):
      run.nonfinite_steps += 1
      run.nonfinite_in_a_row += 1
      return metrics
    run.nonfinite_in_a_row = 0
    needed = np.asarray(metrics["needed_capacity"])
    if job.cfg.train.dropless and np.any(needed > np.asarray(run.capacity)):
      run.capacity = grow_capacity(run.capacity, needed, job.worst)  # discarded: recompute
      continue
    return metrics


def _loop(job: _Job, run: _Run, start: int, ckpt, writer, *, progress: bool, log,
          after_step: Optional[Callable[[int, dict], dict]] = None,
          mark: Callable[[str], Any] = lambda _: None) -> _Run:
  """Steps start..train.steps, logging, evaluating and checkpointing on their schedules
  (`mark(phase)` after each part: `memory.PhaseLog.mark`)."""
  from tqdm.auto import tqdm

  from dsv3_jax.train import memory

  from dsv3_jax.train.metrics import format_line, to_python

  cfg, t = job.cfg, job.cfg.train
  pbar = tqdm(total=t.steps, initial=start, disable=not progress, desc=cfg.get("name", "train"),
              dynamic_ncols=True)
  write = pbar.write if progress else log
  evaluate = lambda: _eval_loss(job.fns, run.state["params"], run.state["other"], job.windows,
                                t.batch_size, run.capacity, job.worst, job.put)
  max_bad = t.get("max_nonfinite_steps", 3)
  sdc_every = t.get("sdc_check_every", 0)
  checker = None
  if start < t.steps:
    # Compile what the evaluation and checkpoint steps run (the eval step, the finiteness
    # check, the replica checksums) before the first step, so that those steps do not carry
    # a compilation (each is compiled once; the eval step again only if dropless capacity
    # grows, like the train step).
    t0 = time.perf_counter()
    w0 = job.put(job.windows[:t.batch_size])
    jax.block_until_ready(job.fns.eval_step(run.state["params"], run.state["other"], w0,
                                            run.capacity))
    integrity.nonfinite_leaves(run.state)
    if job.mesh is not None and sdc_every:
      checker = _sdc_checker(job, run)
      checker.sums(_checked(run.state))
    run.warmup_s = time.perf_counter() - t0
    memory.trim()  # the compilers' freed memory back to the system (memory.py)
    mark("compile eval + checks")
  last_done = time.perf_counter()
  for step in range(start, t.steps):
    window = job.put(job.dataset[step])
    t0 = time.perf_counter()
    metrics = _train_step(job, run, window)
    dt = time.perf_counter() - t0
    if run.first_step_s is None:
      memory.trim()
    mark("train step" if run.first_step_s is not None else "first train step (compile + run)")
    if run.nonfinite_in_a_row:
      write(f"step {step + 1}: non-finite loss {metrics.get('total_loss')} / gradient norm "
            f"{metrics.get('grad_norm')}: update skipped ({run.nonfinite_in_a_row} in a row, "
            f"stop at train.max_nonfinite_steps={max_bad})")
    stop = run.nonfinite_in_a_row >= max_bad
    if after_step is not None:
      run.state = after_step(step + 1, run.state)
    if run.first_step_s is None:
      run.first_step_s = dt  # includes compilation
    else:
      run.step_times.append(dt)
    pbar.update(1)
    done = step + 1
    if done % t.log_every == 0 or done == t.steps or stop:
      recent = run.step_times[-t.log_every:] or [dt]
      st = float(np.median(recent))
      run.last = dict(to_python(metrics), step=done, step_time_s=st,
                      tokens_per_s=job.tokens_per_step / st, capacity=list(run.capacity),
                      recompiles=run.recompiles, nonfinite_steps=run.nonfinite_steps,
                      **_link_bytes(metrics, job.moe0, job.model_cfg))
      writer.write(run.last)
      write(format_line(run.last))
    if stop:
      raise TrainingStopped(
          f"stopped at step {done}: the loss or gradient norm was not finite for "
          f"{run.nonfinite_in_a_row} steps in a row (train.max_nonfinite_steps={max_bad}); "
          f"no update was applied for them. {_last_checkpoint(ckpt)}. Try a lower "
          f"train.learning_rate (now {t.learning_rate}; resuming with it needs "
          "--config.train.allow_config_change=True) or check the data and model settings")
    if done % t.eval_every == 0 or done == t.steps:
      t1 = time.perf_counter()
      run.heldout = evaluate()
      run.eval_s.append(time.perf_counter() - t1)
      mark("held-out evaluation")
      writer.write({"step": done, "heldout_loss": run.heldout})
      write(f"step {done} | held-out loss {run.heldout:.4f} nats/byte")
    saving = done % t.checkpoint_every == 0 or done == t.steps
    if job.mesh is not None and sdc_every and (done % sdc_every == 0 or saving):
      checker = checker or _sdc_checker(job, run)
      _sdc_check(checker, run, done, ckpt)
      mark("replica check")
    if saving:
      bad = integrity.nonfinite_leaves(run.state)
      if bad:
        raise TrainingStopped(
            f"stopped at step {done}: the state to checkpoint holds non-finite values in "
            f"{len(bad)} leaves ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); not "
            f"saved. {_last_checkpoint(ckpt)}")
      t0 = time.perf_counter()
      ckpt.save(done, run.state, {"step": done, "capacity": list(run.capacity)}, force=True)
      run.checkpoint_save_s.append(time.perf_counter() - t0)
      run.checkpoint_checksum_s.append(ckpt.checksum_s)
      mark("checkpoint save (blocking part)")
    now = time.perf_counter()
    run.wall_s.append(now - last_done)  # the whole iteration: step, eval, checks, save
    last_done = now
  pbar.close()
  if run.heldout is None:  # resumed a finished run: evaluate what was restored
    run.heldout = evaluate()
  return run


class _NoWriter:
  """The metrics writer of the processes other than 0 (they write no files)."""

  def write(self, metrics) -> None:
    del metrics

  def close(self) -> None:
    pass


def _last_checkpoint(ckpt) -> str:
  step = ckpt.latest_step()
  if step is None:
    return "No checkpoint was written"
  return (f"The newest checkpoint is step {step} in {ckpt.directory} (every checkpoint holds "
          "finite values only); rerunning resumes from it")


def _checked(state: dict) -> dict:
  # Parameters and router biases: a corrupted optimizer moment on one device shows in that
  # device's parameters after the next update, so checking them covers the moments one step
  # later at a third of the cost (the moments are twice the parameters).
  return {"params": state["params"], "other": state["other"]}


def _sdc_checker(job: _Job, run: _Run):
  return integrity.ReplicaChecker(_checked(run.state), job.mesh)


def _sdc_check(checker, run: _Run, step: int, ckpt) -> None:
  """Compares every replicated leaf's per-device checksums; stops the run on a mismatch."""
  t0 = time.perf_counter()
  bad = checker.check(_checked(run.state))
  run.sdc_check_s.append(time.perf_counter() - t0)
  run.sdc_checks += 1
  if bad:
    raise TrainingStopped(
        f"stopped at step {step}: silent data corruption: replicas that must be bit-identical "
        f"differ: {integrity.describe_mismatch(bad)}. Not checkpointed. "
        f"{_last_checkpoint(ckpt)}; check or exclude the named device(s)")


def _outliers(run: _Run) -> dict:
  """Slowest / median step, for the train step alone (`step_times`) and for whole loop
  iterations with their evaluation, checks and checkpoint save (`wall_s`), the first
  (compiling) step excluded from both."""
  out = {}
  for key, times in (("slowest_step_over_median", run.step_times),
                     ("slowest_iteration_over_median", run.wall_s[1:])):
    out[key] = float(np.max(times) / np.median(times)) if len(times) else None
  return out


def _summarize(job: _Job, run: _Run, start: int, log, phases=None) -> dict:
  """Writes `<workdir>/summary.json` and returns it (with `phases`' memory rows)."""
  cfg, t = job.cfg, job.cfg.train
  h1, h2 = job.entropies
  times = run.step_times or [float("nan")]
  summary = dict(
      name=cfg.get("name", ""), steps=t.steps, resumed_from=start,
      heldout_loss=run.heldout, heldout_unigram_entropy=h1, heldout_bigram_entropy=h2,
      step_time_s=float(np.median(times)),
      tokens_per_s=job.tokens_per_step / float(np.median(times)),
      first_step_s=run.first_step_s, recompiles=run.recompiles, capacity=list(run.capacity),
      devices=job.n_dev, tokens_per_step=job.tokens_per_step,
      nonfinite_steps=run.nonfinite_steps, sdc_checks=run.sdc_checks,
      sdc_check_s=float(np.median(run.sdc_check_s)) if run.sdc_check_s else None,
      checkpoint_save_s=(float(np.median(run.checkpoint_save_s)) if run.checkpoint_save_s
                         else None),
      checkpoint_checksum_s=(float(np.median(run.checkpoint_checksum_s))
                             if run.checkpoint_checksum_s else None),
      checkpoint_restore_s=run.checkpoint_restore_s,
      eval_s=float(np.median(run.eval_s)) if run.eval_s else None,
      warmup_s=run.warmup_s, **_outliers(run), final=run.last,
      peak_rss_bytes=phases.peak() if phases is not None else None,
      memory=phases.rows() if phases is not None else [])
  summary_path = os.path.join(t.workdir, "summary.json")
  if run.first_step_s is None and os.path.exists(summary_path):
    # Resumed a finished run: no step ran now, so keep the timings of the run that trained it.
    with open(summary_path) as f:
      before = json.load(f)
    for key in ("step_time_s", "tokens_per_s", "first_step_s", "recompiles", "final"):
      if key in before:
        summary[key] = before[key]
  if job.processes == 1 or jax.process_index() == 0:
    with open(summary_path, "w") as f:
      f.write(metrics_lib.dumps(summary, indent=2))
  log(f"held-out loss {run.heldout:.4f} nats/byte (bigram entropy {h2:.3f}) | step "
      f"{summary['step_time_s']:.3f} s | {summary['tokens_per_s']:.0f} tokens/s")
  return summary


def train(cfg, *, progress: bool = True, log: Callable[[str], None] = print,
          after_step: Optional[Callable[[int, dict], dict]] = None, phases=None) -> dict:
  """Runs (or resumes) the training job described by `cfg` (see configs/tiny.py).

  Writes `<workdir>/config.json`, `metrics.jsonl` (and the same scalars as TensorBoard event
  files beside it, `metrics.MetricsWriter`), `summary.json` and orbax checkpoints every
  `train.checkpoint_every` steps; if the workdir holds a checkpoint, training resumes from it.

  `after_step(step, state) -> state`, if given, runs after every step (steps counted from 1)
  and its result continues training: a fault-injection point for tests.

  `phases` (a `memory.PhaseLog`, e.g. started by `dsv3-train` before its imports; by default
  one started here) records the process's resident memory, peak, live device bytes and
  compilations per phase (data, model init, compilations, steps, evaluation, checkpoint
  save); summary.json gets them as `memory` and the peak as `peak_rss_bytes`.

  In a multi-process run every process calls `train(cfg)` with the same config (module
  docstring, "Multi-process"); each returns the same summary, process 0 writes the files.

  Returns:
    The summary dict (held-out loss in nats/byte, step time, tokens/s, compile time, ...).

  Raises:
    ValueError / FileNotFoundError: a bad config, before any file is written.
    TrainingStopped: train.max_nonfinite_steps non-finite steps in a row, a non-finite state
      at a checkpoint, or a replica mismatch (train.sdc_check_every); checkpoints written
      before stay (all finite), and rerunning resumes from the newest.
  """
  from dsv3_jax.train.checkpoint import Checkpointer, sync
  from dsv3_jax.train.metrics import MetricsWriter

  from dsv3_jax.train import memory, resume

  phases = phases if phases is not None else memory.PhaseLog()
  model_cfg = validate(cfg, log)
  t = cfg.train
  changes = resume.check(cfg, t.workdir)  # refuses math changes before anything is written
  phases.mark("validate config")
  job = _build(cfg, model_cfg, log, phases.mark)
  primary = jax.process_index() == 0  # writes the run's files (every process checkpoints)
  sync("checked")  # every process has read config.json before process 0 rewrites it
  os.makedirs(t.workdir, exist_ok=True)
  ckpt = Checkpointer(t.workdir, save_every=t.checkpoint_every)
  # Restore first: a checkpoint of another model fails before anything is written.
  try:
    state, capacity, start = _restore(job, ckpt, log)
  except BaseException:
    ckpt.close()
    raise
  job.state = None  # the initial state: no copy of it lives beside the one being trained
  phases.mark("restore")
  run0 = _Run(state, capacity, checkpoint_restore_s=ckpt.restore_s if start else None)
  if changes:
    log(f"warning: resuming at step {start} with changed settings (train.allow_config_change"
        f"): {', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changes.items())}; recorded in "
        f"{os.path.join(t.workdir, resume.HISTORY)}")
  if primary:
    resume.record(t.workdir, start, changes, "resume" if start else "start")
    dropped = resume.trim_metrics(t.workdir, start)
    if dropped:
      log(f"metrics.jsonl: dropped {dropped} lines after step {start} (written after the "
          "checkpoint resumed from, or garbled)")
    with open(os.path.join(t.workdir, "config.json"), "w") as f:
      f.write(cfg.to_json(indent=2))
  writer = MetricsWriter(t.workdir) if primary else _NoWriter()
  try:
    run = _loop(job, run0, start, ckpt, writer, progress=progress, log=log,
                after_step=after_step, mark=phases.mark)
  finally:
    writer.close()
    ckpt.close()
  phases.mark("checkpoint writes finish")
  return _summarize(job, run, start, log, phases)


def load_trained(workdir: str, *, step: Optional[int] = None, mesh=None):
  """The model of a training run, restored from its checkpoints (newest unless `step`).

  Reads `<workdir>/config.json`; by default the model is rebuilt on one device (no mesh), which
  is what analysis scripts want; pass a mesh to keep expert parallelism.

  Returns:
    (config ConfigDict, Transformer with the trained parameters and router biases, step).

  Raises:
    FileNotFoundError: no config.json or no checkpoint in `workdir`.
  """
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
