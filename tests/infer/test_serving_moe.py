"""The decode-sized expert calls (model.experts) and the serving MoE give DeepSeekMoE's own output (routing, gates, shared experts), for
loads that fit the batched capacity and loads that spill over it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.infer.moe import local_moe, sorted_capacity_compute
from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.experts import capacity_expert_compute, expert_compute
from dsv3_jax.model.moe import DeepSeekMoE

CFG = ModelConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, n_group=4,
                  topk_group=2, num_experts_per_tok=2, initializer_range=0.2)


def _weights(seed=0, e=8, d=32, f=16):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (e, d, f)) * 0.2, jax.random.normal(k[1], (e, d, f)) * 0.2,
          jax.random.normal(k[2], (e, f, d)) * 0.2)


def _dense(rows, expert, wg, wu, wd):
  out = []
  for r, e in zip(rows, expert):
    out.append(np.zeros_like(r) if e < 0 else
               (jax.nn.silu(r @ wg[e]) * (r @ wu[e])) @ wd[e])
  return np.stack(out)


def test_capacity_kernel_is_dropless_and_equals_the_per_row_reference():
  w = _weights()
  rows = jax.random.normal(jax.random.key(1), (24, 32))
  # expert 3 gets 9 rows (spills over any capacity < 9), some rows have no expert
  expert = jnp.array([3] * 9 + [0, 1, 2, 4, 5, 6, 7, -1, -1, 0, 1, 2, 5, 6, 7], jnp.int32)
  want = _dense(np.asarray(rows), np.asarray(expert), *map(np.asarray, w))
  both = jax.jit(lambda r, e, *w: (
      capacity_expert_compute(r, e, *w, capacity=2, window=4),  # spills
      capacity_expert_compute(r, e, *w, capacity=16, window=4),  # fits
      expert_compute(r, e, *w, window=4, tail_window=None)))
  for got in both(rows, expert, *w):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sorted_capacity_kernel_is_dropless_and_equals_the_per_row_reference():
  w = _weights()
  tokens = jax.random.normal(jax.random.key(1), (12, 32))
  # expert 3 is chosen by 9 tokens (spills over any capacity < 9), two tokens are not routed
  idx = jnp.array([[3, 0], [3, 1], [3, 2], [3, 4], [3, 5], [3, 6], [3, 7], [3, 0], [3, 1],
                   [-1, -1], [2, 5], [-1, -1]], jnp.int32)
  want = _dense(np.repeat(np.asarray(tokens), 2, axis=0), np.asarray(idx).reshape(-1),
                *map(np.asarray, w)).reshape(12, 2, 32)
  both = jax.jit(lambda x, i, *w: (sorted_capacity_compute(x, i, *w, capacity=2, window=4),
                                   sorted_capacity_compute(x, i, *w, capacity=16, window=4)))
  for got in both(tokens, idx, *w):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(both(tokens, idx, *w)[0])[[9, 11]] == 0)


@pytest.mark.parametrize("shape", [(16, 1), (2, 40)])  # capacity kernel, grouped kernel
def test_local_moe_equals_the_module(shape):
  moe = DeepSeekMoE(CFG, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), shape + (32,))
  mask = jnp.ones(shape, bool).at[0, 0].set(False)
  graphdef, state = nnx.split(moe)
  both = jax.jit(lambda st, x, m: (nnx.merge(graphdef, st)(x, m)[0],
                                   local_moe(nnx.merge(graphdef, st), x, m)))
  want, got = both(state, x, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
