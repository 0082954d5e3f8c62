"""Where each leaf of the model state goes on a pipeline mesh (`StageLayout`).

Source: DeepSeek-V3 technical report §3.2 (pipeline stages hold consecutive layers; the
embedding with the shallowest, the head and MTP with the deepest).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv3_jax.model.config import ModelConfig


def stage_layers(model_cfg: ModelConfig, stages: int) -> int:
  """MoE layers per stage.

  Raises:
    ValueError: `stages` does not divide the MoE layers (naming mesh.stages and the model
      settings), or the model has no MoE layer after the dense ones.
  """
  c = model_cfg
  n_moe = c.num_hidden_layers - c.first_k_dense_replace
  if not isinstance(stages, int) or isinstance(stages, bool) or stages < 2:
    raise ValueError(f"mesh.stages={stages!r}: a pipeline needs an integer >= 2")
  if n_moe < stages or n_moe % stages:
    raise ValueError(
        f"mesh.stages={stages} must divide the model's MoE layers: model.num_hidden_layers - "
        f"model.first_k_dense_replace = {c.num_hidden_layers} - {c.first_k_dense_replace} = "
        f"{n_moe}; allowed: a divisor of {n_moe} that is >= 2")
  return n_moe // stages


def _key(k):
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


@dataclasses.dataclass(frozen=True)
class StageLayout:
  """Where each leaf of a model state tree goes in the pipeline layout.

  Attributes:
    pp, first_dense, per_stage: stages, dense layers before the MoE ones, MoE layers per stage.
    stage_leaves: [per_stage][leaves per layer] -> the flat leaf indices over the stages.
    shared_leaves: flat indices of the leaves every rank holds.
    slot_of: flat index -> ("stage", j, q) or ("shared", position).
  """

  pp: int
  first_dense: int
  per_stage: int
  stage_leaves: tuple
  shared_leaves: tuple
  slot_of: tuple

  @classmethod
  def build(cls, tree, model_cfg: ModelConfig, pp: int) -> "StageLayout":
    n, k = stage_layers(model_cfg, pp), model_cfg.first_k_dense_replace
    by_layer: dict[int, list[int]] = {}
    shared = []
    for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
      keys = [_key(p) for p in path]
      if len(keys) > 1 and keys[0] == "layers" and int(keys[1]) >= k:
        by_layer.setdefault(int(keys[1]), []).append(i)
      else:
        shared.append(i)
    counts = {len(v) for v in by_layer.values()}
    if len(counts) > 1:
      raise ValueError(f"MoE layers of different structure ({sorted(counts)} leaves)")
    per_layer = counts.pop() if counts else 0
    stage_leaves = tuple(
        tuple(tuple(by_layer[k + s * n + j][q] for s in range(pp)) for q in range(per_layer))
        for j in range(n)) if by_layer else ()
    slot_of = {}
    for j, layer in enumerate(stage_leaves):
      for q, per_stage in enumerate(layer):
        for i in per_stage:
          slot_of[i] = ("stage", j, q)
    for pos, i in enumerate(shared):
      slot_of[i] = ("shared", pos)
    return cls(pp, k, n, stage_leaves, tuple(shared),
               tuple(slot_of[i] for i in range(len(slot_of))))

  def split(self, leaves, stack=jnp.stack):
    """Flat model leaves -> (stage [per_stage][q] arrays [pp, ...], shared [leaves]);
    `stack`: jnp.stack (traced or device arrays) or np.stack (host arrays)."""
    stage = [[stack([leaves[i] for i in per]) for per in layer] for layer in self.stage_leaves]
    return stage, [leaves[i] for i in self.shared_leaves]

  def merge(self, stage, shared, stacked: bool = True):
    """(stage, shared) -> flat model leaves. `stacked`: stage arrays [pp, ...] (unstacked to
    every layer); else one stage's arrays, placed at every layer of that position."""
    out = []
    for slot in self.slot_of:
      if slot[0] == "shared":
        out.append(shared[slot[1]])
        continue
      a = stage[slot[1]][slot[2]]
      out.append(a)
    if not stacked:
      return out
    for j, layer in enumerate(self.stage_leaves):
      for q, per in enumerate(layer):
        for s, i in enumerate(per):
          out[i] = stage[j][q][s]
    return out
