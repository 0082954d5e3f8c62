"""MTP speculative decoding (DeepSeek-V3 report §5.4.3; EAGLE-style drafting, Li et al. 2024).

The trained multi-token-prediction modules (report §2.2, eqs. 21-23) draft the next D tokens;
the main model verifies them in one forward pass; rejected drafts roll the cache back. Greedy
only: the output is token for token the main model's greedy output (each emitted token is the
main model's own argmax given the verified prefix), the drafts only decide how many tokens one
main forward yields.

One decode step of a sequence whose cache holds positions [0, c) and whose last token t_c is
not cached yet, with drafts d_1..d_D:

1. Verify. The main model decodes [t_c, d_1, .., d_D] at positions c..c+D (T = D + 1 tokens,
   `StepFunctions._decode_hidden`, causal within the step) and picks g_j = argmax after
   position c + j. The accepted length a is the longest prefix with d_{j+1} = g_j; the step
   emits g_0..g_a (= d_1..d_a, then the main model's own next token) and the cache now holds
   positions [0, c + a + 1). Entries the step wrote past that (for rejected drafts) stay in the
   pool but sit beyond the sequence's length: the next step overwrites them before anything
   reads them (`mla_decode` writes, then reads rows [0, position] per query), and a query
   never sees a row past its own position, so a stale entry is never read.
2. Draft. MTP depth d at position i takes h^{d-1}_i (depth 0 = the main model's last hidden
   state, before the final norm) and Emb(t_{i+d}) and predicts t_{i+d+1}. With c' = c + a + 1,
   depth d runs on the window of positions c-d+1 .. c+D, whose tokens t_{c+1+j} are g_j for
   j <= a and the new drafts e_k at j = a + k; its output at position c' - 1 = c + a gives the
   new draft e_d (= t_{c'+d}). Its first input hidden state, h^{d-1}_{c-d+1}, comes from the
   previous step (`carry`, one vector per depth d >= 2). Each MTP block has its own paged
   latent pool, on the same pages as the main cache; depth d's entries are final up to
   position c' - d, the rest are rewritten by the next step, so MTP rollback is the same
   length bookkeeping as the main cache's.

Prefill runs the main model over the prompt, takes its greedy first token t_n, then MTP depth
d over positions 0..n-1 with tokens t_{i+d} (t_{n+k} = e_k, the drafts of earlier depths),
writing the MTP caches and producing the first drafts.

Counters (in `Engine.counts`): `spec_forwards` (per-sequence verify forwards), `spec_drafted`
(drafts verified: D per forward, fewer near max_new_tokens), `spec_accepted` (drafts the
verifier accepted); without stop tokens decode tokens = spec_forwards + spec_accepted, i.e.
tokens per main forward = 1 + accepted / forwards.

Sampling (temperature > 0) is not supported with speculation: the engine refuses such a request
with a ValueError (build the engine with speculative_depth=0 to sample).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.infer import cache as cache_lib
from dsv3_jax.infer.steps import StepFunctions, serving_jit
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.rope import rope_cos_sin

__all__ = ["SpeculativeDecoder", "SpeculativeSteps", "check_speculative_depth"]


def check_speculative_depth(depth, config: ModelConfig) -> int:
  """Validates an engine's `speculative_depth` against the checkpoint's MTP modules.

  Args:
    depth: MTP draft tokens per step (0 = plain decoding).
    config: the model's config (`mtp_depth` = `num_nextn_predict_layers` modules).

  Returns:
    depth as an int.

  Raises:
    ValueError: not an integer in 0..config.mtp_depth (naming the setting and the range).
  """
  allowed = f"0..{config.mtp_depth}" if config.mtp_depth else "0"
  if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 0 \
      or depth > config.mtp_depth:
    raise ValueError(
        f"speculative_depth={depth!r}; allowed: {allowed} (the checkpoint has "
        f"{config.mtp_depth} MTP module(s), num_nextn_predict_layers={config.mtp_depth}; "
        "0 = plain decoding)")
  return int(depth)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x[b, idx[b]] for x [b, L, ...], idx [b] int."""
  idx = jnp.clip(idx, 0, x.shape[1] - 1)
  return jnp.take_along_axis(x, idx.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


class SpeculativeSteps:
  """Jitted prefill and multi-step verify-and-draft for one model placement.

  Args:
    steps: the engine's `StepFunctions` (model state, main cache spec, mesh, MoE kernel); the
      main-model blocks are its `_prefill_layer` / `_decode_layer`, compilations are counted in
      its `compiles` ("spec_prefill", "spec_generate").
    depth: D, MTP modules used (1..model mtp_depth).

  Attributes:
    mtp_spec: the MTP cache shape: one pool per depth, same pages and page size as the main
      cache (`CacheSpec` with num_layers = D).

  Raises:
    ValueError: a depth the model does not have (`check_speculative_depth`), or 0.
  """

  def __init__(self, steps: StepFunctions, depth: int):
    depth = check_speculative_depth(depth, steps.config)
    if depth < 1:
      raise ValueError("SpeculativeSteps needs speculative_depth >= 1")
    self.steps = steps
    self.depth = depth
    self.mtp_spec = dataclasses.replace(steps.spec, num_layers=depth)
    self.hidden = steps.config.hidden_size
    mesh = steps.mesh
    self._generate_fns = {}
    if mesh is None:
      self._prefill = serving_jit(self._prefill_local, donate_argnums=(1, 2))
      self._wrap = lambda fn, n_in: serving_jit(fn, donate_argnums=(1, 2))
    else:
      from dsv3_jax.parallel.mesh import state_shardings
      axes = tuple(mesh.axis_names)
      st_sh = state_shardings(steps.state, mesh)
      st_spec = jax.tree.map(lambda s: s.spec, st_sh)
      rows = P(axes)
      main_specs = (rows,) * steps.spec.num_layers
      mtp_specs = (rows,) * depth
      batch = NamedSharding(mesh, rows)
      main_sh = (steps.pool_sharding,) * steps.spec.num_layers
      mtp_sh = (steps.pool_sharding,) * depth

      def wrap(fn, n_in):
        sm = jax.shard_map(fn, mesh=mesh, in_specs=(st_spec, main_specs, mtp_specs)
                           + (rows,) * n_in, out_specs=rows)
        return serving_jit(sm, donate_argnums=(1, 2),
                       in_shardings=(st_sh, main_sh, mtp_sh) + (batch,) * n_in)

      self._wrap = wrap
      self._prefill = wrap(self._prefill_local, 3)

  def init_pools(self) -> tuple[jax.Array, ...]:
    """Zeroed MTP pools (one per depth), placed like the main pools."""
    return cache_lib.init_pools(self.mtp_spec, self.steps.pool_sharding)

  # -- entry points
  def prefill(self, state, pools, mtp_pools, tokens, lens, page_table):
    """Main prefill plus MTP prefill (see `_prefill_local`)."""
    return self._prefill(state, pools, mtp_pools, tokens, lens, page_table)

  def generate(self, state, pools, mtp_pools, tokens, start, drafts, carry, remaining, stop_ids,
               page_table, *, n_steps: int, want_logits: bool):
    """Up to n_steps verify-and-draft steps in one call (see `_generate_local`); one
    compilation per shape bucket, n_steps and want_logits."""
    key = (int(n_steps), bool(want_logits))
    if key not in self._generate_fns:
      fn = functools.partial(self._generate_local, n_steps=key[0], want_logits=key[1])
      self._generate_fns[key] = self._wrap(fn, 7)
    return self._generate_fns[key](state, pools, mtp_pools, tokens, start, drafts, carry,
                                   remaining, stop_ids, page_table)

  # -- per-shard bodies (local arrays; on a mesh they run inside shard_map)
  def _mtp_input(self, model, d, h_prev, tokens):
    """eh_proj [hnorm(h^{d-1}); enorm(Emb(t))] of MTP depth d (1-based): [b, L, hidden]."""
    m = model.mtp[d - 1]
    emb = model.embed(tokens)
    return m.eh_proj(jnp.concatenate([m.hnorm(h_prev), m.enorm(emb)], axis=-1))

  def _draft(self, model, d, h):
    """Greedy token of MTP depth d from its block output h [b, hidden]: [b] int32."""
    logits = model.head(model.mtp[d - 1].norm(h))
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def _prefill_local(self, state, pools, mtp_pools, tokens, lens, page_table):
    """Prompts through the main model, then through MTP depths 1..D.

    Args:
      tokens: [b, S] int32 right-padded prompts; lens: [b] int32 (0 = empty slot);
      page_table: [b, P] int32 (pages for the S prompt positions).

    Returns:
      (first [b] int32 greedy token t_n, its logits [b, V] float32, main pools, MTP pools,
      drafts [b, D] int32 (e_d predicts t_{n+d}), carry [b, D-1, hidden] (h^{d-1} at position
      n-d+1 for depth d = 2..D)).
    """
    st = self.steps
    st.compiles["spec_prefill"] += 1
    model = nnx.merge(st.graphdef, state)
    d_max = self.depth
    b, s = tokens.shape
    h, pools = st._prefill_hidden(model, pools, tokens, lens, page_table)
    last = jnp.maximum(lens - 1, 0)
    logits = model.head(model.norm(_take(h, last)))
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    mask, cos, sin, slots = st._prefill_geometry(tokens, lens, page_table)
    rows = jnp.arange(b)
    ext = jnp.pad(tokens, ((0, 0), (0, d_max + 1))).at[rows, lens].set(first)
    mtp_pools = list(mtp_pools)
    drafts, carry = [], []
    for d in range(1, d_max + 1):
      x = self._mtp_input(model, d, h, ext[:, d:d + s])
      h, mtp_pools[d - 1] = st._prefill_layer(model.mtp[d - 1].block, x, cos, sin,
                                              mtp_pools[d - 1], slots, mask)
      e = self._draft(model, d, _take(h, last))
      ext = ext.at[rows, lens + d].set(e)
      drafts.append(e)
      if d < d_max:
        carry.append(_take(h, lens - d))  # depth d+1's window starts at position n - d
    drafts = jnp.stack(drafts, axis=1)
    carry = (jnp.stack(carry, axis=1) if carry else
             jnp.zeros((b, 0, self.hidden), h.dtype) + h[:, :0, :1] * 0)
    return first, logits, pools, tuple(mtp_pools), drafts, carry

  def _verify(self, model, pools, mtp_pools, tok, start, drafts, carry, left, alive,
              page_table):
    """One verify forward of [tok, drafts] and the MTP drafts after it (module docstring).

    Args:
      tok: [b] int32 t_c; start: [b] int32 c; drafts: [b, D] int32; carry: [b, D-1, hidden];
      left: [b] int32 tokens the sequence may still produce (the step writes positions
        start .. start + min(D + 1, left) - 1 only); alive: [b] bool.

    Returns:
      (g [b, D+1] int32 main greedy tokens, logits [b, D+1, V], a [b] int32 accepted drafts,
      n_drafted [b] int32 drafts verified, new drafts [b, D], new carry [b, D-1, hidden],
      pools, mtp_pools).
    """
    st = self.steps
    d_max = self.depth
    t = d_max + 1
    b = tok.shape[0]
    j = jnp.arange(t, dtype=jnp.int32)
    positions = start[:, None] + j[None, :]
    valid = alive[:, None] & (j[None, :] < left[:, None])
    feed = jnp.concatenate([tok[:, None], drafts], axis=1)
    h, pools = st._decode_hidden(model, pools, feed, positions, valid, page_table)
    logits = model.head(model.norm(h))
    g = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    match = (drafts == g[:, :d_max]) & valid[:, 1:]
    a = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)
    n_drafted = jnp.where(alive, jnp.clip(jnp.minimum(d_max, left - 1), 0, None), 0)
    rows = jnp.arange(b)
    ext = jnp.concatenate([g, jnp.zeros_like(g)], axis=1)  # [b, 2D + 2] >= D + d, d <= D
    limit = start + left
    mtp_pools = list(mtp_pools)
    new_drafts, new_carry = [], []
    for d in range(1, d_max + 1):
      w = d_max + d  # window: positions start-d+1 .. start+D
      wpos = start[:, None] - d + 1 + jnp.arange(w, dtype=jnp.int32)[None, :]
      wvalid = alive[:, None] & (wpos >= 0) & (wpos < limit[:, None])
      h_in = h if d == 1 else jnp.concatenate([carry[:, d - 2][:, None].astype(h.dtype), h],
                                              axis=1)
      x = self._mtp_input(model, d, h_in, ext[:, :w])
      cos, sin = rope_cos_sin(jnp.maximum(wpos, 0), st.inv_freq, st.rope_scale)
      h, mtp_pools[d - 1] = st._decode_layer(model.mtp[d - 1].block, x, cos, sin,
                                             mtp_pools[d - 1], page_table, wpos, wvalid)
      e = self._draft(model, d, _take(h, a + d - 1))  # output at position start + a
      ext = ext.at[rows, a + d].set(e)
      new_drafts.append(e)
      if d < d_max:
        new_carry.append(_take(h, a))  # h^d at position c' - d: depth d+1's next window start
    new_drafts = jnp.stack(new_drafts, axis=1)
    new_carry = jnp.stack(new_carry, axis=1).astype(carry.dtype) if new_carry else carry
    return g, logits, a, n_drafted, new_drafts, new_carry, pools, tuple(mtp_pools)

  def _generate_local(self, state, pools, mtp_pools, tokens, start, drafts, carry, remaining,
                      stop_ids, page_table, *, n_steps: int, want_logits: bool):
    """Up to n_steps speculative steps in one call, tokens and drafts fed back on the device.

    Args:
      tokens: [b] int32 the last generated token (not yet cached); start: [b] int32 its
        position (= cached tokens); drafts: [b, D] int32; carry: [b, D-1, hidden];
      remaining: [b] int32 tokens the sequence may still produce (0 = empty slot);
      stop_ids: [b, S] int32 stop tokens (-1 = none); page_table: [b, P] int32, holding
        every position the call can write (start + remaining - 1 at most).
      n_steps, want_logits: static.

    Returns:
      (out [b, n_steps * (D+1)] int32 emitted tokens in order, -1 after the last;
      logits [b, n_steps * (D+1), V] float32 of each emitted token (or [b, 0, V]);
      drafts [b, D] and carry [b, D-1, hidden] for the next call; stats [b, 3] int32
      (forwards, drafts verified, drafts accepted); pools; MTP pools).
    """
    st = self.steps
    st.compiles["spec_generate"] += 1
    model = nnx.merge(st.graphdef, state)
    b = tokens.shape[0]
    t = self.depth + 1
    v = st.config.vocab_size
    width = n_steps * t
    j = jnp.arange(t, dtype=jnp.int32)
    rows = jnp.arange(b)[:, None]

    def body(carry_):
      (pools, mtp_pools, tok, pos, drafts, hc, alive, count, out, out_logits, stats) = carry_
      g, logits, a, n_dr, drafts, hc, pools, mtp_pools = self._verify(
          model, pools, mtp_pools, tok, pos, drafts, hc, remaining - count, alive, page_table)
      emitted = (j[None, :] <= a[:, None]) & alive[:, None]
      is_stop = jnp.any(g[:, :, None] == stop_ids[:, None, :], axis=-1) & emitted
      has_stop = jnp.any(is_stop, axis=1)
      n_emit = jnp.where(has_stop, jnp.argmax(is_stop, axis=1) + 1, a + 1)
      n_emit = jnp.where(alive, n_emit, 0)
      keep = j[None, :] < n_emit[:, None]
      idx = jnp.where(keep, count[:, None] + j[None, :], width)
      out = out.at[rows, idx].set(g, mode="drop")
      if want_logits:
        out_logits = out_logits.at[rows, idx].set(logits, mode="drop")
      live = alive.astype(jnp.int32)
      stats = stats + jnp.stack([live, n_dr * live, a * live], axis=1)
      count = count + n_emit
      tok = jnp.where(alive, _take(g, a), tok)
      pos = pos + n_emit
      alive = alive & ~has_stop & (count < remaining)
      return (pools, mtp_pools, tok, pos, drafts, hc, alive, count, out, out_logits, stats)

    zero = tokens * 0  # derived from an input: per-device ("varying") inside shard_map
    init = (tuple(pools), tuple(mtp_pools), tokens, start, drafts, carry, remaining > 0, zero,
            jnp.broadcast_to(zero[:, None] - 1, (b, width)),
            jnp.broadcast_to(zero[:, None, None].astype(jnp.float32),
                             (b, width if want_logits else 0, v)),
            jnp.broadcast_to(zero[:, None], (b, 3)))
    if self.steps.mesh is not None:
      axes = tuple(self.steps.mesh.axis_names)
      any_alive = lambda alive: jax.lax.psum(jnp.sum(alive.astype(jnp.int32)), axes) > 0
    else:
      any_alive = jnp.any
    if n_steps == 1:
      c = body(init)
    else:
      c = jax.lax.while_loop(lambda c: (c[0] < n_steps) & any_alive(c[1][6]),
                             lambda c: (c[0] + 1, body(c[1])), (jnp.int32(0), init))[1]
    return c[8], c[9], c[4], c[5], c[10], c[0], c[1]


class SpeculativeDecoder:
  """The engine side of MTP speculative decoding: the MTP pools, each running sequence's drafts
  and carried hidden states, and the prefill / decode calls (`Engine(speculative_depth=D)`).

  Args:
    steps: the engine's `StepFunctions`.
    depth: D >= 1 draft tokens per step (<= the model's mtp_depth).

  Raises:
    ValueError: a depth the model does not have.
  """

  def __init__(self, steps: StepFunctions, depth: int):
    self.steps = SpeculativeSteps(steps, depth)
    self.depth = self.steps.depth
    self.pools = self.steps.init_pools()
    self._state: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id -> (drafts, carry)

  def drafts_of(self, request_id: int) -> Optional[np.ndarray]:
    """[D] int32 the drafts a running sequence's next step will verify (None when not running)."""
    s = self._state.get(request_id)
    return None if s is None else s[0]

  def set_drafts(self, request_id: int, drafts) -> None:
    """Replaces a running sequence's next drafts (ids in the vocabulary): forces a draft, e.g.
    to measure the verifier alone or to test acceptance with known-right drafts.

    Raises:
      KeyError: the request is not running; ValueError: not D ids in the vocabulary.
    """
    d = np.asarray(drafts, np.int32).reshape(-1)
    v = self.steps.steps.config.vocab_size
    if d.shape != (self.depth,) or (d < 0).any() or (d >= v).any():
      raise ValueError(f"drafts must be {self.depth} token ids in 0..{v - 1}, got {drafts!r}")
    self._state[request_id] = (d, self._state[request_id][1])

  def prefill(self, engine, rows, tokens, lens, table):
    """The engine's prefill call with MTP: returns (first tokens, logits, main pools)."""
    self.forget_finished(engine)
    nxt, logits, pools, self.pools, drafts, carry = self.steps.prefill(
        engine.steps.state, engine.pools, self.pools, tokens, lens, table)
    drafts, carry = np.asarray(drafts), np.asarray(carry)
    for r, s in rows:
      self._state[s.id] = (drafts[r], carry[r])
    return nxt, logits, pools

  def decode(self, engine, seqs, events) -> None:
    """One speculative decode call for the running sequences (`Engine._decode`'s counterpart:
    up to `engine.decode_steps` verify steps, each yielding 1 .. D + 1 tokens per sequence)."""
    b, rows = engine._layout(seqs)
    n = b * engine.spec.num_shards
    k = engine.decode_steps
    t = self.depth + 1
    tokens, start, rem, stop, table = engine._decode_inputs(seqs, rows, n, k * t)
    drafts = np.zeros((n, self.depth), np.int32)
    carry = np.zeros((n, self.depth - 1, self.steps.hidden), jnp.dtype(engine.config.dtype))
    for r, s in rows:
      drafts[r], carry[r] = self._state[s.id]
    want_logits = any(s.want_logits for s in seqs)
    t0 = time.perf_counter()
    out, logits, new_drafts, new_carry, stats, engine.pools, self.pools = self.steps.generate(
        engine.steps.state, engine.pools, self.pools, tokens, start, drafts, carry, rem, stop,
        table, n_steps=k, want_logits=want_logits)
    out, stats = np.asarray(out), np.asarray(stats)
    new_drafts, new_carry = np.asarray(new_drafts), np.asarray(new_carry)
    logits = np.asarray(logits) if want_logits else None
    engine.timings["decode_s"] += time.perf_counter() - t0
    c = engine.counts
    c["decode_calls"] += 1
    c["decode_steps"] += int(stats[:, 0].max())
    c["spec_forwards"] += int(stats[:, 0].sum())
    c["spec_drafted"] += int(stats[:, 1].sum())
    c["spec_accepted"] += int(stats[:, 2].sum())
    for r, s in rows:
      for jj in range(out.shape[1]):
        if out[r, jj] < 0 or s.finish_reason is not None:
          break
        s.cached += 1
        c["decode_tokens"] += 1
        engine._emit(s, int(out[r, jj]), None if logits is None else logits[r, jj], events)
      self._state[s.id] = (new_drafts[r], new_carry[r])
    self.forget_finished(engine)

  def forget_finished(self, engine) -> None:
    """Drops the draft state of sequences that are no longer running."""
    for rid in [i for i in self._state if i not in engine._running]:
      del self._state[rid]
