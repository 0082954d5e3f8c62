"""Wrote grouped_swiglu_pinned.npz: outputs and gradients of the grouped SwiGLU kernels (float32,
bfloat16 and FP8; windows 4 and 128) computed by the kernels of commit 1c8b396, before the float
and FP8 kernels shared their window loops. tests/model/test_moe.py pins today's kernels to them.
Rerunning it with today's code rewrites the file from today's kernels (run from the repo root).
"""
import numpy as np, jax, jax.numpy as jnp
from dsv3_jax.model.experts import grouped_swiglu
rng = np.random.default_rng(0)
e, d, f = 5, 16, 12
sizes = np.array([7, 0, 19, 3, 9], np.int32)
starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
r = int(sizes.sum()) + 4
x = jnp.asarray(rng.standard_normal((r, d)), jnp.float32)
wg = jnp.asarray(rng.standard_normal((e, d, f)) * 0.3, jnp.float32)
wu = jnp.asarray(rng.standard_normal((e, d, f)) * 0.3, jnp.float32)
wd = jnp.asarray(rng.standard_normal((e, f, d)) * 0.3, jnp.float32)
dy = rng.standard_normal((r, d)).astype(np.float32)
segs = (jnp.asarray(starts), jnp.asarray(sizes), jnp.arange(e, dtype=jnp.int32))
out = dict(x=np.asarray(x), wg=np.asarray(wg), wu=np.asarray(wu), wd=np.asarray(wd), dy=dy, starts=starts, sizes=sizes)
for window in (4, 128):
  for dt in ("float32", "bfloat16"):
    fn = lambda x, a, b, c: grouped_swiglu(x.astype(dt), *segs, a, b, c, window)
    y, vjp = jax.vjp(fn, x, wg, wu, wd)
    g = vjp(jnp.asarray(dy).astype(dt))
    n = int(sizes.sum())
    out[f"y_{window}_{dt}"] = np.asarray(y[:n].astype(jnp.float32))
    for name, v in zip(("dx", "dwg", "dwu", "dwd"), g):
      out[f"{name}_{window}_{dt}"] = np.asarray(v.astype(jnp.float32))
np.savez("tests/data/grouped_swiglu_pinned.npz", **out)
print({k: v.shape for k, v in out.items()})
from dsv3_jax.model.experts import grouped_swiglu_fp8
from dsv3_jax.quant.fp8 import Fp8Recipe
for window in (4, 128):
  fn = lambda x, a, b, c: grouped_swiglu_fp8(x, *segs, a, b, c, window, Fp8Recipe())
  y, vjp = jax.vjp(fn, x, wg, wu, wd)
  g = vjp(jnp.asarray(dy))
  n = int(sizes.sum())
  out[f"y_{window}_fp8"] = np.asarray(y[:n])
  for name, v in zip(("dx", "dwg", "dwu", "dwd"), g):
    out[f"{name}_{window}_fp8"] = np.asarray(v)
np.savez("tests/data/grouped_swiglu_pinned.npz", **out)
