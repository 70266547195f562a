"""The gated SiLU MLP shared by Llama and Qwen: down(silu(gate(x)) * up(x)), gate/up packed.

Tensor parallel (#7): gate/up column-parallel (each rank its slice of the intermediate features,
gate and up sliced alike), down row-parallel (an all-reduce sums the ranks' partial outputs)."""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed import TPGroup
from engine.layers.kernels import LayerOps
from engine.layers.linear import PackedLinear, RowParallelLinear
from engine.layers.norm import RMSNorm


class GatedMLP(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, ops: LayerOps, tp: TPGroup | None = None
    ) -> None:
        super().__init__()
        tp = TPGroup() if tp is None else tp
        if intermediate_size % tp.world_size:
            raise ValueError(
                f"intermediate_size: {intermediate_size} cannot be split evenly over tp_size={tp.world_size}"
            )
        self.gate_up_proj = PackedLinear(
            hidden_size, [("gate", intermediate_size), ("up", intermediate_size)], tp=tp
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp=tp, ops=ops)
        self.ops = ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, reduce: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's pre-norm ``norm`` of ``x + residual`` [T, hidden], then the MLP: returns
        (the MLP output [T, hidden], the residual stream ``x + residual``). gate/up, the norm
        before it and the activation after it are one ``LayerOps.norm_gate_up``."""
        act, residual = self.ops.norm_gate_up(x, residual, norm.weight, norm.eps, self.gate_up_proj.weight)
        return self.down_proj(act, reduce), residual  # act [T, inter / tp]
