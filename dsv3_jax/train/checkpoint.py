"""Checkpoints with orbax: the train state (params, router biases, optimizer state) as a pytree
of arrays plus JSON metadata (step, MoE capacity, per-leaf content checksums), saved every N
steps; the newest intact one is restored on start so that rerunning a job resumes it.

Every save records, in the `meta` item, each leaf's shape, dtype and BLAKE2b digest
(`integrity.leaf_checksums`); `restore` reads `meta` first, refuses a checkpoint whose leaves do
not match the model being built (`CheckpointMismatch`: another config), then restores `state`
and compares the digests. Anything that cannot be read back or does not match its digests
(a truncated or overwritten data file, flipped bytes, a missing item, garbled metadata) raises
`CheckpointDamaged` naming the step and the item; the trainer moves such a step aside and falls
back to the next older one.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from dsv3_jax.train import integrity


_barriers = [0]


def sync(name: str) -> None:
  """Waits until every process of a multi-process run reaches this point (a barrier of the
  coordination service, `cluster.launch.barrier`, named `name` plus a call counter, which is
  the same on every process because they run the same calls); a no-op in one process."""
  if jax.process_count() == 1:
    return
  from dsv3_jax.cluster.launch import barrier

  _barriers[0] += 1
  barrier(f"dsv3_train_{name}_{_barriers[0]}")


class CheckpointDamaged(ValueError):
  """A checkpoint step that cannot be read back intact: `step`, `item` ('state' or 'meta')
  and `reason`."""

  def __init__(self, directory: str, step: int, item: str, reason: str):
    self.directory, self.step, self.item, self.reason = directory, step, item, reason
    super().__init__(f"checkpoint step {step} in {directory} is damaged (item '{item}': "
                     f"{reason})")


class CheckpointMismatch(ValueError):
  """A checkpoint that is intact but holds another model's state (another config)."""


def _short(e: BaseException, n: int = 240) -> str:
  text = " ".join(f"{type(e).__name__}: {e}".split())
  text = text.split(" See full TensorStore details")[0]  # a long spec dump follows
  return text if len(text) <= n else text[:n] + " ..."


def _serial_array_handler() -> None:
  """Registers orbax's jax.Array handler with `use_replica_parallel=False` (idempotent).

  orbax's default on CPU splits every replicated array into one slice per replica (each device
  writes 1 / N of it), and each slice is a device-side slicing op compiled on first use: on the
  emulated 4 x 8 mesh that is ~8,100 slices of ~250 shapes, ~26 s of compilation in the first
  save (measured under load) and ~2 s of dispatch in every later one, all in the blocking part
  of the save. One replica writes each array instead (the same bytes, the same file layout:
  restore is unchanged)."""
  if _handler_registered[0]:
    return
  from absl import logging as absl_logging

  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns that it overrides the default
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    absl_logging.set_verbosity(verbosity)
  _handler_registered[0] = True


_handler_registered = [False]


class Checkpointer:
  """orbax CheckpointManager for one run directory (`<workdir>/checkpoints`).

  Attributes:
    save_s, checksum_s: seconds of the last `save` (blocking part, orbax writes the files in the
      background) and of the checksums in it.
    restore_s, verify_s: seconds of the last `restore` and of the checksum comparison in it.
  """

  def __init__(self, workdir: str, *, save_every: int, max_to_keep: int = 2):
    _serial_array_handler()
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             save_interval_steps=save_every, create=True),
        item_names=("state", "meta"))
    self.save_s = self.checksum_s = self.restore_s = self.verify_s = None

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`), with the state's checksums in
    `meta["checksums"]`; returns whether it saved."""
    t0 = time.perf_counter()
    meta = dict(meta, checksums=integrity.leaf_checksums(state))
    t1 = time.perf_counter()
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    self.checksum_s, self.save_s = t1 - t0, time.perf_counter() - t0
    return saved

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restores into the structure, dtypes and shardings of `target` (arrays or
    jax.ShapeDtypeStruct with .sharding) and verifies the content checksums.

    Returns:
      (state, meta) with the checksums removed from meta.

    Raises:
      CheckpointMismatch: the checkpoint holds leaves of other names / shapes / dtypes than
        `target` (made with another config).
      CheckpointDamaged: an item cannot be read or its content does not match its checksums.
    """
    t0 = time.perf_counter()
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
      if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"not the expected JSON object (got {type(meta).__name__})")
    except Exception as e:  # noqa: BLE001 -- orbax / json raise many types
      raise CheckpointDamaged(self.directory, step, "meta", _short(e)) from e
    sums = meta.pop("checksums", None)
    if sums is not None:
      want = {k: v for k, v in sums.items()}
      have = {n: (list(x.shape), str(x.dtype)) for n, x in integrity.named_leaves(target)}
      missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
      shapes = [f"{n}: stored {want[n]['dtype']}{want[n]['shape']}, this config "
                f"{have[n][1]}{have[n][0]}" for n in sorted(set(want) & set(have))
                if (want[n]["shape"], want[n]["dtype"]) != have[n]]
      if missing or extra or shapes:
        parts = shapes[:3] + [f"only in the checkpoint: {missing[:3]}"] * bool(missing) + [
            f"only in this config: {extra[:3]}"] * bool(extra)
        raise CheckpointMismatch(
            f"the checkpoint at {self.directory} (step {step}) holds another model's state "
            f"({'; '.join(parts)}); choose another train.workdir for this config (the run in "
            "this one is kept)")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract))).state
    except Exception as e:  # noqa: BLE001
      if sums is None:  # an old checkpoint without checksums: cannot tell damage from mismatch
        raise CheckpointMismatch(
            f"the checkpoint at {self.directory} (step {step}) does not fit this config "
            f"({_short(e, 300)}); choose another train.workdir") from e
      raise CheckpointDamaged(self.directory, step, "state", _short(e)) from e
    t1 = time.perf_counter()
    if sums is not None:
      structure, content = integrity.compare_checksums(sums, state)
      if structure or content:
        bad = (content + structure)[:3]
        raise CheckpointDamaged(
            self.directory, step, "state",
            f"content checksum mismatch in {len(content) + len(structure)} leaves: "
            f"{', '.join(bad)}{', ...' if len(content) + len(structure) > 3 else ''}")
    self.restore_s, self.verify_s = time.perf_counter() - t0, time.perf_counter() - t1
    return state, meta

  def set_aside(self, step: int) -> str:
    """Moves step `step` out of the checkpoint directory to `<workdir>/checkpoints_damaged/`
    (kept for inspection, never deleted); returns the new path. In a multi-process run every
    process calls it: process 0 moves the directory (shared by the processes of this machine),
    the others wait for it and reload."""
    src = os.path.join(self.directory, str(step))
    dest_root = os.path.join(self.workdir, "checkpoints_damaged")
    dest = os.path.join(dest_root, str(step))
    n = 1
    while os.path.exists(dest):
      dest, n = os.path.join(dest_root, f"{step}.{n}"), n + 1
    sync("set_aside_before")
    if jax.process_index() == 0:
      os.makedirs(dest_root, exist_ok=True)
      shutil.move(src, dest)
    sync("set_aside_after")
    self.manager.reload()
    return dest

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
