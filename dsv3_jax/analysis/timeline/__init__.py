"""Event-driven timelines: dual micro-batch overlap, the EP decode bound, pipeline schedules.

One module per concern, their public names re-exported here:

  * `engine`: `Task`, `simulate` -> `Timeline` of `Interval`s. Tasks run on streams (a compute
    stream, a communication stream, a pipeline rank...), each in submission order, one at a time,
    like a CUDA stream; time advances from completion event to completion event, so overlaps,
    stalls and bubbles come out of the dependencies, not from formulas.
  * `overlap`: `moe_layer_costs` -> `LayerCosts`, `layer_tasks` / `simulate_layers`: one or more
    MoE layers for two micro-batches, sequential or with dual micro-batch overlap (Insights
    §2.3.1, V3 report §3.2.1 / §3.4): attention and MoE compute of one micro-batch run while the
    other's dispatch / combine is on the network.
  * `decode`: `ep_comm_time`, `ep_tpot_bound`, `simulate_decode`: the expert-parallel decode
    bound of Insights §2.3.2 (dispatch in FP8, combine in BF16, 8 routed + 1 shared expert, 61
    layers).
  * `pipeline`: `pipeline_tasks` / `simulate_pipeline`: 1F1B, ZB1P (ZB-H1, Qi et al. 2023) and
    DualPipe (V3 report §3.2.1, Fig. 5, Table 2) generated op by op per rank, with the
    dependencies between stages, whose measured bubbles are compared with `bubble_formula`.

Times are in seconds unless a function says otherwise (pipeline times are in any unit).
"""

from dsv3_jax.analysis.timeline.decode import ep_comm_time, ep_tpot_bound, simulate_decode
from dsv3_jax.analysis.timeline.engine import Interval, Task, Timeline, simulate
from dsv3_jax.analysis.timeline.overlap import (COMM, COMPUTE, PHASES, LayerCosts, LayerResult,
                                                layer_tasks, moe_layer_costs, simulate_layers)
from dsv3_jax.analysis.timeline.pipeline import (PIPELINE_METHODS, PipelineResult,
                                                 bubble_formula, memory_formula, pipeline_tasks,
                                                 simulate_pipeline)

__all__ = [
    "Task", "Interval", "Timeline", "simulate",
    "LayerCosts", "LayerResult", "moe_layer_costs", "layer_tasks", "simulate_layers",
    "COMPUTE", "COMM", "PHASES",
    "ep_comm_time", "ep_tpot_bound", "simulate_decode",
    "PIPELINE_METHODS", "PipelineResult", "bubble_formula", "memory_formula", "pipeline_tasks",
    "simulate_pipeline",
]
