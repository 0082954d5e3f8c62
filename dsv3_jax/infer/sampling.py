"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling, per sequence.

Every sequence carries its own settings and PRNG key, and the key of a step is
fold_in(key, position): a sequence's samples depend only on its own key and positions, never on
which other sequences share the batch (continuous batching stays reproducible).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request picks tokens.

  Attributes:
    temperature: 0 = greedy (argmax); > 0 divides the logits before sampling.
    top_k: keep the k most likely tokens (0 = all); ties at the k-th logit are kept.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p
      (1.0 = all), applied after top_k.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def validate(self, vocab_size: int) -> "SamplingParams":
    """Raises ValueError naming the setting and the allowed values."""
    t, k, p = self.temperature, self.top_k, self.top_p
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
      raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {t!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= vocab_size:
      raise ValueError(f"top_k must be an integer in 0..{vocab_size} (0 = off), got {k!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
    return self


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           key_data: jax.Array, positions: jax.Array) -> jax.Array:
  """Picks one token per row.

  Args:
    logits: [B, V] float32.
    temperature: [B] float32 (<= 0: greedy).
    top_k: [B] int32 (<= 0: off).
    top_p: [B] float32 in (0, 1].
    key_data: [B, ...] uint32 raw PRNG keys (`jax.random.key_data`), one per sequence.
    positions: [B] int32 position of the token being chosen (folded into the key).

  Returns:
    [B] int32 token ids.
  """
  v = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  z = logits / jnp.maximum(temperature, 1e-6)[:, None]
  srt = jnp.sort(z, axis=-1)[:, ::-1]  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)
  rank = jnp.arange(v)[None, :]
  srt = jnp.where(rank < k[:, None], srt, _NEG)
  probs = jax.nn.softmax(srt, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
  keep_sorted = (before < top_p[:, None]) & (rank < k[:, None])
  cutoff = jnp.min(jnp.where(keep_sorted, srt, jnp.inf), axis=-1, keepdims=True)
  z = jnp.where((z >= kth) & (z >= cutoff), z, _NEG)

  def draw(kd, pos, row):
    key = jax.random.fold_in(jax.random.wrap_key_data(kd), pos)
    return jax.random.categorical(key, row)

  sampled = jax.vmap(draw)(key_data, positions, z).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)
