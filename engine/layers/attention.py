"""Self-attention block: packed qkv projection, optional per-head q/k RMSNorm (Qwen3), rotary and
the KV-cache store (``qkv``), then the paged attention backend and the output projection, which the
decoder layer calls around it (so piecewise CUDA graphs can stop at attention). The q/k norm,
rotary and store run as one ``LayerOps`` call (one fused kernel on CUDA).

Tensor parallel (#7): each rank holds its share of the heads (``ModelConfig.tp_heads``): q heads
split evenly, kv heads split too, or replicated when there are fewer than ranks (rank r then holds
kv head ``r // (tp_size // num_kv_heads)``, the one its q heads attend to). Attention itself is
per head and needs no communication; ``o_proj`` is row-parallel and sums the ranks' outputs. The
q/k norm weights are per ``head_dim`` and whole on every rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.config import ModelConfig
from engine.distributed import TPGroup
from engine.kvcache.page_pool import KVPagePool
from engine.layers.kernels import LayerOps
from engine.layers.linear import PackedLinear, Part, RowParallelLinear
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
        tp: TPGroup | None = None,
    ) -> None:
        super().__init__()
        tp = TPGroup() if tp is None else tp
        self.layer_id = layer_id
        # This rank's heads; num_kv_shards distinct kv slices (fewer than ranks: replicated).
        self.num_heads, self.num_kv_heads = cfg.tp_heads(tp.world_size)
        num_kv_shards = cfg.num_kv_heads // self.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scaling = cfg.head_dim**-0.5
        self.q_size, self.kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        parts = [
            Part("q", cfg.q_size),
            Part("k", cfg.kv_size, num_kv_shards),
            Part("v", cfg.kv_size, num_kv_shards),
        ]
        self.qkv_proj = PackedLinear(cfg.hidden_size, parts, bias=opts.qkv_bias, tp=tp)
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, bias=opts.o_bias, tp=tp, ops=ops)
        # Weight holders for the checkpoint's q_norm / k_norm; applied inside ops.qk_norm_rope.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if opts.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if opts.qk_norm else None
        self.eps = cfg.rms_norm_eps
        self.rotary, self.ops = rotary, ops

    def qkv(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm: RMSNorm,
        kv_pool: KVPagePool,
        slots: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything before attention: the layer's input ``norm`` of x [T, hidden] (after adding
        ``residual``, when given) and the qkv projection (one ``LayerOps.norm_linear``), then q
        [T, num_heads, head_dim] and k, v [T, num_kv_heads, head_dim] (this rank's heads),
        normalized and rotated; K and V are also stored into ``kv_pool`` at ``slots`` [T] (this
        layer's pages), in the same kernel on CUDA. Returns q, k, v and the residual stream."""
        bias = self.qkv_proj.bias
        qkv, residual = self.ops.norm_linear(x, residual, norm.weight, norm.eps, self.qkv_proj.weight, bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
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
        return q, k, v, residual
