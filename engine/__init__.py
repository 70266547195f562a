"""pdserve's shared model runtime: models, paged KV cache, attention backends, sampling, the engine.

``from engine import LLM, SamplingParams`` is the offline API. Imports are lazy so the torch-free
parts (scheduler, page allocator, radix cache) stay importable without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "CompletionOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "CompletionOutput"):
        from engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
