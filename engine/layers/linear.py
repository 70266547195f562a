"""Linear layers whose parameters know how to load checkpoint tensors, tensor-parallel.

Checkpoints store q/k/v and gate/up as separate tensors; we run them as one packed GEMM each (fewer
launches, one read of the activations). ``PackedLinear`` stacks the parts along the output dim and
its ``weight_loader`` copies a named part into its slice.

Tensor parallelism (#7), Megatron-style: a block's first projection is column-parallel (each rank
computes a slice of the output features, no communication) and its last is row-parallel (each rank
multiplies its slice of the input features; an all-reduce sums the partial products). Checkpoint
tensors are always whole: a loader checks the whole shape, then narrows to its rank's slice. Each
parameter also records the whole tensor's shape per part (``checkpoint_shapes``), so
``init_dummy_weights`` can draw one whole random tensor and load it like a checkpoint's. With one
rank (``tp=None``) every layer runs exactly the single projection (``LayerOps``) it always ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from engine.distributed import TPGroup
from engine.layers.kernels import LayerOps


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
    assert shard is None, f"parameter of shape {tuple(param.shape)} is not packed but got shard {shard!r}"
    if param.shape != loaded.shape:
        raise ShapeMismatch(tuple(param.shape), tuple(loaded.shape))
    param.data.copy_(loaded)


class ShapeMismatch(ValueError):
    def __init__(self, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
        super().__init__(f"expected shape {expected}, got {got}")
        self.expected, self.got = expected, got


def copy_shard(
    target: torch.Tensor, loaded: torch.Tensor, whole: tuple[int, ...], dim: int, start: int
) -> None:
    """Copy ``loaded`` (a whole checkpoint tensor of shape ``whole``) rows ``start :`` along ``dim``
    into ``target``, as many as ``target`` holds."""
    if tuple(loaded.shape) != whole:
        raise ShapeMismatch(whole, tuple(loaded.shape))
    target.copy_(loaded.narrow(dim, start, target.shape[dim]))


class Part(NamedTuple):
    """One checkpoint tensor packed into a ``PackedLinear``: ``size`` output features, cut into
    ``num_shards`` equal slices (None: one per rank). With fewer slices than ranks each is
    replicated: rank r holds slice ``r * num_shards // world_size`` (kv heads fewer than ranks)."""

    name: str
    size: int
    num_shards: int | None = None


class PackedLinear(nn.Module):
    """Several linears with the same input, run as one, column-parallel: parts are named (e.g. "q",
    "k", "v"); this rank's slice of each is stacked along the output dim, [sum of local part sizes,
    in] (no communication). The layers run it through ``LayerOps.norm_linear`` / ``norm_gate_up``,
    with the norm before it."""

    def __init__(
        self,
        in_features: int,
        parts: Sequence[Part | tuple[str, int]],
        bias: bool = False,
        tp: TPGroup | None = None,
    ) -> None:
        super().__init__()
        tp = TPGroup() if tp is None else tp
        # part -> (start in this rank's packed rows, rows, start of this rank's slice in the part)
        self.offsets: dict[str, tuple[int, int, int]] = {}
        whole_sizes: dict[str, int] = {}
        start = 0
        for part in (Part(*p) for p in parts):
            num_shards = part.num_shards or tp.world_size
            assert part.size % num_shards == 0 and tp.world_size % num_shards == 0, (
                f"part {part.name!r}: {part.size} features in {num_shards} slices over {tp.world_size} ranks"
            )
            size = part.size // num_shards
            self.offsets[part.name] = (start, size, tp.rank * num_shards // tp.world_size * size)
            whole_sizes[part.name] = part.size
            start += size
        self.weight = nn.Parameter(torch.empty(start, in_features))
        self.bias = nn.Parameter(torch.empty(start)) if bias else None
        for p in self.parameters():
            p.weight_loader = self.load_part  # type: ignore[attr-defined]
            p.packed_parts = tuple(self.offsets)  # type: ignore[attr-defined]
            p.checkpoint_shapes = {k: (n, *p.shape[1:]) for k, n in whole_sizes.items()}  # type: ignore[attr-defined]

    def load_part(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        assert shard in self.offsets, f"unknown part {shard!r}; parts are {list(self.offsets)}"
        start, size, part_start = self.offsets[shard]
        whole = param.checkpoint_shapes[shard]  # type: ignore[attr-defined]
        copy_shard(param.data.narrow(0, start, size), loaded, whole, 0, part_start)


class RowParallelLinear(nn.Module):
    """Input features split over the ranks: rank r holds columns ``[r * in / tp, (r + 1) * in / tp)``
    of the weight and takes its slice of the input (a column-parallel layer's output); an all-reduce
    sums the partial products. The bias is whole on every rank and added by rank 0 only, before
    the sum, so it counts once."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp: TPGroup | None = None,
        ops: LayerOps | None = None,
    ) -> None:
        super().__init__()
        self.tp = TPGroup() if tp is None else tp
        self.ops = LayerOps() if ops is None else ops  # the GEMM: ``ops.linear``
        assert in_features % self.tp.world_size == 0, f"{in_features} inputs over {self.tp.world_size} ranks"
        self.weight = nn.Parameter(torch.empty(out_features, in_features // self.tp.world_size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.weight.weight_loader = self.load_weight  # type: ignore[attr-defined]
        self.weight.checkpoint_shapes = {None: (out_features, in_features)}  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """x [T, in / tp] -> [T, out]; ``reduce=False`` returns this rank's partial product, for a
        caller that schedules the all-reduce itself (two-batch overlap)."""
        bias = self.bias if self.tp.rank == 0 else None
        out = self.ops.linear(x, self.weight, bias)
        return self.tp.all_reduce(out) if reduce else out

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        assert shard is None, f"row-parallel weight is not packed but got shard {shard!r}"
        whole = param.checkpoint_shapes[None]  # type: ignore[attr-defined]
        copy_shard(param.data, loaded, whole, 1, self.tp.rank * param.shape[1])
