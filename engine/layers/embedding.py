"""The token embedding and the LM head, vocab-parallel (#7).

Both split the vocabulary's rows over the ranks the same way, so a tied LM head is the embedding's
own parameter on every rank. The vocabulary is padded up to a multiple of the rank count; rank r
holds rows ``[r * rows, (r + 1) * rows)`` with ``rows = ceil(vocab / world_size)``, pad rows zero.
Pad rows never reach sampling: the head cuts their logits off after the gather. With one rank
there is no padding and each runs a single op (``F.embedding``; the LM head's ``LayerOps.linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import TPGroup
from engine.layers.kernels import LayerOps
from engine.layers.linear import ShapeMismatch


class VocabParallelEmbedding(nn.Module):
    """Ids outside this rank's rows look up zeros; the all-reduce adds the one rank's row that
    holds each id to every rank."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = TPGroup() if tp is None else tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // self.tp.world_size)
        self.vocab_start = self.tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))
        self.weight.weight_loader = self.load_weight  # type: ignore[attr-defined]
        self.weight.checkpoint_shapes = {None: (vocab_size, hidden_size)}  # type: ignore[attr-defined]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)  # [num_tokens, hidden]
        local = input_ids - self.vocab_start  # [num_tokens]
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # [num_tokens, hidden]
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0.0))

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        assert shard is None, f"vocab-parallel weight is not packed but got shard {shard!r}"
        whole = param.checkpoint_shapes[None]  # type: ignore[attr-defined]
        if tuple(loaded.shape) != whole:
            raise ShapeMismatch(whole, tuple(loaded.shape))
        num_real = max(0, min(self.rows, self.vocab_size - self.vocab_start))
        param.data[:num_real].copy_(loaded[self.vocab_start : self.vocab_start + num_real])
        param.data[num_real:].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits: each rank computes its rows' logits (through ``ops.linear``: the batch-1
    GEMV on CUDA), an all-gather lays them side by side in rank order, and the pad rows' columns
    are cut off."""

    def __init__(
        self, vocab_size: int, hidden_size: int, tp: TPGroup | None = None, ops: LayerOps | None = None
    ):
        super().__init__(vocab_size, hidden_size, tp)
        self.ops = LayerOps() if ops is None else ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.ops.linear(x, self.weight)  # [batch, rows]
        if self.tp.world_size == 1:
            return logits
        logits = self.tp.all_gather(logits, dim=-1)  # [batch, rows * world_size]
        return logits[:, : self.vocab_size].contiguous()  # [batch, vocab]
