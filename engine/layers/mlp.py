"""The gated SiLU MLP shared by Llama and Qwen: down(silu(gate(x)) * up(x)), gate/up packed."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.kernels import LayerOps
from engine.layers.linear import Linear, PackedLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, ops: LayerOps) -> None:
        super().__init__()
        self.gate_up_proj = PackedLinear(
            hidden_size, [("gate", intermediate_size), ("up", intermediate_size)]
        )
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, hidden] -> gate_up [T, 2 * inter] -> [T, inter] -> [T, hidden]
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))
