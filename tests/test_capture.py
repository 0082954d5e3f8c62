"""Capture points (`dsv3_jax.model.capture`): inert in a plain forward pass (no new state, no
deprecation warning, same outputs); under `nnx.capture` they return the Linear inputs and the
gradients of the Linear outputs."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.model.config import ModelConfig
from dsv3_jax.model.layers import MLP, Linear
from dsv3_jax.model.transformer import Transformer

SMALL = dict(num_hidden_layers=2, num_nextn_predict_layers=1, vocab_size=64, hidden_size=32,
             intermediate_size=64, moe_intermediate_size=16)


def test_plain_forward_adds_no_state_and_no_warning():
  model = Transformer(ModelConfig().replace(**SMALL), rngs=nnx.Rngs(0))
  before = jax.tree.structure(nnx.state(model))
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Module.sow outside nnx.capture warns (deprecated)
    model.forward(tokens)
  assert jax.tree.structure(nnx.state(model)) == before
  assert not any(hasattr(m, "__captures__") for _, m in nnx.iter_modules(model))


def test_capture_records_linear_inputs_and_output_gradients():
  mlp = MLP(8, 16, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8)), jnp.float32)
  c = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8)), jnp.float32)
  graphdef, state = nnx.split(mlp)
  loss = lambda m, x: jnp.sum(m(x) * c)

  _, perturbations = nnx.capture(loss, nnx.Perturbation)(mlp, x)
  assert all(np.all(np.asarray(v.get_value()) == 0)
             for _, v in nnx.to_flat_state(perturbations))

  def loss_and_sown(p, x):
    return nnx.capture(loss, nnx.Intermediate, init=p)(nnx.merge(graphdef, state), x)

  grads, sown = jax.jit(jax.grad(loss_and_sown, has_aux=True))(perturbations, x)
  (x_down,) = sown["down_proj"]["input"].get_value()
  np.testing.assert_allclose(x_down, jax.nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x),
                             rtol=1e-6, atol=1e-6)
  (x_gate,) = sown["gate_proj"]["input"].get_value()
  np.testing.assert_array_equal(x_gate, x)
  np.testing.assert_array_equal(grads["down_proj"]["output"].get_value(), c)  # dL/dy = c
  g_up = jax.grad(lambda u: jnp.sum(mlp.down_proj(jax.nn.silu(mlp.gate_proj(x)) * u) * c))(
      mlp.up_proj(x))
  np.testing.assert_allclose(grads["up_proj"]["output"].get_value(), g_up, rtol=1e-6,
                             atol=1e-6)
  assert not any(hasattr(m, "__captures__") for _, m in nnx.iter_modules(mlp))


def test_capture_leaves_the_output_unchanged():
  lin = Linear(8, 4, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 8))
  y, sown, _ = nnx.capture(lin, nnx.Intermediate, nnx.Perturbation)(x)
  np.testing.assert_array_equal(y, lin(x))
  np.testing.assert_array_equal(sown["input"].get_value()[0], x)
