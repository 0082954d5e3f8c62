"""The training loop around the jitted step: the job's parts (`_Job`), dropless capacity
growth, the applied step, held-out evaluation, the silent-data-corruption check, checkpoints
in the loop, and the run's summary.

`trainer.train` builds the job (config check, data, mesh, model, restore) and calls `_loop`;
this module holds what runs every step and what the run leaves behind (`_Run`, summary.json).
"""


from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.train import integrity
from dsv3_jax.train import metrics as metrics_lib
from dsv3_jax.train.step import StepFns


def grow_capacity(capacity: tuple[int, ...], needed: np.ndarray, worst: tuple[int, ...],
                  headroom: float = 1.25) -> tuple[int, ...]:
  """New per-hop capacity after an overflow: needed * headroom rounded up to 8, capped at the
  worst case (which can never overflow)."""
  out = []
  for c, n, w in zip(capacity, needed, worst):
    n = int(n)
    out.append(c if n <= c else int(min(w, 8 * math.ceil(n * headroom / 8))))
  return tuple(out)


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
  `capacity` is recomputed at the worst-case capacity, and so are the batches after it, which
  then run at the worst case directly: held-out text tends to overflow the training capacity
  in every batch once it does in one; same values, no second run per batch)."""
  total, count = 0.0, 0.0
  for i in range(0, len(windows) - batch_size + 1, batch_size):
    w = put(windows[i:i + batch_size])
    nats, n, needed = fns.eval_step(params, other, w, capacity)
    if capacity != worst and np.any(np.asarray(needed) > np.asarray(capacity)):
      capacity = worst
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
  data_fingerprint: Optional[dict] = None  # resume.data_fingerprint of the corpus


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


# The summary.json fields a rerun of a finished run computes again; it keeps the others.
_EVALUATED_AGAIN = frozenset({"name", "steps", "resumed_from", "heldout_loss",
                              "heldout_unigram_entropy", "heldout_bigram_entropy", "devices",
                              "tokens_per_step"})


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
    # Resumed a finished run: no step ran now, so keep everything the run that trained it
    # measured (timings, outliers, checks, memory); only the held-out loss is evaluated again.
    with open(summary_path) as f:
      before = json.load(f)
    summary.update({k: v for k, v in before.items() if k not in _EVALUATED_AGAIN})
    log(f"nothing to train: the run is complete at step {t.steps} (train.steps); the step "
        "figures below are those of the run that trained it")
  if job.processes == 1 or jax.process_index() == 0:
    with open(summary_path, "w") as f:
      f.write(metrics_lib.dumps(summary, indent=2))
  log(f"held-out loss {run.heldout:.4f} nats/byte (bigram entropy {h2:.3f}) | step "
      f"{summary['step_time_s']:.3f} s | {summary['tokens_per_s']:.0f} tokens/s")
  return summary
