"""Config-driven training: the job around the step (build, restore, loop, summary).

`train(cfg)` runs a training job from an ml_collections config (configs/tiny.py): it checks the
config (`validate`), builds the data, the model on its mesh and the jitted steps (`step.py`),
restores the newest checkpoint, runs the steps with dropless capacity control, evaluates, and
writes `<workdir>/{config.json, metrics.jsonl, events.out.tfevents.* (TensorBoard),
summary.json, checkpoints/}`. The objective lives in `losses.py`, the step in `step.py`; their
public names are re-exported here, and the step loop with what it leaves behind lives in
`loop.py`.

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

import json
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel.dispatch import EPTopology
from dsv3_jax.parallel.mesh import mesh_device_count
from dsv3_jax.train import integrity
from dsv3_jax.train.loop import (TrainingStopped, _Job, _NoWriter, _Run,  # noqa: F401
                                 _checked, _loop, _summarize, grow_capacity)
from dsv3_jax.train.losses import (Batch, LossOutput, bias_update, compute_losses,  # noqa: F401
                                   cross_entropy, make_batch)
from dsv3_jax.train.step import (GRAD_SUMS, StepFns, make_optimizer,  # noqa: F401
                                 make_step_fns, make_train_step, optimizer_state_shardings,
                                 resolve_grad_sum)



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
  mesh_device_count(cfg.mesh)  # every mesh size a positive integer
  nodes, gpus = cfg.mesh.nodes, cfg.mesh.gpus_per_node
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
  if os.path.exists(t.workdir) and not os.path.isdir(t.workdir):
    raise ValueError(f"train.workdir={t.workdir!r} exists and is not a directory; allowed: a "
                     "new path or a run's directory")
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
  if not isinstance(t.get("remat", False), bool):
    raise ValueError(f"train.remat={t.remat!r}; allowed: True (recompute each decoder block in "
                     "the backward pass, less memory, more compute) or False")
  if t.get("remat", False) and cfg.mesh.get("stages", 1) > 1:
    raise ValueError("train.remat=True is not implemented for pipeline parallelism "
                     f"(mesh.stages={cfg.mesh.stages}); allowed: train.remat=False with stages > 1")
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
  from dsv3_jax.train import resume
  return (h1, h2), windows, dataset, resume.data_fingerprint(corpus)


def _build(cfg, model_cfg: ModelConfig, log,
           mark: Callable[[str], Any] = lambda _: None) -> _Job:
  """Data, the model placed on its mesh, the optimizer state and the jitted steps (`mark(phase)`
  is called at the end of each: `memory.PhaseLog.mark`)."""
  from dsv3_jax.parallel.mesh import make_mesh, shard_model

  t, seq = cfg.train, cfg.data.seq_len
  entropies, windows, dataset, fingerprint = _load_data(cfg, model_cfg, log)
  mark("data")
  n_dev = cfg.mesh.nodes * cfg.mesh.gpus_per_node
  procs = jax.process_count()
  if procs > 1:
    from dsv3_jax.cluster.launch import cluster_devices, warm_up_collectives
    from dsv3_jax.parallel.mesh import state_shardings

    mesh = make_mesh(cfg.mesh.nodes, cfg.mesh.gpus_per_node, cfg.mesh.get("ep_nodes"),
                     devices=cluster_devices(n_dev))
    # Every gloo communicator the job uses before its first collective (members of a group
    # reaching its first collective > ~30 s apart fail or hang; see the function): each mesh
    # axis, and the whole mesh, which the flat all_to_all and the cross-process gathers of the
    # checks use (`integrity._host`; the first one can run on a restore, where a process that
    # found its slices damaged arrives long before one still reading and verifying its own).
    warm_up_collectives(mesh, log=log, whole_mesh=True)
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
    # ZeRO-1 (train/zero1.py), opt-in with train.shard_optimizer_state (on in the main job,
    # configs/orion_4x8.py): each parameter's Adam moments partitioned over the devices that
    # hold that parameter. Off in configs/tiny.py, because with it
    # every step all-gathers each replicated parameter from the slice one device updated,
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
      state={"params": params, "other": other, "opt_state": opt_state}, processes=procs,
      data_fingerprint=fingerprint)


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
  changes = {**changes, **resume.check_data(cfg, t.workdir, job.data_fingerprint)}
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
    resume.write_data(t.workdir, job.data_fingerprint)
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
    FileNotFoundError: no config.json or no checkpoint in `workdir`, or none at `step`.
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
  steps = ckpt.all_steps()
  if not steps:
    ckpt.close()
    raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
  if step is not None and step not in steps:
    ckpt.close()
    raise FileNotFoundError(f"no checkpoint at step {step} under {ckpt.directory}; allowed "
                            f"steps: {', '.join(map(str, steps))}")
  step = steps[-1] if step is None else step
  state, _ = ckpt.restore(step, {"params": params, "other": other, "opt_state": opt_state})
  ckpt.close()
  return cfg, nnx.merge(graphdef, state["params"], state["other"]), step
