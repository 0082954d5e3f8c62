"""The serving engine: jitted prefill and decode on the paged latent cache, continuous batching.

Data flow (DESIGN.md, "serving"): prompt -> prefill (materialised MLA over the whole prompt; it
writes the normalised c_KV and the rotated k_rope of every prompt token into the paged latent
cache) -> [decode: absorbed MLA reads only the latent pages of each sequence -> dense MLP or
DeepSeekMoE -> head -> sample] x steps.

Steps. `prefill` takes newly admitted prompts [B, S] and returns each one's first token;
`decode` takes T tokens per running sequence (T = 1; T > 1 is how a speculative verifier feeds
drafts) and returns the next token after each. Both are pure functions of (model state, cache
pools, small host-built arrays), jitted once per shape bucket: batch, prompt length and pages per
sequence are rounded up to powers of two, so after warm-up no step recompiles
(`Engine.compiles` counts the traces).

Continuous batching. `submit` validates a request (before any work) and queues it; every
`step` admits queued requests while slots and cache pages allow (FIFO; a request is admitted
only once every page it may need is reserved, so a running sequence never runs out of cache and
a full pool makes requests wait, never overwrites), prefills them, then decodes one token for
every running sequence. Finished sequences (stop token, `max_new_tokens`, or the model's
`max_position_embeddings`) release their pages between steps.

Mesh. The jitted steps (`infer.steps.StepFunctions`) run on one device or per device inside
one `jax.shard_map` on a (`node`, `gpu`) mesh, experts sharded, dispatch schedules as in training.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Callable, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.infer import cache as cache_lib
from dsv3_jax.infer.buckets import check_buckets, geometric_buckets, pick_bucket, pow2_buckets
from dsv3_jax.infer.requests import (BYTE_VOCAB, Completion, Event, Prompt, RunningSequence,
                                     check_request, decode_bytes, encode_prompt)
from dsv3_jax.infer.sampling import SamplingParams
from dsv3_jax.infer.overlap import check_micro_batches
from dsv3_jax.infer.speculative import SpeculativeDecoder, check_speculative_depth
from dsv3_jax.infer.steps import StepFunctions, for_mesh, model_mesh
from dsv3_jax.model.transformer import Transformer

__all__ = ["Completion", "Engine", "Event", "StepFunctions", "for_mesh"]



# ---------------------------------------------------------------------------- engine


class Engine:
  """Continuous-batching generation with a paged latent cache.

  Args:
    model: a Transformer (built for `mesh`, or rebuilt for it with `for_mesh`).
    mesh: None (one device) or a (`node`, `gpu`) mesh from `parallel.mesh.make_mesh`.
    max_batch: sequences decoded together at most (over the whole mesh; a multiple of the
      mesh size).
    page_size: tokens per cache page.
    num_pages: pages per device pool; default: enough for `max_batch` sequences of
      `max_position_embeddings` tokens.
    cache_dtype: cache element dtype (default: the model's compute dtype).
    moe_kernel: see `StepFunctions`.
    micro_batches: 1, or 2 for two micro-batch overlap of prefill and decode on a mesh (see
      `StepFunctions`, `infer.overlap`); same tokens.
    decode_steps: decode steps per jitted call (tokens fed back on the device; sequences join
      and leave between calls, a sequence that stops inside a call ends there). 1 = one call
      per token.
    batch_buckets, page_buckets, prompt_buckets: static shapes the steps are compiled for:
      sequences per device in a step, pages read per sequence in decode, prompt tokens in
      prefill (default: powers of two for batch and prompt, sizes growing by 1.25x for pages,
      up to the maximum; fewer buckets = fewer compilations, more padding).
    speculative_depth: D > 0 = MTP speculative decoding with the model's first D MTP modules
      (`infer.speculative`, report §5.4.3): each decode step verifies D drafts in one forward
      and yields 1 .. D + 1 tokens; greedy only (a request with temperature > 0 is refused);
      `counts` gains spec_forwards / spec_drafted / spec_accepted. Allowed: 0..mtp_depth.

  Raises:
    ValueError: a bad setting, naming it and the allowed values (before any work).
  """

  def __init__(self, model: Transformer, *, mesh=None, max_batch: int = 32,
               page_size: int = 16, num_pages: Optional[int] = None,
               cache_dtype: Optional[str] = None, moe_kernel: str = "serving",
               micro_batches: int = 1, decode_steps: int = 1,
               batch_buckets: Optional[Sequence[int]] = None,
               page_buckets: Optional[Sequence[int]] = None,
               prompt_buckets: Optional[Sequence[int]] = None,
               speculative_depth: int = 0):
    c = model.config
    self.config = c
    speculative_depth = check_speculative_depth(speculative_depth, c)
    n_shards = 1 if mesh is None else mesh.size
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
      raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if max_batch % n_shards:
      raise ValueError(f"max_batch={max_batch} must be a multiple of the {n_shards} devices of "
                       f"the mesh (allowed: {n_shards}, {2 * n_shards}, ...)")
    check_micro_batches(micro_batches, mesh)
    if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < 1:
      raise ValueError(f"decode_steps must be a positive integer, got {decode_steps!r}")
    self.decode_steps = decode_steps
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
      raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
    self.max_pages_per_seq = -(-c.max_position_embeddings // page_size)
    self.slots_per_shard = max_batch // n_shards
    if num_pages is None:
      num_pages = self.slots_per_shard * self.max_pages_per_seq
    max_pos = c.max_position_embeddings
    self.batch_buckets = check_buckets("batch_buckets", batch_buckets,
                                  pow2_buckets(1, self.slots_per_shard), self.slots_per_shard)
    self.page_buckets = check_buckets("page_buckets", page_buckets,
                                 geometric_buckets(self.max_pages_per_seq),
                                 self.max_pages_per_seq)
    self.prompt_buckets = check_buckets("prompt_buckets", prompt_buckets,
                                   pow2_buckets(min(16, max_pos), max_pos), max_pos)
    if model_mesh(model) is not mesh:
      model = for_mesh(model, mesh)
    self.model = model
    self.mesh = mesh
    self.max_batch = max_batch
    self.spec = cache_lib.CacheSpec.for_model(c, pages_per_shard=num_pages, page_size=page_size,
                                              dtype=cache_dtype, num_shards=n_shards)
    self.steps = StepFunctions(model, self.spec, mesh, moe_kernel, micro_batches)
    self.pools = self.steps.init_pools()
    self.speculative = (SpeculativeDecoder(self.steps, speculative_depth)
                        if speculative_depth else None)
    self.allocators = [cache_lib.PageAllocator(num_pages) for _ in range(n_shards)]
    self.byte_level = c.vocab_size == BYTE_VOCAB
    self._next_id = 0
    self._waiting: collections.deque[RunningSequence] = collections.deque()
    self._running: dict[int, RunningSequence] = {}
    self._done: dict[int, RunningSequence] = {}
    self.timings = collections.defaultdict(float)
    self.counts = collections.Counter()

  # -- construction
  @classmethod
  def from_hf(cls, path: str, *, mesh=None, dtype: str = "float32", **kwargs) -> "Engine":
    """An engine for a Hugging Face DeepSeek-V3 checkpoint directory (`convert.hf.load_hf`).

    Raises:
      FileNotFoundError / ValueError: from `load_hf` (missing files, bad config or tensors).
    """
    from dsv3_jax.convert.hf import load_hf

    _, model = load_hf(path, jnp.dtype(dtype), mesh=mesh, load_mtp=True)
    return cls(model, mesh=mesh, **kwargs)

  @classmethod
  def from_workdir(cls, workdir: str, *, step: Optional[int] = None, mesh=None,
                   **kwargs) -> "Engine":
    """An engine for a training run's newest (or given) checkpoint (`train.trainer.load_trained`).

    Raises:
      FileNotFoundError: `workdir` is not a run directory or holds no checkpoint.
    """
    from dsv3_jax.train.trainer import load_trained

    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"workdir {workdir!r} does not exist (expected a training run "
                              "directory with config.json and checkpoints/)")
    try:
      _, model, _ = load_trained(workdir, step=step, mesh=mesh)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"workdir {workdir!r}: {e}") from None
    return cls(model, mesh=mesh, **kwargs)

  # -- introspection
  @property
  def compiles(self) -> dict[str, int]:
    """Traces (= compilations) so far per step kind."""
    return dict(self.steps.compiles)

  def cache_bytes_per_token(self) -> float:
    """Bytes of cache one token takes over all layers, read from the pool arrays."""
    return cache_lib.bytes_per_token(self.pools)

  def pages_in_use(self) -> int:
    return sum(a.used for a in self.allocators)

  @property
  def num_running(self) -> int:
    return len(self._running)

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  def has_work(self) -> bool:
    return bool(self._waiting or self._running)

  # -- requests
  def encode(self, prompt: Prompt) -> list[int]:
    """Token ids of a prompt (`requests.encode_prompt`; raises its ValueError)."""
    return encode_prompt(prompt, self.byte_level, self.config.vocab_size)

  def decode_text(self, tokens: Iterable[int]) -> Optional[str]:
    """The tokens as text for a byte-level model, else None (`requests.decode_bytes`)."""
    return decode_bytes(tokens, self.byte_level)

  def _check(self, ids: list[int], max_new_tokens: int, sampling: SamplingParams,
             stop_tokens) -> int:
    c = self.config
    check_request(ids, max_new_tokens, stop_tokens, c.vocab_size, c.max_position_embeddings)
    sampling.validate(c.vocab_size)
    if self.speculative is not None and sampling.temperature > 0:
      raise ValueError(f"temperature={sampling.temperature}: speculative decoding "
                       f"(speculative_depth={self.speculative.depth}) is greedy only; allowed: "
                       "temperature=0 (or an Engine with speculative_depth=0 to sample)")
    cached = min(len(ids) + int(max_new_tokens) - 1, c.max_position_embeddings)
    need = self.spec.pages_for(cached)
    if need > self.spec.pages_per_shard:
      raise ValueError(
          f"cache.num_pages={self.spec.pages_per_shard} pages of {self.spec.page_size} tokens "
          f"per device cannot hold one sequence of {cached} cached tokens ({len(ids)} prompt + "
          f"{max_new_tokens} new); allowed: num_pages >= {need} (or a shorter request)")
    return need

  def submit(self, prompt: Prompt, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: Iterable[int] = (),
             key: Optional[jax.Array] = None, return_logits: bool = False) -> int:
    """Validates and queues one request; it joins the running batch at a later `step`.

    Args:
      prompt: token ids, or a str for byte-level models.
      max_new_tokens: tokens to generate at most (> 0).
      temperature, top_k, top_p: see `sampling.SamplingParams` (temperature 0 = greedy).
      stop_tokens: ids that end the sequence (included in the output).
      key: PRNG key for sampling (default: jax.random.key(request id)).
      return_logits: keep the logits of every chosen token.

    Returns:
      The request id.

    Raises:
      ValueError: an empty prompt, a prompt longer than max_position_embeddings, ids outside
        the vocabulary, max_new_tokens <= 0, bad sampling settings, or a cache too small for
        this one sequence; raised before anything is queued (running sequences are untouched).
    """
    ids = self.encode(prompt)
    sampling = SamplingParams(temperature, top_k, top_p)
    stop = frozenset(int(t) for t in stop_tokens) if stop_tokens is not None else frozenset()
    need = self._check(ids, max_new_tokens, sampling, stop)
    rid = self._next_id
    self._next_id += 1
    if key is None:
      key = jax.random.key(rid)
    self._waiting.append(RunningSequence(
        id=rid, prompt=ids, max_new_tokens=int(max_new_tokens), sampling=sampling,
        stop_tokens=stop, key_data=np.asarray(jax.random.key_data(key)),
        want_logits=return_logits, need_pages=need))
    return rid

  def completion(self, request_id: int) -> Completion:
    """The result of a finished request (KeyError while it is still queued or running)."""
    s = self._done[request_id]
    return Completion(s.id, s.prompt, list(s.generated), s.finish_reason,
                      self.decode_text(s.generated),
                      np.stack(s.logits) if s.want_logits and s.logits else None)

  # -- scheduling
  def _admit(self) -> list[RunningSequence]:
    admitted = []
    running = collections.Counter(s.shard for s in self._running.values())
    while self._waiting:
      seq = self._waiting[0]
      best = None
      for shard, alloc in enumerate(self.allocators):
        if running[shard] >= self.slots_per_shard or not alloc.can_reserve(seq.need_pages):
          continue
        rank = (running[shard], -alloc.available)
        if best is None or rank < best[0]:
          best = (rank, shard)
      if best is None:
        break  # FIFO: the head waits for slots or pages
      shard = best[1]
      self.allocators[shard].reserve(seq.need_pages)
      seq.shard, seq.reserved = shard, seq.need_pages
      running[shard] += 1
      self._waiting.popleft()
      self._running[seq.id] = seq
      admitted.append(seq)
    return admitted

  def _grow(self, seq: RunningSequence, cached: int) -> None:
    """Allocates pages until `cached` positions fit (drawing on the reservation)."""
    alloc = self.allocators[seq.shard]
    while len(seq.pages) * self.spec.page_size < cached:
      seq.pages.append(alloc.allocate(reserved=seq.reserved > 0))
      seq.reserved = max(0, seq.reserved - 1)

  def _finish(self, seq: RunningSequence, reason: str) -> None:
    seq.finish_reason = reason
    alloc = self.allocators[seq.shard]
    alloc.release(seq.pages)
    alloc.unreserve(seq.reserved)
    seq.pages, seq.reserved = [], 0
    del self._running[seq.id]
    self._done[seq.id] = seq

  def _emit(self, seq: RunningSequence, token: int, logits, events: list) -> None:
    seq.generated.append(token)
    if seq.want_logits:
      seq.logits.append(np.asarray(logits, np.float32))
    reason = None
    if token in seq.stop_tokens:
      reason = "stop"
    elif len(seq.generated) >= seq.max_new_tokens:
      reason = "length"
    elif len(seq.prompt) + len(seq.generated) > self.config.max_position_embeddings:
      reason = "max_position"  # the next token would need a position past the table
    events.append(Event(seq.id, token, reason))
    if reason is not None:
      self._finish(seq, reason)

  def _layout(self, seqs: Sequence[RunningSequence]) -> tuple[int, list[tuple[int, RunningSequence]]]:
    """Rows of a step batch: shard-major, `b` rows per shard; returns (b, [(row, seq)])."""
    per = collections.defaultdict(list)
    for s in seqs:
      per[s.shard].append(s)
    b = pick_bucket(max(len(v) for v in per.values()), self.batch_buckets)
    rows = [(shard * b + i, s) for shard, v in per.items() for i, s in enumerate(v)]
    return b, rows

  def _sampling_arrays(self, n: int, rows):
    kd_shape = next(iter(rows))[1].key_data.shape
    temp = np.zeros((n,), np.float32)
    topk = np.zeros((n,), np.int32)
    topp = np.ones((n,), np.float32)
    kd = np.zeros((n,) + kd_shape, np.uint32)
    for r, s in rows:
      temp[r], topk[r], topp[r], kd[r] = (s.sampling.temperature, s.sampling.top_k,
                                          s.sampling.top_p, s.key_data)
    return temp, topk, topp, kd

  def _choose(self, n: int, rows, greedy, logits, positions) -> np.ndarray:
    """[n] chosen tokens: the step's greedy tokens, or (when some row samples) `sample`."""
    if all(s.sampling.temperature == 0 for _, s in rows):
      return np.asarray(greedy)
    temp, topk, topp, kd = self._sampling_arrays(n, rows)
    return np.asarray(self.steps.sample(logits, temp, topk, topp, kd,
                                        np.asarray(positions, np.int32)))

  def _prefill(self, seqs: list[RunningSequence], events: list) -> None:
    b, rows = self._layout(seqs)
    n = b * self.spec.num_shards
    longest = max(len(s.prompt) for s in seqs)
    s_len = pick_bucket(longest, self.prompt_buckets)
    n_pages = self.spec.pages_for(s_len)
    tokens = np.zeros((n, s_len), np.int32)
    lens = np.zeros((n,), np.int32)
    table = np.zeros((n, n_pages), np.int32)
    for r, s in rows:
      self._grow(s, len(s.prompt))
      tokens[r, :len(s.prompt)] = s.prompt
      lens[r] = len(s.prompt)
      table[r, :len(s.pages)] = s.pages
    t0 = time.perf_counter()
    if self.speculative is not None:
      nxt, logits, self.pools = self.speculative.prefill(self, rows, tokens, lens, table)
    else:
      nxt, logits, self.pools = self.steps.prefill(self.steps.state, self.pools, tokens, lens,
                                                   table)
    nxt = self._choose(n, rows, nxt, logits, lens)
    logits = np.asarray(logits) if any(s.want_logits for s in seqs) else None
    self.timings["prefill_s"] += time.perf_counter() - t0
    self.counts["prefill_calls"] += 1
    self.counts["prefill_tokens"] += int(lens.sum())
    for r, s in rows:
      s.cached = len(s.prompt)
      self._emit(s, int(nxt[r]), None if logits is None else logits[r], events)

  def _remaining(self, s: RunningSequence) -> int:
    """Tokens `s` may still produce before max_new_tokens or max_position_embeddings."""
    g, n = len(s.generated), len(s.prompt)
    return min(s.max_new_tokens - g, self.config.max_position_embeddings - n - g + 1)

  def _decode_inputs(self, seqs: list[RunningSequence], rows, n: int, ahead: int):
    """Host arrays of a decode call over `n` rows, after growing every sequence's pages for up
    to `ahead` new cached positions: (last tokens [n], start positions [n], tokens each may
    still produce [n], stop ids [n, S] (-1 = none), page table [n, P]; padding entries point
    at the sequence's own first page), all int32."""
    remaining = {s.id: self._remaining(s) for s in seqs}
    for _, s in rows:
      self._grow(s, s.cached + min(ahead, remaining[s.id]))
    n_pages = pick_bucket(max(len(s.pages) for s in seqs), self.page_buckets)
    n_stop = pick_bucket(max(1, max(len(s.stop_tokens) for s in seqs)), (1, 2, 4, 8, 16, 32))
    tokens = np.zeros((n,), np.int32)
    start = np.zeros((n,), np.int32)
    rem = np.zeros((n,), np.int32)
    stop = np.full((n, n_stop), -1, np.int32)
    table = np.zeros((n, n_pages), np.int32)
    for r, s in rows:
      tokens[r] = s.generated[-1]
      start[r] = s.cached
      rem[r] = remaining[s.id]
      stop[r, :len(s.stop_tokens)] = sorted(s.stop_tokens)
      table[r, :len(s.pages)] = s.pages
      table[r, len(s.pages):] = s.pages[0]
    return tokens, start, rem, stop, table

  def _decode(self, seqs: list[RunningSequence], events: list) -> None:
    if self.speculative is not None:
      return self.speculative.decode(self, seqs, events)
    b, rows = self._layout(seqs)
    n = b * self.spec.num_shards
    k = self.decode_steps
    tokens, start, rem, stop, table = self._decode_inputs(seqs, rows, n, k)
    sampled = any(s.sampling.temperature > 0 for s in seqs)
    want_logits = any(s.want_logits for s in seqs)
    t0 = time.perf_counter()
    out, logits, self.pools = self.steps.generate(
        self.steps.state, self.pools, tokens, start, rem, stop, table,
        *self._sampling_arrays(n, rows), n_steps=k, sampled=sampled, want_logits=want_logits)
    out = np.asarray(out)
    logits = np.asarray(logits) if want_logits else None
    self.timings["decode_s"] += time.perf_counter() - t0
    self.counts["decode_calls"] += 1
    self.counts["decode_steps"] += int((out >= 0).any(axis=0).sum())
    for r, s in rows:
      for j in range(k):
        if out[r, j] < 0 or s.finish_reason is not None:
          break
        s.cached += 1
        self.counts["decode_tokens"] += 1
        self._emit(s, int(out[r, j]), None if logits is None else logits[r, j], events)

  def step(self) -> list[Event]:
    """Admits what fits, prefills it, then decodes one token for every running sequence.

    Returns:
      The tokens produced in this step, in order (a newly admitted sequence yields two: its
      prefill token and its first decode token, unless it finished).
    """
    events: list[Event] = []
    admitted = self._admit()
    if admitted:
      self._prefill(admitted, events)
    running = [s for s in self._running.values()]
    if running:
      self._decode(running, events)
    return events

  def generate(self, prompts: Union[Prompt, Sequence[Prompt]], *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               stop_tokens: Iterable[int] = (), key: Optional[jax.Array] = None,
               stream: Optional[Callable[[Event], None]] = None,
               return_logits: bool = False) -> list[Completion]:
    """Generates completions for prompts (continuous batching over `max_batch` slots).

    Args:
      prompts: one prompt or a list of prompts (token-id lists, or str for byte-level models).
      max_new_tokens, temperature, top_k, top_p, stop_tokens, return_logits: per request, see
        `submit`.
      key: PRNG key; request i samples with fold_in(key, i) (default key(0)).
      stream: called with every `Event` as soon as its token exists.

    Returns:
      One `Completion` per prompt, in order.

    Raises:
      ValueError: any invalid prompt or setting, before any work is done.
    """
    if isinstance(prompts, (str, bytes, bytearray, np.ndarray)) or (
        isinstance(prompts, (list, tuple)) and prompts and
        all(isinstance(t, (int, np.integer)) for t in prompts)):
      prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
      raise ValueError("no prompts given")
    sampling = SamplingParams(temperature, top_k, top_p)
    stop = tuple(stop_tokens or ())
    for i, p in enumerate(prompts):  # everything is checked before any request is queued
      try:
        self._check(self.encode(p), max_new_tokens, sampling, stop)
      except ValueError as e:
        raise ValueError(f"prompt {i}: {e}") from None
    key = jax.random.key(0) if key is None else key
    ids = [self.submit(p, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, stop_tokens=stop, key=jax.random.fold_in(key, i),
                       return_logits=return_logits) for i, p in enumerate(prompts)]
    pending = set(ids)
    while pending:
      for ev in self.step():
        if stream is not None:
          stream(ev)
        if ev.finish_reason is not None:
          pending.discard(ev.request_id)
    return [self.completion(i) for i in ids]
