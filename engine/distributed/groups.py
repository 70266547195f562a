"""Tensor-parallel groups: which rank this process is, how many there are, and the two collectives
the parallel layers need (``engine.layers.linear``).

There is no module-level state of our own: ``init_tp`` returns a ``TPGroup`` that the caller hands
to the model constructor (``LlamaForCausalLM(cfg, ops, tp=...)``); every layer keeps it. A world of
one rank needs no process group at all: ``TPGroup()`` (what ``tp=None`` means) makes every
collective a no-op, so the single-rank model runs exactly the ops it ran before TP existed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.distributed.symmetric import SymmetricAllReduce


@dataclass(frozen=True)
class TPGroup:
    """One rank's view of its tensor-parallel group. ``group`` None with ``world_size > 1`` means
    torch's default (world) group."""

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None
    # Pre-registered buffers for all-reduces inside CUDA graphs (``with_symmetric_memory``).
    symmetric: SymmetricAllReduce | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"tp_size: must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"tp_rank: must be in [0, {self.world_size}), got {self.rank}")

    def all_reduce(self, x: torch.Tensor, channel: int = 0) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``. Through symmetric memory when ``x``
        fits its buffers, else NCCL/gloo. ``channel``: which symmetric buffer, so that two
        micro-batches reducing concurrently (two-batch overlap) do not share one."""
        if self.world_size == 1:
            return x
        if self.symmetric is not None and self.symmetric.fits(x):
            return self.symmetric.all_reduce(x, channel)
        dist.all_reduce(x, group=self.group)
        return x

    def with_symmetric_memory(self, max_bytes: int, dtype: torch.dtype, device: torch.device) -> TPGroup:
        """This group with symmetric-memory all-reduce buffers of ``max_bytes`` for ``dtype``, or
        itself where that cannot work (one rank, CPU, no ops; logged). Collective: every rank calls
        it with the same arguments, before any graph capture."""
        group = self.group if self.group is not None else dist.group.WORLD
        if self.world_size == 1 or group is None:
            return self
        symmetric = SymmetricAllReduce.create(group, self.world_size, max_bytes, dtype, device)
        return self if symmetric is None else dataclasses.replace(self, symmetric=symmetric)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order (a new tensor; ``x`` itself
        when there is one rank)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's ``x`` (same shape on all), in rank order, on rank 0; None on the others.
        Only the first rank needs them (the KV export of a request), so no rank holds N copies."""
        if self.world_size == 1:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(x.contiguous(), parts, group=self.group, group_dst=0)
        return parts

    def scatter_from_first(self, parts: list[torch.Tensor] | None, out: torch.Tensor) -> torch.Tensor:
        """Rank r receives rank 0's ``parts[r]`` into ``out`` (``parts``: rank 0 only, each shaped
        like ``out``); returns ``out``."""
        if self.world_size == 1:
            assert parts is not None, "one rank scatters to itself"
            return out.copy_(parts[0])
        assert (parts is not None) == (self.rank == 0), "rank 0 and only rank 0 has the parts"
        parts = [p.contiguous() for p in parts] if parts is not None else None
        dist.scatter(out, parts, group=self.group, group_src=0)
        return out

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` over the ranks (every rank calls it; ``device``: this rank's)."""
        if self.world_size == 1:
            return value
        x = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.group)
        return int(x.item())


def init_tp(
    rank: int,
    world_size: int,
    init_method: str,
    backend: str | None = None,
    device: torch.device | str = "cpu",
    timeout_s: float = 300.0,
) -> TPGroup:
    """Join a ``world_size``-rank group as ``rank``; every rank calls this with the same
    ``init_method`` (``tcp://host:port`` or ``file:///path``). ``backend`` None: gloo for a CPU
    ``device``, NCCL for CUDA, where each rank names its own GPU (e.g. ``cuda:{rank}`` on one host)
    and this makes it the current device. A collective that waits longer than ``timeout_s`` fails
    instead of hanging."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # NCCL binds to one GPU: name it
        device = torch.device("cuda", torch.cuda.current_device())
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        # NCCL: bind the communicator to this rank's GPU now, so a bad setup fails here.
        device_id=device if backend == "nccl" else None,
    )
    return TPGroup(rank, world_size, dist.group.WORLD)


def destroy_tp() -> None:
    """Leave the process group ``init_tp`` joined (at shutdown). Collective: every rank calls it,
    and none tears its connections down while another still uses them."""
    if dist.is_initialized():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # no collective of ours still queued on the GPU
        dist.barrier()
        dist.destroy_process_group()
