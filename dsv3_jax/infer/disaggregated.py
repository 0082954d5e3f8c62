"""Prefill/decode disaggregation: prefill on one mesh, decode on another, the latent cache moved.

DeepSeek serves prefill and decode on separate groups of GPUs with different expert-parallel
sizes (V3 report §3.4: prefill on 4 nodes / 32 GPUs with EP32, decode on 40 nodes / 320 GPUs
with EP320 and redundant experts; Insights §2.3). Here both run in one process on disjoint sets
of (emulated) devices, each with its own placement of the same parameters (routed experts
re-sharded for each mesh with `steps.for_mesh`), its own jitted steps, cache pools and page
allocators:

    prompt -> prefill mesh: prefill (writes c_KV | k_rope into the prefill pools) -> first token
           -> per (prefill device, decode device) pair: gather the sequence's pages on the
              prefill device, `jax.device_put` them to the decode device, scatter them into
              that device's pool at the pages allocated there; release the prefill pages
           -> decode mesh: decode steps (continuous batching, inherited from `Engine`).

What moves is MLA's latent cache, kv_lora_rank + qk_rope_head_dim values per token and layer
(`analysis.memory.kv_cache_bytes_per_token`: 70,272 B per token for DeepSeek-V3 in BF16), in
whole pages: the moved bytes are pages x page_size x bytes/token, i.e. the prompt's tokens x
bytes/token rounded up to whole pages. A materialised cache (per-head keys and values,
num_heads x (qk_head_dim + v_head_dim) per token and layer) would move
`materialised_kv_bytes_per_token` per token, 71x more for DeepSeek-V3 (4,997,120 B). Both are counted in
`engine.counts` / `transfer_summary()`.

The transfer is point to point, device to device, as an RDMA of the KV pages between a prefill
and a decode GPU would be: it never goes through a replicated or host copy.
"""

from __future__ import annotations

import collections
import time
from typing import Optional, Sequence

import jax
import numpy as np

from dsv3_jax.infer import cache as cache_lib
from dsv3_jax.infer.buckets import check_buckets, pick_bucket, pow2_buckets
from dsv3_jax.infer.engine import Engine
from dsv3_jax.infer.requests import RunningSequence
from dsv3_jax.infer.steps import StepFunctions, for_mesh
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel.topology import EPTopology

__all__ = ["DisaggregatedEngine", "disaggregated_meshes", "materialised_kv_bytes_per_token"]

_FLAG = "--xla_force_host_platform_device_count"


def materialised_kv_bytes_per_token(config: ModelConfig, itemsize: float) -> float:
  """Bytes per token over all layers of a materialised (per-head K/V) cache of an MLA model.

  Per layer and head the full key (qk_nope_head_dim + qk_rope_head_dim) and the value
  (v_head_dim): num_hidden_layers x num_attention_heads x (qk_head_dim + v_head_dim) x itemsize.
  DeepSeek-V3 in BF16: 61 x 128 x (192 + 128) x 2 = 4,997,120 B (vs 70,272 B latent).

  Args:
    config: the model config.
    itemsize: bytes per element (2 for BF16, 4 for float32).
  """
  return (config.num_hidden_layers * config.num_attention_heads
          * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * itemsize)


def _ep_size(mesh) -> int:
  """Expert-parallel size of a (`replica`,) `node`, `gpu` mesh: node x gpu."""
  shape = dict(mesh.shape)
  return shape.get("node", 1) * shape.get("gpu", 1)


def disaggregated_meshes(prefill: Sequence[int], decode: Sequence[int], devices=None):
  """A prefill mesh on the first devices and a decode mesh on the next ones (disjoint).

  Args:
    prefill: (nodes, gpus_per_node) of the prefill mesh, e.g. (2, 8) = devices 0..15.
    decode: (nodes, gpus_per_node) of the decode mesh, e.g. (4, 8) = devices 16..47.
    devices: the device list to lay them on (default `jax.devices()`).

  Returns:
    (prefill_mesh, decode_mesh), each with axes (`node`, `gpu`) (`parallel.mesh.make_mesh`).

  Raises:
    ValueError: a shape that is not two positive integers, or more devices than there are
      (the message says how to set the emulated device count).
  """
  from dsv3_jax.parallel.mesh import make_mesh

  shapes = {}
  for name, shape in (("prefill", prefill), ("decode", decode)):
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    if len(shape) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              or v < 1 for v in shape):
      raise ValueError(f"{name} mesh shape must be (nodes, gpus_per_node) of positive "
                       f"integers, got {shape!r}")
    shapes[name] = (int(shape[0]), int(shape[1]))
  devices = list(jax.devices() if devices is None else devices)
  n_pre = shapes["prefill"][0] * shapes["prefill"][1]
  n_dec = shapes["decode"][0] * shapes["decode"][1]
  if n_pre + n_dec > len(devices):
    raise ValueError(
        f"prefill mesh {shapes['prefill'][0]} x {shapes['prefill'][1]} = {n_pre} devices + "
        f"decode mesh {shapes['decode'][0]} x {shapes['decode'][1]} = {n_dec} devices = "
        f"{n_pre + n_dec} devices, but there are {len(devices)}; allowed: at most "
        f"{len(devices)} in all (set XLA_FLAGS={_FLAG}={n_pre + n_dec} before importing jax)")
  return (make_mesh(*shapes["prefill"], devices=devices[:n_pre]),
          make_mesh(*shapes["decode"], devices=devices[n_pre:n_pre + n_dec]))


def _check_meshes(config: ModelConfig, prefill_mesh, mesh) -> None:
  """The checks of `DisaggregatedEngine` on its two meshes (before any work)."""
  for name, m in (("prefill_mesh", prefill_mesh), ("mesh", mesh)):
    if not isinstance(m, jax.sharding.Mesh):
      raise ValueError(f"{name} must be a jax.sharding.Mesh with axes ('node', 'gpu') "
                       f"(parallel.mesh.make_mesh / disaggregated_meshes), got "
                       f"{type(m).__name__}")
  available = set(jax.devices())
  for name, m in (("prefill_mesh", prefill_mesh), ("mesh", mesh)):
    missing = [d.id for d in m.devices.flat if d not in available]
    if missing:
      raise ValueError(f"{name} uses device(s) {missing[:8]} that jax does not have; allowed: "
                       f"ids 0..{len(available) - 1}")
  shared = sorted({d.id for d in prefill_mesh.devices.flat} & {d.id for d in mesh.devices.flat})
  if shared:
    raise ValueError(
        f"prefill_mesh and mesh (decode) share {len(shared)} device(s) {shared[:8]}; allowed: "
        "disjoint device sets (e.g. disaggregated_meshes((2, 8), (4, 8)) or make_mesh(..., "
        "devices=...) on separate device ranges); for prefill and decode on the same devices "
        "use the colocated Engine")
  n_experts = config.n_routed_experts or 0
  if n_experts and any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
    divisors = [d for d in range(1, n_experts + 1) if n_experts % d == 0]
    for name, m in (("prefill_mesh", prefill_mesh), ("mesh", mesh)):
      ep = _ep_size(m)
      if n_experts % ep:
        raise ValueError(
            f"{name}: expert-parallel size {ep} ({dict(m.shape)}) does not divide "
            f"model.n_routed_experts={n_experts}; allowed EP sizes: {divisors}")
      try:  # the model's own layout rules (n_group = nodes), checked here before any work
        EPTopology.from_mesh(m).validate(n_experts, config.n_group)
      except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _device_shards(pool: jax.Array, pages_per_shard: int) -> dict[int, jax.Array]:
  """{shard k: the single-device array of pages [k * pps, (k + 1) * pps)} of a page-sharded
  pool [num_shards * pps, page_size, width]."""
  where = _shard_index(pool, pages_per_shard)
  return {where[s.device]: s.data for s in pool.addressable_shards}


def _shard_index(pool: jax.Array, pages_per_shard: int) -> dict:
  """{device: the shard k whose pages it holds} of a page-sharded pool."""
  return {d: (idx[0].start or 0) // pages_per_shard
          for d, idx in pool.sharding.addressable_devices_indices_map(pool.shape).items()}


class DisaggregatedEngine(Engine):
  """`Engine` with prefill on its own mesh: the latent cache moves to the decode mesh.

  Scheduling is `Engine`'s (FIFO admission on the decode mesh: slots and every page a
  sequence may need reserved on one decode device). An admitted prompt is prefilled on the
  prefill mesh (as many at a time as its slots and pages allow), its first token emitted,
  then its cache pages move to the pages allocated for it on its decode device and the prefill
  pages are released; decoding is `Engine`'s, on the decode mesh. Greedy output equals the
  colocated engine's. (V3 report §3.4, Insights §2.3: prefill and decode deployed separately,
  with different expert-parallel sizes.)

  Args:
    model: the Transformer (any placement; it is re-sharded for each mesh with `for_mesh`).
    prefill_mesh: the prefill (`node`, `gpu`) mesh.
    mesh: the decode (`node`, `gpu`) mesh, sharing no device with `prefill_mesh`.
    prefill_config: optional execution settings for the prefill model (e.g. dispatch
      "two_hop"; same architecture); the decode model keeps `model.config`.
    prefill_max_batch: prompts prefilled together at most (a multiple of the prefill mesh
      size; default: max_batch rounded up to one).
    prefill_num_pages: pages per prefill device pool (default: enough for the prefill slots
      per device at max_position_embeddings tokens).
    prefill_batch_buckets: prompts per prefill device in a prefill call (default powers of
      two up to prefill_max_batch / prefill mesh size).
    **kwargs: the decode engine's settings (`Engine`: max_batch, page_size, num_pages,
      cache_dtype, decode_steps, micro_batches, buckets, ...; page_size, cache_dtype,
      moe_kernel and micro_batches apply to both meshes).

  Attributes beyond `Engine`'s:
    counts["transfer_bytes"]: bytes moved prefill -> decode (whole pages, all layers).
    counts["transfer_pages"], counts["transfer_tokens"]: pages (per layer stack) and prompt
      tokens moved; counts["transfer_copies"]: device-to-device copies (one per
      prefill device, decode device pair per prefill call).
    timings["transfer_s"]: seconds in the transfers (blocking).

  Raises:
    ValueError: before any work: meshes that are not Meshes, use devices jax does not have,
      or share a device; an expert-parallel size that does not divide n_routed_experts
      (naming the mesh and the allowed sizes); bad prefill settings; any `Engine` setting.
  """

  def __init__(self, model: Transformer, *, prefill_mesh, mesh,
               prefill_config: Optional[ModelConfig] = None,
               prefill_max_batch: Optional[int] = None, prefill_num_pages: Optional[int] = None,
               prefill_batch_buckets: Optional[Sequence[int]] = None, **kwargs):
    if kwargs.get("speculative_depth"):
      raise ValueError(f"speculative_depth={kwargs['speculative_depth']!r}: MTP speculative "
                       "decoding is not combined with disaggregated prefill yet; allowed: 0 "
                       "(or the colocated Engine)")
    _check_meshes(model.config, prefill_mesh, mesh)
    n_pre = prefill_mesh.size
    max_batch = kwargs.get("max_batch", 32)
    if prefill_max_batch is None:  # (a bad max_batch is named by Engine's own check)
      ok = isinstance(max_batch, int) and not isinstance(max_batch, bool) and max_batch > 0
      prefill_max_batch = -(-max_batch // n_pre) * n_pre if ok else n_pre
    if isinstance(prefill_max_batch, bool) or not isinstance(prefill_max_batch, int) \
        or prefill_max_batch < 1 or prefill_max_batch % n_pre:
      raise ValueError(f"prefill_max_batch={prefill_max_batch!r} must be a positive multiple "
                       f"of the {n_pre} devices of prefill_mesh (allowed: {n_pre}, "
                       f"{2 * n_pre}, ...)")
    if prefill_config is not None:
      prefill_config = prefill_config.validate()
    super().__init__(model, mesh=mesh, **kwargs)  # checks the decode settings, then builds
    c = self.config
    self.prefill_mesh = prefill_mesh
    self.prefill_slots_per_shard = prefill_max_batch // n_pre
    if prefill_num_pages is None:
      prefill_num_pages = self.prefill_slots_per_shard * self.max_pages_per_seq
    self.prefill_spec = cache_lib.CacheSpec.for_model(
        c, pages_per_shard=prefill_num_pages, page_size=self.spec.page_size,
        dtype=self.spec.dtype, num_shards=n_pre)
    self.prefill_batch_buckets = check_buckets(
        "prefill_batch_buckets", prefill_batch_buckets,
        pow2_buckets(1, self.prefill_slots_per_shard), self.prefill_slots_per_shard)
    self.prefill_model = for_mesh(model, prefill_mesh, prefill_config)
    self.prefill_steps = StepFunctions(self.prefill_model, self.prefill_spec, prefill_mesh,
                                       kwargs.get("moe_kernel", "serving"),
                                       micro_batches=kwargs.get("micro_batches", 1))
    self.prefill_pools = self.prefill_steps.init_pools()
    self.prefill_allocators = [cache_lib.PageAllocator(prefill_num_pages) for _ in range(n_pre)]

  # -- introspection
  @property
  def compiles(self) -> dict[str, int]:
    """Traces so far per step kind: prefill on the prefill mesh, the rest on the decode mesh."""
    out = collections.Counter(self.steps.compiles)
    out.update({f"{k}" if k == "prefill" else f"prefill_{k}": v
                for k, v in self.prefill_steps.compiles.items()})
    return {k: v for k, v in out.items() if v}

  def transfer_summary(self) -> dict[str, float]:
    """Bytes moved prefill -> decode so far, next to the formulas.

    Returns:
      dict: tokens, pages, bytes (moved: whole pages), token_bytes (tokens x bytes/token, the
      exact latent cache of the prompts), page_bytes (pages x page_size x bytes/token: equals
      bytes), materialised_bytes (what a per-head K/V cache of the same tokens would move),
      bytes_per_token (moved / tokens).
    """
    per_token = self.cache_bytes_per_token()
    itemsize = np.dtype(self.pools[0].dtype).itemsize
    tokens, pages = self.counts["transfer_tokens"], self.counts["transfer_pages"]
    return dict(
        tokens=tokens, pages=pages, bytes=self.counts["transfer_bytes"],
        token_bytes=tokens * per_token, page_bytes=pages * self.spec.page_size * per_token,
        materialised_bytes=tokens * materialised_kv_bytes_per_token(self.config, itemsize),
        bytes_per_token=self.counts["transfer_bytes"] / tokens if tokens else 0.0)

  # -- requests
  def _check(self, ids, max_new_tokens, sampling, stop_tokens) -> int:
    if ids and len(ids) <= self.config.max_position_embeddings:
      pages = self.spec.pages_for(len(ids))
      if pages > self.prefill_spec.pages_per_shard:
        raise ValueError(
            f"prefill_num_pages={self.prefill_spec.pages_per_shard} pages of "
            f"{self.spec.page_size} tokens per prefill device cannot hold a prompt of "
            f"{len(ids)} tokens; allowed: prefill_num_pages >= {pages} (or a shorter prompt)")
      if pages > self.spec.pages_per_shard:
        raise ValueError(
            f"the decode pool (num_pages={self.spec.pages_per_shard} pages of "
            f"{self.spec.page_size} tokens per decode device) is too small for the {pages} "
            f"pages a prompt of {len(ids)} tokens moves into it; allowed: num_pages >= "
            f"{pages} (more for the new tokens)")
    return super()._check(ids, max_new_tokens, sampling, stop_tokens)

  # -- prefill on the prefill mesh, then the move
  def _prefill_wave(self, seqs: list[RunningSequence]):
    """Places the head of `seqs` on prefill devices (slots and pages permitting, FIFO).

    Returns ([(seq, prefill shard, prefill pages)], the sequences left for the next wave)."""
    rows = collections.Counter()
    placed = []
    for i, s in enumerate(seqs):
      need = self.spec.pages_for(len(s.prompt))
      fits = [k for k, a in enumerate(self.prefill_allocators)
              if rows[k] < self.prefill_slots_per_shard and a.available >= need]
      if not fits:
        return placed, seqs[i:]
      k = min(fits, key=lambda k: (rows[k], -self.prefill_allocators[k].available))
      rows[k] += 1
      placed.append((s, k, [self.prefill_allocators[k].allocate() for _ in range(need)]))
    return placed, []

  def _prefill(self, seqs: list[RunningSequence], events: list) -> None:
    while seqs:
      placed, seqs = self._prefill_wave(seqs)
      self._prefill_placed(placed, events)

  def _prefill_placed(self, placed, events: list) -> None:
    per = collections.Counter(k for _, k, _ in placed)
    b = pick_bucket(max(per.values()), self.prefill_batch_buckets)
    n = b * self.prefill_spec.num_shards
    s_len = pick_bucket(max(len(s.prompt) for s, _, _ in placed), self.prompt_buckets)
    tokens = np.zeros((n, s_len), np.int32)
    lens = np.zeros((n,), np.int32)
    table = np.zeros((n, self.spec.pages_for(s_len)), np.int32)
    rows, seen = [], collections.Counter()
    for s, k, pages in placed:
      r = k * b + seen[k]
      seen[k] += 1
      rows.append((r, s))
      tokens[r, :len(s.prompt)] = s.prompt
      lens[r] = len(s.prompt)
      table[r, :len(pages)] = pages
    t0 = time.perf_counter()
    st = self.prefill_steps
    nxt, logits, self.prefill_pools = st.prefill(st.state, self.prefill_pools, tokens, lens,
                                                 table)
    if all(s.sampling.temperature == 0 for _, s in rows):
      nxt = np.asarray(nxt)
    else:
      nxt = np.asarray(st.sample(logits, *self._sampling_arrays(n, rows), lens))
    logits = np.asarray(logits) if any(s.want_logits for _, s in rows) else None
    self.timings["prefill_s"] += time.perf_counter() - t0
    self.counts["prefill_calls"] += 1
    self.counts["prefill_tokens"] += int(lens.sum())
    for r, s in rows:
      s.cached = len(s.prompt)
      self._emit(s, int(nxt[r]), None if logits is None else logits[r], events)
    # a sequence that finished on its first token has nothing to move
    moves = []
    for s, k, pages in placed:
      if s.finish_reason is None:
        self._grow(s, len(s.prompt))
        moves.append((k, pages, s.shard, s.pages[:len(pages)], len(s.prompt)))
    if moves:
      self._move(moves)
    for _, k, pages in placed:
      self.prefill_allocators[k].release(pages)

  def _move(self, moves) -> None:
    """Copies pages from prefill devices to decode devices.

    Args:
      moves: [(prefill shard, its page ids, decode shard, its page ids, prompt tokens)], page
        ids local to their shard, as many on both sides.
    """
    t0 = time.perf_counter()
    src = [_device_shards(p, self.prefill_spec.pages_per_shard) for p in self.prefill_pools]
    dst = [_device_shards(p, self.spec.pages_per_shard) for p in self.pools]
    pairs = collections.defaultdict(lambda: ([], []))
    for k_pre, pages_pre, k_dec, pages_dec, n_tokens in moves:
      pairs[(k_pre, k_dec)][0].extend(pages_pre)
      pairs[(k_pre, k_dec)][1].extend(pages_dec)
      self.counts["transfer_pages"] += len(pages_pre)
      self.counts["transfer_tokens"] += n_tokens
    for (k_pre, k_dec), (pages_pre, pages_dec) in pairs.items():
      out = cache_lib.gather_pages([layer[k_pre] for layer in src], pages_pre)  # prefill device
      target = next(iter(dst[0][k_dec].devices()))
      out = jax.device_put(out, target)  # the prefill -> decode copy
      self.counts["transfer_bytes"] += sum(int(x.nbytes) for x in out)
      self.counts["transfer_copies"] += 1
      new = cache_lib.scatter_pages([layer[k_dec] for layer in dst], pages_dec, out)
      for layer, x in zip(dst, new):
        layer[k_dec] = x
    pools = []
    for pool, shards in zip(self.pools, dst):
      where = _shard_index(pool, self.spec.pages_per_shard)
      arrays = [shards[where[s.device]] for s in pool.addressable_shards]
      pools.append(jax.make_array_from_single_device_arrays(pool.shape, pool.sharding, arrays))
    self.pools = jax.block_until_ready(tuple(pools))
    self.timings["transfer_s"] += time.perf_counter() - t0
