"""The custom-VJP causal attention equals the textbook softmax attention and its autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.attention import dot_product_attention


def _reference(q, k, v, scale, causal):
  s = jnp.einsum("bqd,bkd->bqk", q, k) * scale
  if causal:
    n = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
  return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, -1), v)


@pytest.mark.parametrize("causal,blocks", [(True, 1), (True, 4), (True, 3), (False, 4)])
def test_matches_reference_values_and_gradients(causal, blocks):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (6, 16, 12))
  k = jax.random.normal(ks[1], (6, 16, 12))
  v = jax.random.normal(ks[2], (6, 16, 8))
  w = jax.random.normal(ks[3], (6, 16, 8))
  f = lambda q, k, v: dot_product_attention(q, k, v, scale=0.3, causal=causal,
                                            query_blocks=blocks)
  g = lambda q, k, v: _reference(q, k, v, 0.3, causal)
  # Values and gradients from one jitted program each (eager dispatch compiles every op).
  loss = lambda fn: (lambda q, k, v: (lambda y: (jnp.sum(y * w), y))(fn(q, k, v)))
  grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2), has_aux=True))
  (gf, yf), (gg, yg) = grad(f)(q, k, v), grad(g)(q, k, v)
  np.testing.assert_allclose(yf, yg, rtol=1e-5, atol=1e-6)
  for a, b in zip(gf, gg):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
