"""Qwen2: the Llama block with q/k/v bias (always on in Qwen2, whatever config.json says), no o bias."""

from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    o_bias = False
