"""The decoder layer's elementwise ops, behind a registry: ``torch`` (the CPU path and the reference)
and ``triton`` (fused kernels for CUDA), chosen once when the model is built.

Why: eager torch spends ~50 small kernels per layer on RMSNorm (casts, pow, mean, rsqrt, muls),
rotary (gather, casts, rotate-half, muls, adds), SiLU·up and residual adds; inside a decode CUDA
graph those launches are free but each still costs a few µs of GPU time, which at batch 1 is more
than the weights take to read. The ``triton`` ops do each group in one kernel: 4 per layer, the
KV-cache store included (``qk_norm_rope_store`` writes K and V into the pool as it rotates). At a
few rows (decode at small batches) the projections are theirs too (``linear``, ``norm_linear``,
``norm_gate_up``: ``engine.layers.triton_gemv``), the norm before a projection and the SiLU·up
after gate/up fused into the projection's kernel: 5 kernels per layer besides attention.

Contract (``LayerOps``): every op takes and returns device tensors, reads nothing back to the host
and sizes its launch from tensor shapes only, so it can run inside a CUDA graph. Results have the
dtype the ``torch`` op gives; the ``torch`` op is the code the layers always ran (HF's arithmetic:
float32 statistics, each elementwise op rounded to the model dtype) and the ``triton`` op follows
the same roundings, so both agree to within float32 reduction order.

Layers receive the instance from the model constructor (``load_model(..., ops=create_layer_ops(cfg))``);
nothing in a forward checks the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from engine.config import EngineConfig, device_kind
from engine.registry import Registry


class LayerOps:
    """The ``torch`` implementation; subclasses override with fused kernels (module docstring)."""

    name: ClassVar[str] = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dim, HF-style: float32 statistics, weight applied in the input dtype.
        x [..., dim]; weight [dim]."""
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-norm block's residual add fused into the next norm: ``s = x + residual`` (rounded to
        the dtype, as a separate add would be), returns ``(rms_norm(s), s)``. x, residual [T, dim]."""
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear``: x [T, in] -> [T, out] with weight [out, in]."""
        return F.linear(x, weight, bias)

    def norm_linear(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-norm block's entry: ``s = x + residual`` (``x`` itself when residual is None), then
        the projection of ``rms_norm(s)``; returns ``(linear(rms_norm(s), weight, bias), s)``."""
        return self.norm_project(x, residual, norm_weight, eps, weight, bias, gated=False)

    def norm_gate_up(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm_linear`` into the packed gate/up projection [2 * inter, in], then the activation:
        returns ``(silu(gate) * up [T, inter], s)``."""
        return self.norm_project(x, residual, norm_weight, eps, weight, None, gated=True)

    def norm_project(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        gated: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``norm_linear`` (``gated=False``) and ``norm_gate_up`` (``gated=True``) run; the one
        method an implementation overrides for both."""
        if residual is None:
            h, summed = self.rms_norm(x, norm_weight, eps), x
        else:
            h, summed = self.add_rms_norm(x, residual, norm_weight, eps)
        y = self.linear(h, weight, bias)
        return (self.silu_and_mul(y) if gated else y), summed

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The gated MLP's activation on the packed projection: [T, 2 * inter] -> [T, inter]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def qk_norm_rope(
        self,
        positions: torch.Tensor,  # [T] int64
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        cos_cache: torch.Tensor,  # [max_positions, head_dim] float32
        sin_cache: torch.Tensor,
        q_weight: torch.Tensor | None,  # [head_dim]: per-head RMSNorm first (Qwen3), or None
        k_weight: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Optional per-head q/k RMSNorm, then rotary (NeoX "rotate_half" layout) on q and k."""
        if q_weight is not None and k_weight is not None:
            q, k = self.rms_norm(q, q_weight, eps), self.rms_norm(k, k_weight, eps)
        cos = cos_cache[positions].unsqueeze(1).to(q.dtype)  # [T, 1, head_dim]
        sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def qk_norm_rope_store(
        self,
        positions: torch.Tensor,  # [T] int64
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        cos_cache: torch.Tensor,
        sin_cache: torch.Tensor,
        q_weight: torch.Tensor | None,
        k_weight: torch.Tensor | None,
        eps: float,
        k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]: one layer's K pages, flattened
        v_cache: torch.Tensor,
        slots: torch.Tensor,  # [T] int64 pool slot of each new token
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``qk_norm_rope``, then the new tokens' K (as rotated) and V written into the page pool."""
        q, k = self.qk_norm_rope(positions, q, k, cos_cache, sin_cache, q_weight, k_weight, eps)
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
        return q, k


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass(frozen=True)
class LayerOpsCaps:
    devices: frozenset[str]  # device kinds it runs on
    fused: bool  # fused kernels: used where ``EngineConfig.fused_kernels`` is on and the device fits


LAYER_OPS: Registry[LayerOps, LayerOpsCaps] = Registry("layer ops")


@LAYER_OPS.register("torch", caps=LayerOpsCaps(devices=frozenset({"cpu", "cuda"}), fused=False))
def _torch() -> LayerOps:
    return LayerOps()


@LAYER_OPS.register("triton", caps=LayerOpsCaps(devices=frozenset({"cuda"}), fused=True))
def _triton() -> LayerOps:
    from engine.layers.triton_ops import TritonOps

    return TritonOps()


def layer_ops_name(cfg: EngineConfig) -> str:
    """The first registered fused implementation that runs on ``cfg.device`` when
    ``cfg.fused_kernels`` is on (CUDA: ``triton``); otherwise the unfused one (``torch``)."""
    kind = device_kind(cfg.device)
    fits = [
        name
        for name in LAYER_OPS.names(ordered=True)
        if kind in LAYER_OPS.caps(name).devices and (cfg.fused_kernels or not LAYER_OPS.caps(name).fused)
    ]
    return max(fits, key=lambda name: LAYER_OPS.caps(name).fused)  # max: the first of the best


def create_layer_ops(name: str) -> LayerOps:
    return LAYER_OPS.create(name)
