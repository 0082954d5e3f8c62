"""The training-step timing protocol shared by benchmark_step.py and fp8_step_time.py.

configs/tiny.py dims, `batch` sequences of 256 bytes of the default corpus per step, one device
(the grouped expert kernel is dropless there: no capacity applies). Per variant: compile; then
`train_steps` untimed training steps on real data, so that the timed steps see a realistically
unbalanced router (byte-level text routes ~29 % of tokens, the spaces, alike); then `steps` steps
timed one by one (wall clock, synchronised with `jax.block_until_ready`).
"""

from __future__ import annotations

import time

SEQ_LEN = 256  # bytes per sequence


def add_args(ap) -> None:
  """Adds the benchmarks' shared options to an `argparse.ArgumentParser`: --steps (timed steps),
  --train-steps (untimed steps first), --batch (sequences of 256 bytes), --quick (3 timed,
  2 untimed)."""
  ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
  ap.add_argument("--train-steps", type=int, default=30, help="untimed steps first")
  ap.add_argument("--batch", type=int, default=8, help="sequences of 256 bytes per step")
  ap.add_argument("--quick", action="store_true", help="3 timed steps, 2 untimed (smoke test)")


def parse_args(ap, argv=None):
  """Parses `argv` with `ap` (see `add_args`), applies --quick and exits with a usage error
  naming the option for --steps or --batch < 1 or --train-steps < 0."""
  args = ap.parse_args(argv)
  if args.quick:
    args.steps, args.train_steps = 3, 2
  for name in ("steps", "batch"):
    if getattr(args, name) < 1:
      ap.error(f"--{name} must be >= 1")
  if args.train_steps < 0:
    ap.error("--train-steps must be >= 0")
  return args


def measure(overrides: dict, steps: int, train_steps: int, batch: int) -> dict:
  """Times the training step of one model variant on one device.

  Args:
    overrides: `ModelConfig` fields replaced in the configs/tiny.py model, e.g.
      `dict(num_nextn_predict_layers=0)` or `dict(dtype="bfloat16", fp8=True)`.
    steps: timed steps (>= 1).
    train_steps: untimed training steps before them (>= 0).
    batch: sequences of 256 bytes per step (>= 1).

  Returns:
    dict with compile_s (s), step_s (median step, s), step_min_s (s), tokens_per_s (at the
    median), and the last timed step's loss, expert_load_max_over_mean and dropped tokens
    (as load_max_over_mean, dropped).
  """
  import jax
  import numpy as np
  from flax import nnx

  from configs import tiny
  from dsv3_jax.model.config import ModelConfig
  from dsv3_jax.model.transformer import Transformer
  from dsv3_jax.train import data, trainer

  cfg = tiny.get_config()
  cfg.train.steps = 1000
  mc = ModelConfig.from_dict(cfg.model.to_dict()).replace(**overrides)
  corpus = data.load_corpus(None, cfg.data.heldout_fraction)
  ds = data.train_dataset(corpus.train, seq_len=SEQ_LEN, extra=mc.mtp_depth, batch_size=batch,
                          seed=0)
  model = Transformer(mc, rngs=nnx.Rngs(0))
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  opt = trainer.make_optimizer(cfg.train)
  opt_state = opt.init(params)
  fns = trainer.make_step_fns(graphdef, opt, mc, cfg.train, SEQ_LEN)
  cap = (1,)  # one device: the grouped expert kernel is dropless, no capacity applies

  t0 = time.perf_counter()
  compiled = fns.train_step.lower(params, other, opt_state, jax.numpy.asarray(ds[0]),
                                  cap).compile()
  compile_s = time.perf_counter() - t0
  for i in range(train_steps):  # realistic routing state
    params, other, opt_state, m = compiled(params, other, opt_state, jax.numpy.asarray(ds[i]))
  jax.block_until_ready(params)
  times = []
  for i in range(train_steps, train_steps + steps):
    w = jax.numpy.asarray(ds[i])
    t = time.perf_counter()
    params, other, opt_state, m = compiled(params, other, opt_state, w)
    jax.block_until_ready((params, m))
    times.append(time.perf_counter() - t)
  med = float(np.median(times))
  return dict(compile_s=compile_s, step_s=med, step_min_s=float(np.min(times)),
              tokens_per_s=batch * SEQ_LEN / med, loss=float(m["loss"]),
              load_max_over_mean=float(m["expert_load_max_over_mean"]),
              dropped=float(m["dropped_tokens"]))
