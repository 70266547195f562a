"""Qwen3 (dense): the Llama block with per-head RMSNorm on q and k before rotary, no qkv bias."""

from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
