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

Mesh. With a (`node`, `gpu`) mesh both steps run per device inside one `jax.shard_map`, as the
trainer does: attention is data parallel (each device holds its sequences and their cache
pages), the routed experts are sharded over the devices and DeepSeekMoE moves tokens with the
configured dispatch schedule (`flat` / `two_hop`, payload codecs included), dropless (worst-case
capacity). Prefill and decode are built by `StepFunctions` for a given model placement and
mesh, so they can live on two different meshes (part 2: the latent cache moves between them,
`cache.gather_pages` / `scatter_pages`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import time
from typing import Callable, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.infer import cache as cache_lib
from dsv3_jax.infer.attention import mla_decode
from dsv3_jax.infer.moe import local_moe
from dsv3_jax.infer.sampling import SamplingParams, sample
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.model.transformer import Transformer

Prompt = Union[str, Sequence[int], np.ndarray]
BYTE_VOCAB = 256


# ---------------------------------------------------------------------------- placement


def for_mesh(model: Transformer, mesh, config: Optional[ModelConfig] = None) -> Transformer:
  """The same parameters in a model built for `mesh` (experts sharded over its (`node`,
  `gpu`) axes), or for one device when mesh is None. `model` is left as it is.

  Args:
    model: the source model.
    mesh: the target mesh or None.
    config: optional execution settings for the new model (e.g. another `dispatch` schedule
      or payload codec); its architecture must be the model's.

  Raises:
    ValueError: the experts do not divide over the mesh (from `DeepSeekMoE`), or `config`
      changes the architecture.
  """
  config = model.config if config is None else config.validate()
  abstract = nnx.eval_shape(lambda: Transformer(config, mesh=mesh, rngs=nnx.Rngs(0)))
  shapes = lambda m: [tuple(v.shape) for v in jax.tree.leaves(nnx.state(m, nnx.Param))]
  if shapes(abstract) != shapes(model):
    raise ValueError("for_mesh: config changes the architecture (parameter shapes differ)")
  graphdef, state = nnx.split(abstract)  # variables carry the new mesh's sharding metadata
  values = nnx.to_pure_dict(nnx.state(model))
  nnx.replace_by_pure_dict(state, jax.device_get(values) if mesh is None else values)
  new = nnx.merge(graphdef, state)
  if mesh is not None:
    from dsv3_jax.parallel.mesh import shard_model
    shard_model(new, mesh)
  return new


def _model_mesh(model: Transformer):
  for moe in model.moe_layers:
    return moe.mesh
  return None


# ---------------------------------------------------------------------------- the steps


def _geometric_buckets(hi: int, ratio: float = 1.25) -> tuple[int, ...]:
  """1, 2, 3, ... growing by `ratio` (at least 1), then hi: ~log_ratio(hi) buckets, padding
  at most (ratio - 1) of the size."""
  out, b = [], 1
  while b < hi:
    out.append(b)
    b = max(b + 1, math.ceil(b * ratio))
  return tuple(out) + (hi,)


def _pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
  """lo, 2 lo, 4 lo, ... below hi, then hi."""
  out, b = [], lo
  while b < hi:
    out.append(b)
    b *= 2
  return tuple(out) + (hi,)


def _buckets(name: str, given: Optional[Sequence[int]], default: tuple[int, ...],
             top: int) -> tuple[int, ...]:
  """Sorted shape buckets, always ending with `top` (so every size up to it has a bucket).

  Raises:
    ValueError: a bucket that is not a positive integer.
  """
  if given is None:
    return default
  vals = list(given)
  if not vals or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                     for v in vals):
    raise ValueError(f"{name} must be a non-empty list of positive integers, got {given!r}")
  return tuple(sorted({int(v) for v in vals if v < top} | {top}))


def _pick(n: int, buckets: tuple[int, ...]) -> int:
  for b in buckets:
    if b >= n:
      return b
  return n  # only for sizes past the last bucket (a prompt as long as max_position)


class StepFunctions:
  """Jitted prefill and decode for one model placement (one device or one mesh).

  Every call traces once per new input shape; `compiles` counts the traces per step kind.

  Args:
    model: the Transformer, built for `mesh` (see `for_mesh`).
    spec: the cache shape (`spec.num_shards` = the mesh size, 1 without a mesh).
    mesh: None or the (`node`, `gpu`) mesh the model's experts are sharded over.
    moe_kernel: on one device, "serving" (the decode-sized grouped kernel of `infer.moe`) or
      "module" (`DeepSeekMoE.__call__`); on a mesh always the module (dispatch schedules).
  """

  def __init__(self, model: Transformer, spec: cache_lib.CacheSpec, mesh=None,
               moe_kernel: str = "serving"):
    if moe_kernel not in ("serving", "module"):
      raise ValueError(f"moe_kernel={moe_kernel!r}; allowed: ('serving', 'module')")
    self.config: ModelConfig = model.config
    self.spec = spec
    self.mesh = mesh
    self.n_shards = 1 if mesh is None else mesh.size
    self.local_moe = mesh is None and moe_kernel == "serving" and not model.config.fp8
    self.compiles: collections.Counter = collections.Counter()
    self.graphdef, self.state = nnx.split(model)
    self.inv_freq = jnp.asarray(model.rope_inv_freq, jnp.float32)
    self.rope_scale = model.rope_attention_scaling
    if mesh is None:
      self.prefill = jax.jit(self._prefill_local, donate_argnums=(1,))
      self.decode = jax.jit(self._decode_local, donate_argnums=(1,))
      self.pool_sharding = None
      self.sample = jax.jit(self._sample)
      self._generate = jax.jit(
          lambda state, pools, *args: self._generate_local(
              state, pools, *args[:9], n_steps=args[9], sampled=args[10], want_logits=args[11]),
          donate_argnums=(1,), static_argnums=(11, 12, 13))
    else:
      axes = tuple(mesh.axis_names)
      for moe in model.moe_layers:
        specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(moe.experts)),
                                is_leaf=lambda x: isinstance(x, P))
        if moe.mesh is not mesh or any(not sp or sp[0] is None for sp in specs):
          raise ValueError("the model's experts are not laid out for this mesh; build it "
                           "with the mesh (load_hf / load_trained mesh=...) or for_mesh")
      from dsv3_jax.parallel.mesh import state_shardings
      st_sh = state_shardings(self.state, mesh)
      st_spec = jax.tree.map(lambda s: s.spec, st_sh)
      rows = P(axes)
      self.pool_sharding = NamedSharding(mesh, rows)
      pool_specs = (rows,) * spec.num_layers
      pre = jax.shard_map(self._prefill_local, mesh=mesh,
                          in_specs=(st_spec, pool_specs) + (rows,) * 3,
                          out_specs=(rows, rows, pool_specs))
      dec = jax.shard_map(self._decode_local, mesh=mesh,
                          in_specs=(st_spec, pool_specs) + (rows,) * 4,
                          out_specs=(rows, rows, pool_specs))
      batch = NamedSharding(mesh, rows)
      pools_sh = (self.pool_sharding,) * spec.num_layers
      self.prefill = jax.jit(pre, donate_argnums=(1,),
                             in_shardings=(st_sh, pools_sh) + (batch,) * 3,
                             out_shardings=(batch, batch, pools_sh))
      self.decode = jax.jit(dec, donate_argnums=(1,),
                            in_shardings=(st_sh, pools_sh) + (batch,) * 4,
                            out_shardings=(batch, batch, pools_sh))
      self.sample = jax.jit(self._sample, in_shardings=(batch,) * 6, out_shardings=batch)

      def gen(state, pools, *args):
        fn = functools.partial(self._generate_local, n_steps=args[9], sampled=args[10],
                               want_logits=args[11])
        return jax.shard_map(fn, mesh=mesh, in_specs=(st_spec, pool_specs) + (rows,) * 9,
                             out_specs=(rows, rows, pool_specs))(state, pools, *args[:9])

      self._generate = jax.jit(gen, donate_argnums=(1,), static_argnums=(11, 12, 13),
                               in_shardings=(st_sh, pools_sh) + (batch,) * 9,
                               out_shardings=(batch, batch, pools_sh))
      self.state = jax.device_put(self.state, st_sh)

  def generate(self, state, pools, tokens, start, remaining, stop_ids, page_table, temperature,
               top_k, top_p, key_data, *, n_steps: int, sampled: bool, want_logits: bool):
    """Jitted multi-step decode (see `_generate_local`); one compilation per shape bucket,
    n_steps and sampled / want_logits flag."""
    return self._generate(state, pools, tokens, start, remaining, stop_ids, page_table,
                          temperature, top_k, top_p, key_data, int(n_steps), bool(sampled),
                          bool(want_logits))

  def init_pools(self) -> tuple[jax.Array, ...]:
    """Zeroed pools, placed for this mesh."""
    return cache_lib.init_pools(self.spec, self.pool_sharding)

  # -- per-shard bodies (local arrays; on a mesh they run inside shard_map)
  def _ffn(self, layer, x, mask):
    if not layer.is_moe:
      return layer.mlp(x)
    if self.local_moe:
      return local_moe(layer.mlp, x, mask)
    b, s, _ = x.shape
    capacity = layer.mlp.worst_case_capacity(b * s * self.n_shards)  # dropless
    y, _ = layer.mlp(x, mask, capacity)
    return y

  def _prefill_local(self, state, pools, tokens, lens, page_table):
    """tokens [b, S] int32 right-padded prompts, lens [b] (0 = empty slot), page_table [b, P].

    Returns (greedy first token [b] int32, its logits [b, V] float32, pools)."""
    self.compiles["prefill"] += 1
    model = nnx.merge(self.graphdef, state)
    b, s = tokens.shape
    pos = jnp.arange(s, dtype=jnp.int32)
    mask = pos[None, :] < lens[:, None]
    cos, sin = rope_cos_sin(pos, self.inv_freq, self.rope_scale)
    slots = cache_lib.slot_ids(page_table, jnp.broadcast_to(pos, (b, s)), mask,
                               self.spec.page_size)
    h = model.embed(tokens)
    pools = list(pools)
    for i, layer in enumerate(model.layers):
      attn = layer.self_attn
      x = layer.input_layernorm(h)
      q_nope, q_rope = attn.queries(x, cos, sin)
      c_kv, k_rope = attn.latent_kv(x, cos, sin)
      pools[i] = cache_lib.write_latents(pools[i], slots,
                                         jnp.concatenate([c_kv, k_rope], axis=-1))
      h = h + attn.attend(q_nope, q_rope, c_kv, k_rope)
      h = h + self._ffn(layer, layer.post_attention_layernorm(h), mask)
    last = jnp.take_along_axis(h, jnp.maximum(lens - 1, 0)[:, None, None], axis=1)
    logits = model.head(model.norm(last))[:, 0]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, tuple(pools)

  def _decode_local(self, state, pools, tokens, start, valid, page_table):
    """tokens [b, T] int32 at positions start[b] + t, valid [b, T] bool, page_table [b, P].

    Returns (greedy next tokens [b, T] int32, logits [b, T, V] float32, pools): entry t is
    the token after position start + t."""
    self.compiles["decode"] += 1
    model = nnx.merge(self.graphdef, state)
    t = tokens.shape[1]
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    logits, pools = self._decode_layers(model, pools, tokens, positions, valid, page_table)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, pools

  def _decode_layers(self, model, pools, tokens, positions, valid, page_table):
    """The decoder on new tokens [b, T] at positions [b, T]: (logits [b, T, V], pools)."""
    cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scale)
    h = model.embed(tokens)
    pools = list(pools)
    for i, layer in enumerate(model.layers):
      out, pools[i] = mla_decode(layer.self_attn, layer.input_layernorm(h), cos, sin, pools[i],
                                 page_table, positions, valid, self.spec.page_size)
      h = h + out
      h = h + self._ffn(layer, layer.post_attention_layernorm(h), valid)
    return model.head(model.norm(h)), tuple(pools)

  def _generate_local(self, state, pools, tokens, start, remaining, stop_ids, page_table,
                      temperature, top_k, top_p, key_data, *, n_steps: int, sampled: bool,
                      want_logits: bool):
    """Up to n_steps decode steps in one call, each token fed back on the device.

    Args:
      tokens: [b] int32 the last generated token of each sequence (not yet cached).
      start: [b] int32 its position (= cached tokens).
      remaining: [b] int32 tokens the sequence may still produce (0 = empty slot).
      stop_ids: [b, S] int32 stop tokens (-1 = none): a sequence stops after one.
      page_table: [b, P] int32, holding every position the call can write.
      temperature, top_k, top_p, key_data: sampling settings (used when `sampled`).
      n_steps, sampled, want_logits: static.

    Returns:
      (tokens [b, n_steps] int32, -1 after a sequence stopped; logits [b, n_steps, V] float32
      (or [b, 0, V] without want_logits); pools).
    """
    self.compiles[f"generate{'_sampled' if sampled else ''}"] += 1
    model = nnx.merge(self.graphdef, state)
    b = tokens.shape[0]
    v = self.config.vocab_size

    def body(j, carry):
      pools, tok, pos, alive, count, out, out_logits = carry
      logits, pools = self._decode_layers(model, pools, tok[:, None], pos[:, None],
                                          alive[:, None], page_table)
      logits = logits[:, 0]
      if sampled:
        nxt = sample(logits, temperature, top_k, top_p, key_data, pos + 1)
      else:
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      nxt = jnp.where(alive, nxt, -1)
      out = out.at[:, j].set(nxt)
      if want_logits:
        out_logits = out_logits.at[:, j].set(logits)
      count = count + alive.astype(jnp.int32)
      stop = jnp.any(nxt[:, None] == stop_ids, axis=1)
      alive = alive & ~stop & (count < remaining)
      return (pools, jnp.maximum(nxt, 0), pos + 1, alive, count, out, out_logits)

    zero = tokens * 0  # derived from an input: per-device ("varying") inside shard_map
    init = (tuple(pools), tokens, start, remaining > 0, zero,
            jnp.broadcast_to(zero[:, None] - 1, (b, n_steps)),
            jnp.broadcast_to(zero[:, None, None].astype(jnp.float32),
                             (b, n_steps if want_logits else 0, v)))
    if n_steps == 1:
      carry = body(0, init)
    else:  # stops early once every sequence is done
      def cond(c):
        return (c[0] < n_steps) & _any_alive(c[4])

      def step(c):
        return (c[0] + 1,) + body(c[0], c[1:])

      if self.mesh is not None:
        axes = tuple(self.mesh.axis_names)
        _any_alive = lambda alive: jax.lax.psum(jnp.sum(alive.astype(jnp.int32)), axes) > 0
      else:
        _any_alive = jnp.any
      carry = jax.lax.while_loop(cond, step, (jnp.int32(0),) + init)[1:]
    return carry[5], carry[6], carry[0]

  def _sample(self, logits, temperature, top_k, top_p, key_data, positions):
    self.compiles["sample"] += 1
    return sample(logits, temperature, top_k, top_p, key_data, positions)


# ---------------------------------------------------------------------------- requests


@dataclasses.dataclass
class Completion:
  """One finished request.

  Attributes:
    request_id: the id `submit` returned.
    prompt: the prompt token ids.
    tokens: generated token ids (a stop token, when one ended the sequence, is included).
    finish_reason: "stop" (a stop token), "length" (max_new_tokens) or "max_position" (the
      model's max_position_embeddings reached).
    text: the generated bytes decoded as UTF-8 (byte-level models), else None.
    logits: [len(tokens), vocab] float32 logits of every chosen token, when requested.
  """

  request_id: int
  prompt: list
  tokens: list
  finish_reason: str
  text: Optional[str] = None
  logits: Optional[np.ndarray] = None


@dataclasses.dataclass
class _Sequence:
  id: int
  prompt: list
  max_new_tokens: int
  sampling: SamplingParams
  stop_tokens: frozenset
  key_data: np.ndarray
  want_logits: bool
  need_pages: int
  shard: int = -1
  pages: list = dataclasses.field(default_factory=list)
  reserved: int = 0
  cached: int = 0  # positions in the cache
  generated: list = dataclasses.field(default_factory=list)
  logits: list = dataclasses.field(default_factory=list)
  finish_reason: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Event:
  """One generated token: (request_id, token, finish_reason or None while running)."""

  request_id: int
  token: int
  finish_reason: Optional[str] = None


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
    decode_steps: decode steps per jitted call (tokens fed back on the device; sequences join
      and leave between calls, a sequence that stops inside a call ends there). 1 = one call
      per token.
    batch_buckets, page_buckets, prompt_buckets: static shapes the steps are compiled for:
      sequences per device in a step, pages read per sequence in decode, prompt tokens in
      prefill (default: powers of two for batch and prompt, sizes growing by 1.25x for pages,
      up to the maximum; fewer buckets = fewer compilations, more padding).

  Raises:
    ValueError: a bad setting, naming it and the allowed values (before any work).
  """

  def __init__(self, model: Transformer, *, mesh=None, max_batch: int = 32,
               page_size: int = 16, num_pages: Optional[int] = None,
               cache_dtype: Optional[str] = None, moe_kernel: str = "serving",
               decode_steps: int = 1,
               batch_buckets: Optional[Sequence[int]] = None,
               page_buckets: Optional[Sequence[int]] = None,
               prompt_buckets: Optional[Sequence[int]] = None):
    c = model.config
    self.config = c
    n_shards = 1 if mesh is None else mesh.size
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
      raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if max_batch % n_shards:
      raise ValueError(f"max_batch={max_batch} must be a multiple of the {n_shards} devices of "
                       f"the mesh (allowed: {n_shards}, {2 * n_shards}, ...)")
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
    self.batch_buckets = _buckets("batch_buckets", batch_buckets,
                                  _pow2_buckets(1, self.slots_per_shard), self.slots_per_shard)
    self.page_buckets = _buckets("page_buckets", page_buckets,
                                 _geometric_buckets(self.max_pages_per_seq),
                                 self.max_pages_per_seq)
    self.prompt_buckets = _buckets("prompt_buckets", prompt_buckets,
                                   _pow2_buckets(min(16, max_pos), max_pos), max_pos)
    if _model_mesh(model) is not mesh:
      model = for_mesh(model, mesh)
    self.model = model
    self.mesh = mesh
    self.max_batch = max_batch
    self.spec = cache_lib.CacheSpec.for_model(c, pages_per_shard=num_pages, page_size=page_size,
                                              dtype=cache_dtype, num_shards=n_shards)
    self.steps = StepFunctions(model, self.spec, mesh, moe_kernel)
    self.pools = self.steps.init_pools()
    self.allocators = [cache_lib.PageAllocator(num_pages) for _ in range(n_shards)]
    self.byte_level = c.vocab_size == BYTE_VOCAB
    self._next_id = 0
    self._waiting: collections.deque[_Sequence] = collections.deque()
    self._running: dict[int, _Sequence] = {}
    self._done: dict[int, _Sequence] = {}
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
    """Token ids of a prompt (a str is UTF-8 bytes, for byte-level models only).

    Raises:
      ValueError: a str for a model whose vocabulary is not the 256 bytes, or a prompt that is
        not a str or a sequence of ints.
    """
    if isinstance(prompt, str):
      if not self.byte_level:
        raise ValueError(f"a text prompt needs a byte-level model (vocab_size {BYTE_VOCAB}); "
                         f"this one has vocab_size {self.config.vocab_size}: pass token ids")
      return list(prompt.encode("utf-8"))
    try:
      ids = np.asarray(prompt)
    except Exception:  # pragma: no cover - exotic inputs
      ids = None
    if ids is None or ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise ValueError("a prompt must be a str or a 1-D sequence of integer token ids, got "
                       f"{type(prompt).__name__}")
    return [int(i) for i in ids]

  def decode_text(self, tokens: Iterable[int]) -> Optional[str]:
    if not self.byte_level:
      return None
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")

  def _check(self, ids: list[int], max_new_tokens: int, sampling: SamplingParams,
             stop_tokens) -> int:
    c = self.config
    if not ids:
      raise ValueError(f"the prompt is empty; allowed: 1..{c.max_position_embeddings} tokens")
    if len(ids) > c.max_position_embeddings:
      raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's "
                       f"max_position_embeddings={c.max_position_embeddings}; allowed: "
                       f"1..{c.max_position_embeddings}")
    bad = [t for t in ids if not 0 <= t < c.vocab_size]
    if bad:
      raise ValueError(f"prompt token id(s) {bad[:5]} outside the vocabulary; allowed: "
                       f"0..{c.vocab_size - 1} (vocab_size={c.vocab_size})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
        or max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    sampling.validate(c.vocab_size)
    bad = [t for t in stop_tokens if not (isinstance(t, (int, np.integer))
                                          and 0 <= t < c.vocab_size)]
    if bad:
      raise ValueError(f"stop token(s) {bad[:5]} outside the vocabulary; allowed: "
                       f"0..{c.vocab_size - 1}")
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
    self._waiting.append(_Sequence(
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
  def _admit(self) -> list[_Sequence]:
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

  def _grow(self, seq: _Sequence, cached: int) -> None:
    """Allocates pages until `cached` positions fit (drawing on the reservation)."""
    alloc = self.allocators[seq.shard]
    while len(seq.pages) * self.spec.page_size < cached:
      seq.pages.append(alloc.allocate(reserved=seq.reserved > 0))
      seq.reserved = max(0, seq.reserved - 1)

  def _finish(self, seq: _Sequence, reason: str) -> None:
    seq.finish_reason = reason
    alloc = self.allocators[seq.shard]
    alloc.release(seq.pages)
    alloc.unreserve(seq.reserved)
    seq.pages, seq.reserved = [], 0
    del self._running[seq.id]
    self._done[seq.id] = seq

  def _emit(self, seq: _Sequence, token: int, logits, events: list) -> None:
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

  def _layout(self, seqs: Sequence[_Sequence]) -> tuple[int, list[tuple[int, _Sequence]]]:
    """Rows of a step batch: shard-major, `b` rows per shard; returns (b, [(row, seq)])."""
    per = collections.defaultdict(list)
    for s in seqs:
      per[s.shard].append(s)
    b = _pick(max(len(v) for v in per.values()), self.batch_buckets)
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

  def _prefill(self, seqs: list[_Sequence], events: list) -> None:
    b, rows = self._layout(seqs)
    n = b * self.spec.num_shards
    longest = max(len(s.prompt) for s in seqs)
    s_len = _pick(longest, self.prompt_buckets)
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

  def _remaining(self, s: _Sequence) -> int:
    """Tokens `s` may still produce before max_new_tokens or max_position_embeddings."""
    g, n = len(s.generated), len(s.prompt)
    return min(s.max_new_tokens - g, self.config.max_position_embeddings - n - g + 1)

  def _decode(self, seqs: list[_Sequence], events: list) -> None:
    b, rows = self._layout(seqs)
    n = b * self.spec.num_shards
    k = self.decode_steps
    remaining = {s.id: self._remaining(s) for s in seqs}
    for _, s in rows:
      self._grow(s, s.cached + min(k, remaining[s.id]))
    n_pages = _pick(max(len(s.pages) for s in seqs), self.page_buckets)
    n_stop = _pick(max(1, max(len(s.stop_tokens) for s in seqs)), (1, 2, 4, 8, 16, 32))
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
      table[r, len(s.pages):] = s.pages[0]  # padding entries point at the sequence's own page
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
    if isinstance(prompts, (str, np.ndarray)) or (
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
