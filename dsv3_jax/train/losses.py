"""The training objective: next-token and MTP cross-entropy, batches, the bias update.

L = CE + lambda / D * sum_d CE_d + alpha * sum_layers L_Bal (report §2.2 eqs. 17-25, §2.1.2
eq. 19), and the auxiliary-loss-free bias update of the router (report §2.1.2).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from dsv3_jax.model.transformer import ModelOutput


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats over positions where mask is True.

  Args:
    logits: [B, S, V] float32; targets: [B, S] int32; mask: [B, S] bool.
  """
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  return jnp.sum((logz - gold) * m) / jnp.maximum(jnp.sum(m), 1.0)


class Batch(NamedTuple):
  """One step's tensors (B sequences of S inputs, MTP depth D).

  inputs [B, S] t_0..t_{S-1}; targets [B, S] t_1..t_S; mask [B, S] bool (input and target are
  real tokens); mtp_tokens [B, S + D] t_0..t_{S+D-1} (depth d embeds t_{i+d}); mtp_targets and
  mtp_masks: D arrays [B, S], depth d's target t_{i+d+1} and where it is a real token.
  """

  inputs: jax.Array
  targets: jax.Array
  mask: jax.Array
  mtp_tokens: jax.Array
  mtp_targets: tuple
  mtp_masks: tuple


def make_batch(window: jax.Array, seq_len: int, mtp_depth: int,
               token_mask: Optional[jax.Array] = None) -> Batch:
  """Splits token windows into inputs, targets and MTP targets with their loss masks.

  The data pipeline reads windows of S + 1 + D tokens, so every depth supervises every
  position. Shorter windows, or `token_mask` False (padding), leave positions whose target falls
  off the end of the real tokens unsupervised (mask False) at every depth.

  Args:
    window: [B, L] int32 tokens, L >= seq_len + 1 (missing tail tokens count as padding).
    seq_len: S.
    mtp_depth: D >= 0.
    token_mask: optional [B, L] bool, True for real tokens (default: all of the window).

  Raises:
    ValueError: L < seq_len + 1.
  """
  b, length = window.shape
  if length < seq_len + 1:
    raise ValueError(f"windows of {length} tokens cannot give {seq_len} inputs and targets")
  if token_mask is None:
    token_mask = jnp.ones((b, length), jnp.bool_)
  full = seq_len + 1 + mtp_depth
  if length < full:
    window = jnp.pad(window, ((0, 0), (0, full - length)))
    token_mask = jnp.pad(token_mask, ((0, 0), (0, full - length)), constant_values=False)
  s = seq_len
  real_in = token_mask[:, :s]
  tgt = lambda k: window[:, k:k + s]
  tgt_mask = lambda k: real_in & token_mask[:, k:k + s]
  return Batch(
      inputs=window[:, :s], targets=tgt(1), mask=tgt_mask(1),
      mtp_tokens=window[:, :s + mtp_depth],
      mtp_targets=tuple(tgt(d + 1) for d in range(1, mtp_depth + 1)),
      mtp_masks=tuple(tgt_mask(d + 1) for d in range(1, mtp_depth + 1)))


class LossOutput(NamedTuple):
  """Scalar float32 losses in nats: the total and its three terms (unweighted)."""

  total: jax.Array
  ce: jax.Array
  mtp: jax.Array
  balance: jax.Array


def compute_losses(out: ModelOutput, batch: Batch, *, mtp_weight: float,
                   balance_alpha: float) -> LossOutput:
  """L = CE + lambda/D * sum_d CE_d + alpha * sum_layers sum_i f_i P_i (report eqs. 17-25)."""
  ce = cross_entropy(out.logits, batch.targets, batch.mask)
  if out.mtp_logits:
    mtp = sum(cross_entropy(lg, tg, m)
              for lg, tg, m in zip(out.mtp_logits, batch.mtp_targets, batch.mtp_masks))
    mtp = mtp / len(out.mtp_logits)
  else:
    mtp = jnp.float32(0.0)
  balance = sum((st.balance_loss for st in out.moe_stats), jnp.float32(0.0))
  total = ce + mtp_weight * mtp + balance_alpha * balance
  return LossOutput(total, ce, mtp, balance)


def bias_update(bias: jax.Array, counts: jax.Array, gamma: float) -> jax.Array:
  """Aux-loss-free balancing (report §2.1.2): b_i -= gamma if expert i is overloaded
  (load above the mean), += gamma if underloaded; unchanged at exactly the mean.

  Args:
    bias: [E] float32; counts: [E] float32 this step's assignments per expert (no padding).
  """
  return bias + gamma * jnp.sign(jnp.mean(counts) - counts)
