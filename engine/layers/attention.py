"""Self-attention block: packed qkv projection, optional per-head q/k RMSNorm (Qwen3), rotary and
the KV-cache store (``qkv``), then the paged attention backend and the output projection, which the
decoder layer calls around it (so piecewise CUDA graphs can stop at attention). The q/k norm,
rotary and store run as one ``LayerOps`` call (one fused kernel on CUDA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.config import ModelConfig
from engine.kvcache.page_pool import KVPagePool
from engine.layers.kernels import LayerOps
from engine.layers.linear import Linear, PackedLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class AttentionOptions:
    """Where architectures differ: Qwen3 normalizes q/k per head; biases differ per family."""

    qk_norm: bool
    qkv_bias: bool
    o_bias: bool


class SelfAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_id: int,
        rotary: RotaryEmbedding,
        opts: AttentionOptions,
        ops: LayerOps,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scaling = cfg.head_dim**-0.5
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.qkv_proj = PackedLinear(
            cfg.hidden_size, [("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)], bias=opts.qkv_bias
        )
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=opts.o_bias)
        # Weight holders for the checkpoint's q_norm / k_norm; applied inside ops.qk_norm_rope.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if opts.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if opts.qk_norm else None
        self.eps = cfg.rms_norm_eps
        self.rotary, self.ops = rotary, ops

    def qkv(
        self, positions: torch.Tensor, x: torch.Tensor, kv_pool: KVPagePool, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything before attention: x [T, hidden] -> q [T, num_heads, head_dim] and k, v
        [T, num_kv_heads, head_dim], normalized and rotated; K and V are also stored into
        ``kv_pool`` at ``slots`` [T] (this layer's pages), in the same kernel on CUDA."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q_weight = None if self.q_norm is None else self.q_norm.weight
        k_weight = None if self.k_norm is None else self.k_norm.weight
        k_cache, v_cache = kv_pool.slot_views(self.layer_id)
        q, k = self.ops.qk_norm_rope_store(
            positions,
            q,
            k,
            v,
            self.rotary.cos_cache,
            self.rotary.sin_cache,
            q_weight,
            k_weight,
            self.eps,
            k_cache,
            v_cache,
            slots,
        )
        return q, k, v
