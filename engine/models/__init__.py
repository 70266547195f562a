"""Model architectures, looked up by the HF ``architectures`` name in config.json."""

from __future__ import annotations

import importlib

from torch import nn

# HF architecture name -> "module:Class"; modules are imported only when used.
ARCHITECTURES = {
    "LlamaForCausalLM": "engine.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "engine.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "engine.models.qwen3:Qwen3ForCausalLM",
}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architectures: {architecture!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    module, name = ARCHITECTURES[architecture].split(":")
    return getattr(importlib.import_module(module), name)
