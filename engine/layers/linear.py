"""Linear layers whose parameters know how to load checkpoint tensors.

Checkpoints store q/k/v and gate/up as separate tensors; we run them as one packed GEMM each (fewer
launches, one read of the activations). ``PackedLinear`` stacks the parts along the output dim and
its ``weight_loader`` copies a named part into its slice. Tensor-parallel sharding (#7) slots in here:
a loader narrows the checkpoint tensor to its rank's slice before copying.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
    assert shard is None, f"parameter of shape {tuple(param.shape)} is not packed but got shard {shard!r}"
    if param.shape != loaded.shape:
        raise ShapeMismatch(tuple(param.shape), tuple(loaded.shape))
    param.data.copy_(loaded)


class ShapeMismatch(ValueError):
    def __init__(self, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
        super().__init__(f"expected shape {expected}, got {got}")
        self.expected, self.got = expected, got


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear(Linear):
    """Several linears with the same input, run as one; parts are named (e.g. "q", "k", "v")."""

    def __init__(self, in_features: int, parts: Sequence[tuple[str, int]], bias: bool = False) -> None:
        super().__init__(in_features, sum(size for _, size in parts), bias)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in parts:
            self.offsets[name] = (start, size)
            start += size
        for p in self.parameters():
            p.weight_loader = self.load_part  # type: ignore[attr-defined]
            p.packed_parts = tuple(self.offsets)  # type: ignore[attr-defined]

    def load_part(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        assert shard in self.offsets, f"unknown part {shard!r}; parts are {list(self.offsets)}"
        start, size = self.offsets[shard]
        target = param.data.narrow(0, start, size)
        if target.shape != loaded.shape:
            raise ShapeMismatch(tuple(target.shape), tuple(loaded.shape))
        target.copy_(loaded)
