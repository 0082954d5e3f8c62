"""FP8 training wired into the model (report §3.3; results/fp8_training.md): the config switch,
the FP8 Linear, the FP8 grouped experts, FP8 dispatch on a mesh, the whole model, and a short
FP8 training run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import orion_4x8_bf16, orion_4x8_fp8, tiny
from dsv3_jax.model.config import FP8_LAYER_FAMILIES, ModelConfig
from dsv3_jax.model.experts import bind_experts, grouped_swiglu, grouped_swiglu_fp8
from dsv3_jax.model.layers import Linear
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel import dispatch
from dsv3_jax.parallel.mesh import make_mesh
from dsv3_jax.quant import fp8
from dsv3_jax.quant.codec import codec_from_name
from moe_reference import expert_ffn, moe_dense_reference

RECIPE = fp8.Fp8Recipe(pow2_scale=True)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- config ----------------------------------------------------------------------------------


def test_fp8_settings_validate_and_select_families():
  base = ModelConfig()
  assert not base.fp8 and base.fp8_layers == FP8_LAYER_FAMILIES
  assert all(base.fp8_recipe(f) is None for f in FP8_LAYER_FAMILIES)  # off unless fp8=True
  cfg = base.replace(fp8=True, fp8_layers=("routed_experts",), fp8_grad_format="e5m2")
  assert cfg.fp8_recipe("attention_projections") is None
  r = cfg.fp8_recipe("routed_experts")
  assert (r.fmt_forward, r.fmt_backward, r.pow2_scale, r.accumulator_mantissa_bits) == (
      "e4m3", "e5m2", True, None)
  # A run's config.json gives lists back; the config stays hashable.
  assert hash(ModelConfig.from_dict(dict(cfg.to_dict(), fp8_layers=["dense_mlp"])))
  for change, match in [
      (dict(fp8_layers=("mlp",)), r"fp8_layers has unknown name\(s\) \['mlp'\]; allowed"),
      (dict(fp8_layers="dense_mlp"), "fp8_layers must be a tuple"),
      (dict(fp8_format="e3m4"), r"fp8_format='e3m4'; allowed: \('e4m3', 'e5m2'\)"),
      (dict(fp8=1), "model.fp8 must be True or False"),
      (dict(fp8_accumulator_mantissa_bits=30), "fp8_accumulator_mantissa_bits"),
      (dict(fp8_accumulator_mantissa_bits=13, fp8_promotion_interval=100),
       "fp8_promotion_interval"),
  ]:
    with pytest.raises(ValueError, match=match):
      base.replace(**change)
  with pytest.raises(ValueError, match="FP8 layer family 'head'"):
    cfg.fp8_recipe("head")


def test_configs_accept_the_fp8_fields():
  t = ModelConfig.from_dict(tiny.get_config().model.to_dict())
  assert not t.fp8 and t.fp8_layers == FP8_LAYER_FAMILIES
  b = ModelConfig.from_dict(orion_4x8_bf16.get_config().model.to_dict())
  f = ModelConfig.from_dict(orion_4x8_fp8.get_config().model.to_dict())
  assert (b.dtype, b.fp8, b.dispatch_payload, b.combine_payload) == (
      "bfloat16", False, "bf16", "bf16")
  assert (f.dtype, f.fp8, f.dispatch_payload, f.combine_payload) == (
      "bfloat16", True, "fp8", "bf16")
  # Same job otherwise: only the FP8 settings differ.
  diff = {k for k, v in f.to_dict().items() if b.to_dict()[k] != v}
  assert diff == {"fp8", "dispatch_payload"}


# --- FP8 Linear ------------------------------------------------------------------------------


def test_fp8_linear_is_fp8_matmul_and_its_gradients_are_close_to_float32():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 50, 256)), jnp.float32)
  gy = jnp.asarray(rng.standard_normal((3, 50, 192)), jnp.float32)
  lin8 = Linear(256, 192, fp8_recipe=RECIPE, init_std=0.05, rngs=nnx.Rngs(0))
  lin32 = Linear(256, 192, init_std=0.05, rngs=nnx.Rngs(0))
  w = lin8.kernel[...]

  def vjp(lin, gy=gy):
    graphdef, state = nnx.split(lin)
    y, back = jax.vjp(lambda x, state: nnx.merge(graphdef, state)(x), x, state)
    dx, dstate = back(gy)
    return y, dx, dstate["kernel"][...]

  y8, dx8, dw8 = vjp(lin8)
  y32, dx32, dw32 = vjp(lin32)
  np.testing.assert_array_equal(y8, fp8.fp8_matmul(x, w, RECIPE))
  for got, want in [(y8, y32), (dx8, dx32), (dw8, dw32)]:
    assert 0.005 < _rel(got, want) < 0.08  # E4M3's error: a few percent, never zero
  assert dw8.dtype == jnp.float32
  # BF16 compute: output and input gradient in BF16, the master-weight gradient float32.
  lin_bf = Linear(256, 192, dtype=jnp.bfloat16, fp8_recipe=RECIPE, rngs=nnx.Rngs(0))
  y, _, dw = vjp(lin_bf, gy.astype(jnp.bfloat16))
  assert (y.dtype, dw.dtype) == (jnp.bfloat16, jnp.float32)


# --- FP8 grouped experts ---------------------------------------------------------------------


def _grouped_inputs(lens, d=256, f=128, seed=1):
  rng = np.random.default_rng(seed)
  e = len(lens)
  starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
  r = int(sum(lens)) + 5  # unused tail rows
  arr = lambda shape, s: jnp.asarray(rng.standard_normal(shape) * s, jnp.float32)
  segs = (jnp.asarray(starts, jnp.int32), jnp.asarray(lens, jnp.int32),
          jnp.arange(e, dtype=jnp.int32))
  return (arr((r, d), 1.0), segs, arr((e, d, f), 1 / 16), arr((e, d, f), 1 / 16),
          arr((e, f, d), 1 / 11), arr((r, d), 1.0), starts)


def test_grouped_fp8_equals_per_expert_fp8_matmul_and_is_close_to_float32():
  lens = [200, 5, 0, 140]  # more than one window, a short one, an empty expert
  x, segs, wg, wu, wd, gy, starts = _grouped_inputs(lens)
  n = int(sum(lens))

  def per_expert(x, wg, wu, wd):
    outs = []
    for e, (s, ln) in enumerate(zip(starts, lens)):
      if ln:
        xe = x[s:s + ln]
        h = jax.nn.silu(fp8.fp8_matmul(xe, wg[e], RECIPE)) * fp8.fp8_matmul(xe, wu[e], RECIPE)
        outs.append(fp8.fp8_matmul(h, wd[e], RECIPE))
    return jnp.concatenate(outs)

  def run(f):
    y, back = jax.vjp(lambda *a: f(*a)[:n], x, wg, wu, wd)
    grads = back(gy[:n])
    return (y, grads[0][:n]) + grads[1:]

  got = jax.jit(lambda: run(lambda *a: grouped_swiglu_fp8(a[0], *segs, *a[1:], 128, RECIPE)))()
  ref = jax.jit(lambda: run(per_expert))()
  f32 = jax.jit(lambda: run(lambda *a: grouped_swiglu(a[0], *segs, *a[1:], 128)))()
  for name, a, b, c in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), got, ref, f32):
    assert _rel(a, b) < 1e-5, name  # the same recipe, GEMM by GEMM (summation order aside)
    assert 0.01 < _rel(a, c) < 0.1, (name, _rel(a, c))  # E4M3 error vs the float32 kernel
  assert got[2].dtype == jnp.float32
  # BF16 rows: output and row gradient BF16, weight gradients float32.
  y, back = jax.vjp(lambda x, w: grouped_swiglu_fp8(x, *segs, w, wu, wd, 128, RECIPE),
                    x.astype(jnp.bfloat16), wg)
  dx, dw = back(y)
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)


def test_grouped_fp8_weight_gradient_is_summed_over_data_parallel_devices():
  # Weights replicated over a data-parallel axis, rows sharded over it: the custom VJP must
  # return the sum of the devices' weight gradients (as autodiff does for a plain dot).
  lens = [40, 70]
  x, segs, wg, wu, wd, gy, _ = _grouped_inputs(lens, d=128, f=64, seed=4)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("replica",))
  x2, gy2 = jnp.concatenate([x, x[::-1]]), jnp.concatenate([gy, gy * 0.5])
  f = lambda x, wg: grouped_swiglu_fp8(x, *segs, wg, wu, wd, 128, RECIPE)
  per_device = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("replica"), P()),
                                     out_specs=P("replica")))
  _, back = jax.vjp(per_device, x2, wg)
  dwg = back(gy2)[1]
  one_device = jax.jit(lambda xs, gs: jax.vjp(f, xs, wg)[1](gs)[1])  # one compilation, twice
  want = sum(one_device(xs, gs) for xs, gs in ((x, gy), (x[::-1], gy * 0.5)))
  assert _rel(dwg, want) < 1e-6


# --- model -----------------------------------------------------------------------------------

TINY = ModelConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=2, q_lora_rank=64, kv_lora_rank=32,
                   qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8,
                   n_group=2, topk_group=1, num_experts_per_tok=2, max_position_embeddings=64,
                   initializer_range=0.05)


def test_model_forward_in_fp8_is_close_to_float32_and_only_the_listed_layers_are_fp8():
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 64), 0, 256)
  m32 = Transformer(TINY, rngs=nnx.Rngs(0))
  m8 = Transformer(TINY.replace(fp8=True), rngs=nnx.Rngs(0))
  l32, l8 = nnx.jit(lambda m, t: m(t))(m32, tokens), nnx.jit(lambda m, t: m(t))(m8, tokens)
  assert l8.dtype == jnp.float32
  assert 1e-4 < _rel(l8, l32) < 0.05
  linears = {"/".join(map(str, p)): m.fp8_recipe for p, m in nnx.iter_graph(m8)
             if isinstance(m, Linear)}
  assert linears["lm_head"] is None and linears["mtp/0/eh_proj"] is None
  assert linears["layers/0/self_attn/q_a_proj"] == RECIPE
  assert linears["layers/0/mlp/down_proj"] == RECIPE  # dense MLP
  assert linears["layers/1/mlp/shared_experts/up_proj"] == RECIPE
  assert m8.layers[1].mlp.expert_recipe == RECIPE
  # Only the routed experts: attention projections and shared experts stay in float32.
  m_r = Transformer(TINY.replace(fp8=True, fp8_layers=("routed_experts",)), rngs=nnx.Rngs(0))
  assert m_r.layers[0].self_attn.q_a_proj.fp8_recipe is None
  assert m_r.layers[1].mlp.shared_experts.up_proj.fp8_recipe is None
  assert m_r.layers[1].mlp.expert_recipe == RECIPE


# --- FP8 dispatch on a mesh ------------------------------------------------------------------


def _ep(mesh, sched, topo, cap, e, recipe=None):
  tok = P(("node", "gpu"))

  def run(x, idx, w, valid, wg, wu, wd):
    return sched(x, idx, w, valid, bind_experts(wg, wu, wd, fp8_recipe=recipe), capacity=cap,
                 topo=topo, n_experts=e)[0]

  return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(tok,) * 7, out_specs=tok))


def test_fp8_dispatch_on_an_8_device_mesh_equals_the_qdq_reference():
  nodes, gpus, t_local, k, d, f = 2, 4, 6, 3, 256, 32
  n_dev, e = nodes * gpus, 2 * nodes * gpus
  rng = np.random.default_rng(3)
  t = n_dev * t_local
  x = jnp.asarray(rng.standard_normal((t, d)) * np.exp(rng.standard_normal((t, 1))), jnp.float32)
  idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
  w = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)
  wg, wu = (jnp.asarray(rng.standard_normal((e, d, f)) / 16, jnp.float32) for _ in range(2))
  wd = jnp.asarray(rng.standard_normal((e, f, d)) / 6, jnp.float32)
  valid = jnp.ones((t,), bool)
  mesh, topo = make_mesh(nodes, gpus), dispatch.EPTopology(nodes, gpus)
  fp8c, bf16c = codec_from_name("fp8"), codec_from_name("bf16")
  xq = fp8c.qdq(x)

  # Flat schedule, the report's formats: FP8 dispatch, BF16 combine. Each (token, expert) pair
  # comes back as one BF16 row.
  sched = dispatch.get_schedule("flat", fp8c, bf16c)
  cap = sched.worst_case_capacity(t_local, e, k, topo, nodes)
  y = _ep(mesh, sched, topo, cap, e)(x, idx, w, valid, wg, wu, wd)
  pair = expert_ffn(jnp.broadcast_to(xq[None], (e, t, d)), wg, wu, wd)  # [E, T, D]
  per_pair = jnp.stack([pair[idx[:, j], jnp.arange(t)] for j in range(k)], 1)  # [T, k, D]
  ref = jnp.einsum("tkd,tk->td", bf16c.qdq(per_pair.reshape(t * k, d)).reshape(t, k, d), w)
  # The expert kernel and the reference sum in different orders, which can flip a BF16
  # rounding: at most one BF16 ulp (<= 2^-7 relative) per pair.
  bound = jnp.einsum("tkd,tk->td", jnp.abs(per_pair), w) * 2.0 ** -7 + 1e-6
  assert np.all(np.abs(np.asarray(y) - np.asarray(ref)) <= np.asarray(bound))
  assert _rel(y, ref) < 1e-3
  assert _rel(y, moe_dense_reference(x, idx, w, wg, wu, wd)) > 1e-3  # it did quantize

  # Two-hop with FP8 dispatch and FP8 routed experts: the experts see the dispatched rows
  # once quantized (power-of-two scales: their own tile quantization is then exact), so the
  # result equals the one-device FP8 experts on qdq(x).
  sched = dispatch.get_schedule("two_hop", fp8c, None)
  cap = sched.worst_case_capacity(t_local, e, k, topo, nodes)
  fn = _ep(mesh, sched, topo, cap, e, RECIPE)
  local = dispatch.get_schedule("two_hop", None, None)
  experts8 = lambda wg: bind_experts(wg, wu, wd, fp8_recipe=RECIPE)
  # Outputs and gradients from one compiled program each (EP and one-device reference).
  with_sin = lambda y: (jnp.sum(jnp.sin(y)), y)
  loss = lambda x, wg: with_sin(fn(x, idx, w, valid, wg, wu, wd))
  loss_ref = lambda x, wg: with_sin(local(x, idx, w, valid, experts8(wg), capacity=cap,
                                          topo=dispatch.EPTopology(), n_experts=e)[0])
  g, y = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(x, wg)
  g_ref, y_ref = jax.jit(jax.grad(loss_ref, (0, 1), has_aux=True))(xq, wg)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  # Straight-through BF16 backward through the FP8 dispatch: close to the reference gradient.
  assert _rel(g[0], g_ref[0]) < 1e-2 and _rel(g[1], g_ref[1]) < 1e-5


# --- training --------------------------------------------------------------------------------


def test_short_fp8_training_run_is_finite_and_learns(tmp_path):
  # One device (FP8 dispatch on a mesh is covered above): every FP8 layer family, BF16 compute.
  from dsv3_jax.train import trainer

  c = tiny.get_config()
  c.model.update(dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                      n_routed_experts=8, num_hidden_layers=2, max_position_embeddings=64,
                      dtype="bfloat16", fp8=True))
  c.data.seq_len = 64
  c.data.eval_sequences = 8
  c.train.update(dict(batch_size=8, steps=20, warmup_steps=4, log_every=4, eval_every=20,
                      checkpoint_every=20, workdir=str(tmp_path / "run"), learning_rate=3e-3))
  s = trainer.train(c, progress=False, log=lambda *_: None)
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  losses = [l["loss"] for l in lines if "loss" in l]
  assert all(np.isfinite(losses)) and np.isfinite(s["heldout_loss"])
  assert losses[-1] < losses[0] - 0.5, losses  # it learns (ln 256 = 5.55 at the start)
  assert s["heldout_loss"] < 4.5
