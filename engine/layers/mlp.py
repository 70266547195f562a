"""The gated SiLU MLP shared by Llama and Qwen: down(silu(gate(x)) * up(x)), gate/up packed.

Tensor parallel (#7): gate/up column-parallel (each rank its slice of the intermediate features,
gate and up sliced alike), down row-parallel (an all-reduce sums the ranks' partial outputs)."""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed import TPGroup
from engine.layers.kernels import LayerOps
from engine.layers.linear import PackedLinear, RowParallelLinear


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
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp=tp)
        self.ops = ops

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        # x [T, hidden] -> gate_up [T, 2 * inter / tp] -> [T, inter / tp] -> [T, hidden]
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)), reduce)
