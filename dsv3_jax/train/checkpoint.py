"""Checkpoints with orbax: the train state (params, router biases, optimizer state) as a pytree
of arrays plus JSON metadata (step, MoE capacity, config), saved every N steps; the newest is
restored on start so that rerunning a job resumes it."""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """orbax CheckpointManager for one run directory (`<workdir>/checkpoints`)."""

  def __init__(self, workdir: str, *, save_every: int, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             save_interval_steps=save_every, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restores into the structure, dtypes and shardings of `target` (arrays or
    jax.ShapeDtypeStruct with .sharding).

    Raises:
      ValueError: the checkpoint does not fit `target` (made with another config).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises several types for a structure / shape mismatch
      raise ValueError(
          f"the checkpoint at {self.directory} (step {step}) does not match this config "
          f"({type(e).__name__}: {str(e)[:300]}); choose another train.workdir or remove that "
          "directory") from e
    return out.state, out.meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
