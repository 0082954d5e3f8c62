"""Jitted prefill and decode steps of the serving engine, for one model placement.

`StepFunctions(model, spec, mesh)` holds the pure step functions (model state, cache pools and
small host-built arrays in; tokens, logits and the updated pools out), each jitted once per shape
bucket; `for_mesh` rebuilds a model's parameters for another mesh (prefill and decode can live
on two meshes; the latent cache moves between them with `cache.gather_pages` /
`cache.scatter_pages`). On a (`node`, `gpu`) mesh every step runs per device inside one
`jax.shard_map`: attention is data parallel (each device holds its sequences and their cache
pages), the routed experts are sharded over the devices and DeepSeekMoE moves tokens with the
configured dispatch schedule (`flat` / `two_hop`, payload codecs included), dropless.

The scheduler that feeds these steps (continuous batching, page allocation) is `infer.engine`.
"""

from __future__ import annotations

import collections
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax import xla_cpu
from dsv3_jax.infer import cache as cache_lib
from dsv3_jax.infer import overlap as overlap_lib
from dsv3_jax.infer.attention import mla_decode
from dsv3_jax.infer.moe import local_moe
from dsv3_jax.infer.sampling import sample
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.model.transformer import Transformer

# ---------------------------------------------------------------------------- compilation

# XLA:CPU options of every serving program: no YNNPACK (XLA's own dot and loop emitters).
# XLA:CPU's default hands dots and reductions to YNNPACK, which is slow at decode sizes (in a
# profile of the batch-32 decode step its batched expert products [32, 8, 256] x [32, 256, 128]
# took the largest share of the step). The A/B against XLA's defaults, greedy tokens compared,
# is experiments/serving.py's `compare_cpu_options` (results/serving.md, "XLA:CPU options").
# LLVM at -O2 (`xla_cpu.LLVM_O2`: less compile time, the same step time). Not used on other
# backends.
SERVING_CPU_OPTIONS = {**xla_cpu.NO_YNNPACK, **xla_cpu.LLVM_O2}


def serving_jit(fn, **kwargs):
  """`jax.jit(fn, **kwargs)`, with `compiler_options=SERVING_CPU_OPTIONS` on a CPU backend
  unless `kwargs` sets compiler_options (the options are read here, when the program is
  jitted)."""
  return xla_cpu.cpu_jit(fn, SERVING_CPU_OPTIONS, **kwargs)


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


def model_mesh(model: Transformer):
  """The mesh the model's experts are laid out for (None: one device or no MoE layer)."""
  for moe in model.moe_layers:
    return moe.mesh
  return None


# ---------------------------------------------------------------------------- the steps


class StepFunctions:
  """Jitted prefill and decode for one model placement (one device or one mesh).

  Every call traces once per new input shape; `compiles` counts the traces per step kind.

  Args:
    model: the Transformer, built for `mesh` (see `for_mesh`).
    spec: the cache shape (`spec.num_shards` = the mesh size, 1 without a mesh).
    mesh: None or the (`node`, `gpu`) mesh the model's experts are sharded over.
    moe_kernel: on one device, "serving" (the decode-sized grouped kernel of `infer.moe`) or
      "module" (`DeepSeekMoE.__call__`); on a mesh always the module (dispatch schedules).
    micro_batches: 1, or 2 for two micro-batch overlap on a mesh (`infer.overlap`: each
      device's rows split in halves, one half's dispatch / combine between the other's
      attention and experts; an odd per-device batch gets one padding row; same outputs).
  """

  def __init__(self, model: Transformer, spec: cache_lib.CacheSpec, mesh=None,
               moe_kernel: str = "serving", micro_batches: int = 1):
    if moe_kernel not in ("serving", "module"):
      raise ValueError(f"moe_kernel={moe_kernel!r}; allowed: ('serving', 'module')")
    self.micro_batches = overlap_lib.check_micro_batches(micro_batches, mesh)
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
      self.prefill = serving_jit(self._prefill_local, donate_argnums=(1,))
      self.decode = serving_jit(self._decode_local, donate_argnums=(1,))
      self.pool_sharding = None
      self.sample = serving_jit(self._sample)
      self._generate = serving_jit(
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
      self.prefill = serving_jit(pre, donate_argnums=(1,),
                             in_shardings=(st_sh, pools_sh) + (batch,) * 3,
                             out_shardings=(batch, batch, pools_sh))
      self.decode = serving_jit(dec, donate_argnums=(1,),
                            in_shardings=(st_sh, pools_sh) + (batch,) * 4,
                            out_shardings=(batch, batch, pools_sh))
      self.sample = serving_jit(self._sample, in_shardings=(batch,) * 6, out_shardings=batch)

      def gen(state, pools, *args):
        fn = functools.partial(self._generate_local, n_steps=args[9], sampled=args[10],
                               want_logits=args[11])
        return jax.shard_map(fn, mesh=mesh, in_specs=(st_spec, pool_specs) + (rows,) * 9,
                             out_specs=(rows, rows, pool_specs))(state, pools, *args[:9])

      self._generate = serving_jit(gen, donate_argnums=(1,), static_argnums=(11, 12, 13),
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
    h, pools = self._prefill_hidden(model, pools, tokens, lens, page_table)
    last = jnp.take_along_axis(h, jnp.maximum(lens - 1, 0)[:, None, None], axis=1)
    logits = model.head(model.norm(last))[:, 0]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, pools

  def _prefill_geometry(self, tokens, lens, page_table):
    """(mask [b, S] bool, cos, sin [S, rope/2], cache slots [b, S] int32) of a prefill batch."""
    b, s = tokens.shape
    pos = jnp.arange(s, dtype=jnp.int32)
    mask = pos[None, :] < lens[:, None]
    cos, sin = rope_cos_sin(pos, self.inv_freq, self.rope_scale)
    slots = cache_lib.slot_ids(page_table, jnp.broadcast_to(pos, (b, s)), mask,
                               self.spec.page_size)
    return mask, cos, sin, slots

  def _prefill_hidden(self, model, pools, tokens, lens, page_table):
    """The decoder over whole prompts: (h [b, S, hidden] before the final norm, pools)."""
    mask, cos, sin, slots = self._prefill_geometry(tokens, lens, page_table)
    h = model.embed(tokens)
    if self.micro_batches == 2:
      return overlap_lib.prefill_layers(self, model, h, pools, mask, cos, sin, slots)
    pools = list(pools)
    for i, layer in enumerate(model.layers):
      h, pools[i] = self._prefill_layer(layer, h, cos, sin, pools[i], slots, mask)
    return h, tuple(pools)

  def _prefill_layer(self, layer, h, cos, sin, pool, slots, mask):
    """One decoder block over whole prompts (materialised MLA), writing its latents to `pool`
    at `slots`: (h [b, S, hidden], pool). Also runs the MTP blocks (infer.speculative)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    q_nope, q_rope = attn.queries(x, cos, sin)
    c_kv, k_rope = attn.latent_kv(x, cos, sin)
    pool = cache_lib.write_latents(pool, slots, jnp.concatenate([c_kv, k_rope], axis=-1))
    h = h + attn.attend(q_nope, q_rope, c_kv, k_rope)
    h = h + self._ffn(layer, layer.post_attention_layernorm(h), mask)
    return h, pool

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
    h, pools = self._decode_hidden(model, pools, tokens, positions, valid, page_table)
    return model.head(model.norm(h)), pools

  def _decode_hidden(self, model, pools, tokens, positions, valid, page_table):
    """(h [b, T, hidden] before the final norm, pools) of new tokens [b, T] at positions."""
    cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scale)
    h = model.embed(tokens)
    if self.micro_batches == 2:
      return overlap_lib.decode_layers(self, model, h, pools, cos, sin, page_table, positions,
                                       valid)
    pools = list(pools)
    for i, layer in enumerate(model.layers):
      h, pools[i] = self._decode_layer(layer, h, cos, sin, pools[i], page_table, positions,
                                       valid)
    return h, tuple(pools)

  def _decode_layer(self, layer, h, cos, sin, pool, page_table, positions, valid):
    """One decoder block on new tokens (absorbed MLA on the paged cache): (h, pool). Also runs
    the MTP blocks (infer.speculative)."""
    out, pool = mla_decode(layer.self_attn, layer.input_layernorm(h), cos, sin, pool,
                           page_table, positions, valid, self.spec.page_size)
    h = h + out
    h = h + self._ffn(layer, layer.post_attention_layernorm(h), valid)
    return h, pool

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
