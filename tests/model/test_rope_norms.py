"""RoPE / YaRN and RMSNorm: invariants and hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.config import ModelConfig, RopeScaling, yarn_get_mscale
from dsv3_jax.model.norms import rms_norm
from dsv3_jax.model.rope import apply_rope, rope_cos_sin, rope_frequencies, softmax_scale

BASE = ModelConfig(qk_rope_head_dim=16, qk_nope_head_dim=8)


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_preserves_norm_and_depends_on_position_difference(interleave):
  inv, amp = rope_frequencies(BASE)
  assert amp == 1.0
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

  def rot(x, pos):
    cos, sin = rope_cos_sin(jnp.array([pos]), inv)
    return apply_rope(x, cos, sin, interleave=interleave)

  for pos in (0, 3, 117):
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, pos)), jnp.linalg.norm(q), rtol=1e-5)
  dots = [float(jnp.sum(rot(q, m) * rot(k, n))) for m, n in ((5, 2), (13, 10), (103, 100))]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
  assert abs(float(jnp.sum(rot(q, 7) * rot(k, 2))) - dots[0]) > 1e-3  # other distance differs


def test_interleaved_layout_is_a_permutation_of_rotate_half():
  inv, _ = rope_frequencies(BASE)
  cos, sin = rope_cos_sin(jnp.arange(4), inv)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 2, 16)), jnp.float32)
  perm = np.concatenate([np.arange(0, 16, 2), np.arange(1, 16, 2)])
  np.testing.assert_allclose(apply_rope(x, cos, sin, interleave=True),
                             apply_rope(x[..., perm], cos, sin, interleave=False), rtol=1e-6)


def test_default_frequencies_hand_computed():
  inv, _ = rope_frequencies(BASE)
  np.testing.assert_allclose(inv, [10000 ** (-2 * i / 16) for i in range(8)], rtol=1e-6)


def test_yarn_frequencies_scales_and_amplitude_by_hand():
  rs = RopeScaling(factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                   mscale=1.0, mscale_all_dim=0.707)
  cfg = BASE.replace(rope_scaling=rs, max_position_embeddings=256)
  inv, amp = rope_frequencies(cfg)
  base = np.array([10000 ** (-2 * i / 16) for i in range(8)])
  corr = lambda r: 16 * math.log(64 / (r * 2 * math.pi)) / (2 * math.log(10000))
  low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), 15)
  ramp = np.clip((np.arange(8) - low) / (high - low), 0, 1)
  want = base / 4 * ramp + base * (1 - ramp)  # fast dims kept, slow dims interpolated by 1/s
  np.testing.assert_allclose(inv, want, rtol=1e-6)
  assert inv[0] == pytest.approx(base[0]) and inv[-1] == pytest.approx(base[-1] / 4)
  m = lambda s, c: 0.1 * c * math.log(s) + 1
  assert amp == pytest.approx(m(4, 1.0) / m(4, 0.707))
  assert softmax_scale(cfg) == pytest.approx(24 ** -0.5 * m(4, 0.707) ** 2)
  assert yarn_get_mscale(1.0, 5.0) == 1.0


def test_rms_norm_hand_value_eps_inside_sqrt_and_float32_inside():
  x = jnp.array([[3.0, 4.0]])
  w = jnp.array([1.0, 2.0])
  eps = 0.5
  r = math.sqrt((9 + 16) / 2 + eps)
  np.testing.assert_allclose(rms_norm(x, w, eps), [[3 / r, 8 / r]], rtol=1e-6)
  xb = jnp.array([[300.0, 400.0]], jnp.bfloat16)  # squares overflow nothing in float32
  out = rms_norm(xb, jnp.ones(2), 1e-6)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), [[0.8485, 1.1314]], rtol=1e-2)
