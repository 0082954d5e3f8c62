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


class StepSession:
  """One model variant's compiled training step on one device, kept to run several timed rounds
  (benchmark_step.py alternates it with the PyTorch reference).

  Args:
    overrides: `ModelConfig` fields replaced in the configs/tiny.py model, e.g.
      `dict(num_nextn_predict_layers=0)` or `dict(dtype="bfloat16", fp8=True)`.
    batch: sequences of 256 bytes per step (>= 1).
    cpu_options: XLA:CPU compiler options instead of the training step's
      `step.TRAIN_CPU_OPTIONS` (the A/B of that choice; {} = XLA's defaults); None = those.

  Attributes:
    compile_s: seconds to lower and compile the step (s).
    model_cfg, train_cfg: the configs used; windows(n): the first n token windows of the data.
  """

  def __init__(self, overrides: dict, batch: int, cpu_options: dict | None = None):
    import jax
    from flax import nnx

    from configs import tiny
    from dsv3_jax.model.config import ModelConfig
    from dsv3_jax.model.transformer import Transformer
    from dsv3_jax.train import data, step, trainer

    cfg = tiny.get_config()
    cfg.train.steps = 1000
    self.train_cfg = cfg.train
    self.model_cfg = mc = ModelConfig.from_dict(cfg.model.to_dict()).replace(**overrides)
    corpus = data.load_corpus(None, cfg.data.heldout_fraction)
    self.ds = data.train_dataset(corpus.train, seq_len=SEQ_LEN, extra=mc.mtp_depth,
                                 batch_size=batch, seed=0)
    self.batch = batch
    model = Transformer(mc, rngs=nnx.Rngs(0))
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    opt = trainer.make_optimizer(cfg.train)
    self.state = (params, other, opt.init(params))
    fns = step.make_step_fns(graphdef, opt, mc, cfg.train, SEQ_LEN,
                             cpu_options=cpu_options)
    cap = (1,)  # one device: the grouped expert kernel is dropless, no capacity applies
    t0 = time.perf_counter()
    self.compiled = fns.train_step.lower(*self.state, jax.numpy.asarray(self.ds[0]),
                                         cap).compile()
    self.compile_s = time.perf_counter() - t0
    self.i = 0
    self.metrics = None

  def windows(self, n: int):
    import numpy as np
    return np.stack([np.asarray(self.ds[i]) for i in range(n)])

  def run(self, n: int, timed: bool = True) -> tuple[list, list]:
    """Runs n steps on the next windows; returns (wall s, process CPU s) per step when
    `timed` (each step synchronised), else ([], []) with one synchronisation at the end."""
    import jax
    wall, cpu = [], []
    for _ in range(n):
      w = jax.numpy.asarray(self.ds[self.i])
      self.i += 1
      t, c = time.perf_counter(), time.process_time()
      *state, m = self.compiled(*self.state, w)
      self.state = tuple(state)
      if timed:
        jax.block_until_ready((self.state, m))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    jax.block_until_ready(self.state)
    self.metrics = m
    return wall, cpu


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (bytes; Linux ru_maxrss is in KiB)."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(overrides: dict, steps: int, train_steps: int, batch: int) -> dict:
  """Times the training step of one model variant on one device (a `StepSession`).

  Args:
    overrides: `ModelConfig` fields replaced in the configs/tiny.py model.
    steps: timed steps (>= 1).
    train_steps: untimed training steps before them (>= 0).
    batch: sequences of 256 bytes per step (>= 1).

  Returns:
    dict with compile_s (s), step_s (median step, s), step_min_s (s), tokens_per_s (at the
    median), step_cpu_s (median process CPU time per step, s), and the last timed step's loss,
    expert_load_max_over_mean and dropped tokens (as load_max_over_mean, dropped).
  """
  import numpy as np
  sess = StepSession(overrides, batch)
  sess.run(train_steps, timed=False)  # realistic routing state
  times, cpu = sess.run(steps)
  return summarize(sess, times, cpu)


def summarize(sess: StepSession, times, cpu) -> dict:
  """The `measure` dict of a session's timed steps (wall and CPU seconds per step)."""
  import numpy as np
  med = float(np.median(times))
  m = sess.metrics
  return dict(compile_s=sess.compile_s, step_s=med, step_min_s=float(np.min(times)),
              tokens_per_s=sess.batch * SEQ_LEN / med, step_cpu_s=float(np.median(cpu)),
              loss=float(m["loss"]), load_max_over_mean=float(m["expert_load_max_over_mean"]),
              dropped=float(m["dropped_tokens"]))
