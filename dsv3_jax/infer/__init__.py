"""Serving: the paged latent KV cache, absorbed MLA decoding and the continuous-batching engine,
prefill/decode disaggregation, two-batch overlap, MTP speculative decoding, request streams.

`Engine.from_hf(path)` / `Engine.from_workdir(workdir)` then `engine.generate(prompts, ...)`;
`dsv3-generate` is the command-line front end (`infer.cli`).
"""

import importlib

# Names resolved on first use (PEP 562), so that importing the package (or `infer.cli`) does not
# import jax: `dsv3-generate` sets the emulated device count before jax starts.
_WHERE = {
    "CacheFullError": "cache", "CacheSpec": "cache", "PageAllocator": "cache",
    "bytes_per_token": "cache", "init_pools": "cache",
    "DisaggregatedEngine": "disaggregated", "disaggregated_meshes": "disaggregated",
    "Completion": "engine", "Engine": "engine", "Event": "engine",
    "StepFunctions": "steps", "for_mesh": "steps",
    "SamplingParams": "sampling", "sample": "sampling",
}
__all__ = list(_WHERE)


def __getattr__(name):
  if name not in _WHERE:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
