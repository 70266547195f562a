"""RMSNorm, computed the way HF does it (float32 statistics, weight applied in the input dtype).

The arithmetic lives in ``LayerOps`` (``engine.layers.kernels``): torch ops on the CPU, one fused
Triton kernel on CUDA. Given a ``residual``, the norm also performs the pre-norm block's residual add
(``x + residual``) in the same pass and returns both results.
"""

from __future__ import annotations

from typing import overload

import torch
from torch import nn

from engine.layers.kernels import LayerOps


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: LayerOps) -> None:
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim))

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...
    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [T, dim] -> norm(x); with residual [T, dim] -> (norm(x + residual), x + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)
