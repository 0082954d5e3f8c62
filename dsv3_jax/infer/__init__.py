"""Serving: the paged latent KV cache, absorbed MLA decoding and the continuous-batching engine,
prefill/decode disaggregation, two-batch overlap, MTP speculative decoding, request streams.

`Engine.from_hf(path)` / `Engine.from_workdir(workdir)` then `engine.generate(prompts, ...)`;
`dsv3-generate` is the command-line front end (`infer.cli`).
"""

from dsv3_jax.infer.cache import (CacheFullError, CacheSpec, PageAllocator, bytes_per_token,
                                  init_pools)
from dsv3_jax.infer.disaggregated import DisaggregatedEngine, disaggregated_meshes
from dsv3_jax.infer.engine import Completion, Engine, Event
from dsv3_jax.infer.steps import StepFunctions, for_mesh
from dsv3_jax.infer.sampling import SamplingParams, sample

__all__ = [
    "CacheFullError", "CacheSpec", "PageAllocator", "bytes_per_token", "init_pools",
    "Completion", "DisaggregatedEngine", "disaggregated_meshes", "Engine", "Event",
    "StepFunctions", "for_mesh", "SamplingParams", "sample",
]
