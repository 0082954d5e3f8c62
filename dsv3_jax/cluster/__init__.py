"""Tooling beside the runtime: the multi-process launcher and the HLO collective parser.

Nothing in a training or serving step imports this package.

* `launch`: starts and supervises P processes x L emulated CPU devices joined by
  `jax.distributed` (gloo collectives), the multi-controller model of a multi-host job
  (`python -m dsv3_jax.cluster.launch run ...`; README, "More than 256 devices").
* `hlo`: lists a compiled or lowered program's collectives (kind, group size, bytes), so a
  2048-device program can be analysed without running it.
"""
