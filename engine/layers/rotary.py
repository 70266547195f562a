"""Rotary position embedding (NeoX / HF "rotate_half" layout): the precomputed cos/sin table.

The table covers every position up to ``max_positions`` and is indexed on the device by the packed
``positions`` tensor, so one call serves extend and decode batches alike without host-side work.
Applying it is ``LayerOps.qk_norm_rope`` (``engine.layers.kernels``): torch ops, or on CUDA one
Triton kernel that also does Qwen3's q/k norm.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import RopeConfig


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.scaling == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    return inv_freq  # [head_dim // 2]


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly between.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the table, shared by every layer (one copy, non-persistent buffers)."""

    cos_cache: torch.Tensor  # [max_positions, head_dim] float32
    sin_cache: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, rope)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_positions, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)
