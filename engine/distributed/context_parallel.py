"""Context-parallel prefill: a long EXTEND step split over ``cp`` ranks, each holding the whole
model, KV pool and prefix state.

Every rank runs every step (the workers of ``engine.distributed.workers``, as for tensor
parallelism). A step that qualifies (``zigzag.should_split``: every rank gets at least
``EngineConfig.cp_min_tokens`` new tokens) runs split:

1. ``prepare`` builds the whole step's inputs as one rank would, then ``split_forward_batch`` keeps
   this rank's zigzag rows (``zigzag.ZigzagPlan``) and describes its chunks to the attention backend
   as sequences of their own (``attention.base``): positions stay absolute, so rotary is unchanged.
2. The token-local work of every layer (norms, projections, rotary, MLP; on CUDA the piecewise
   graphs, which see the local token count) runs on the local rows only. Before attention,
   ``ContextParallelAttention`` all-gathers every rank's new K/V (``CPGroup.all_gather_kv``, one
   collective per layer into a buffer sized at start-up) and writes it into this rank's pool; the
   un-permutation is folded into that store (gathered row j goes to slot ``gather_slots[j]``). So
   every rank's pool holds the step's whole KV, and attention is local: each chunk's queries attend
   causally over their sequence's keys in the pool, by absolute position.
3. Rank 0 holds every sequence's last token, so only its logits are real (the others compute none);
   it samples, and ``CPGroup.broadcast_tokens`` hands the sampled ids to every rank, which keeps
   ``last_tokens`` (the next step's in-flight inputs) identical everywhere. Every step broadcasts,
   split or not: ranks need not produce bit-identical logits (thread counts, kernels) to agree.

Steps that do not split (decode, short extends) run whole on every rank with no K/V exchange, so
the pools stay the same on every rank and rank 0's allocator and prefix cache stand for all of them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from engine.attention.base import AttentionBackend, CPExchange, ForwardBatch, ForwardMode
from engine.distributed.groups import TPGroup
from engine.distributed.zigzag import ZigzagPlan

log = logging.getLogger(__name__)
# A symmetric-memory barrier runs outside NCCL's watchdog: a peer that died would leave it spinning.
# With a timeout the kernel traps instead (a CUDA error: the rank fails, the engine reports it).
BARRIER_TIMEOUT_MS = 300_000

# torch >= 2.13 renames all_gather_into_tensor (and deprecates the old name); the GPU image has 2.11.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CPGroup:
    """One rank's view of its context-parallel group and the two collectives CP needs. ``group``
    None with ``world_size > 1`` is torch's default group; one rank needs no group at all (every
    collective a no-op). The gather buffers are allocated once, by ``reserve``."""

    def __init__(self, rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"cp: must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"cp_rank: must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size, self.group = rank, world_size, group
        self.max_rows = 0
        self._send: torch.Tensor | None = None  # [max_rows, 2, num_kv_heads, head_dim]
        self._recv: torch.Tensor | None = None  # [world_size * max_rows, 2, num_kv_heads, head_dim]
        self._symm: Any = None  # the receive buffer's symmetric-memory handle (CUDA), else None
        self._peers: list[torch.Tensor] = []  # every rank's receive buffer, mapped here (symmetric)

    @classmethod
    def of(cls, ranks: TPGroup) -> CPGroup:
        """The CP view of the engine's process group (``init_tp`` joins it for either kind)."""
        return cls(ranks.rank, ranks.world_size, ranks.group)

    def reserve(
        self,
        max_rows: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        symmetric: bool = False,
    ) -> None:
        """Allocate the all-gather buffers for up to ``max_rows`` rows a rank, once at start-up (a
        split step never allocates, so the gather can sit next to captured graphs). ``symmetric``
        (CUDA): the receive buffer is symmetric memory (``torch.distributed._symmetric_memory``
        ``empty`` + ``rendezvous``, collective), so each rank writes its rows straight into every
        peer's buffer over NVLink instead of going through NCCL; falls back to NCCL (logged) where
        the build has no symmetric memory."""
        if self.world_size == 1:
            return
        self.max_rows = max_rows
        shape = (self.world_size * max_rows, 2, num_kv_heads, head_dim)
        # Zeroed once: a rank's padding rows travel too and land on the dummy page 0, so they are
        # finite (zeros, later stale K/V) rather than whatever the allocator held.
        self._send = torch.zeros(max_rows, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
        self._recv = None
        if symmetric and device.type == "cuda":
            try:
                import torch.distributed._symmetric_memory as symm_mem
            except ImportError:
                log.info("cp: no symmetric memory in this torch build; K/V all-gather through NCCL")
            else:
                group = self.group if self.group is not None else dist.group.WORLD
                assert group is not None, "the default process group exists"
                self._recv = symm_mem.empty(shape, dtype=dtype, device=device).zero_()
                self._symm = symm_mem.rendezvous(self._recv, group)
                self._peers = [self._symm.get_buffer(r, shape, dtype) for r in range(self.world_size)]
                log.info("cp: K/V all-gather through symmetric memory (%.1f MiB)", self._recv.nbytes / 2**20)
        if self._recv is None:
            self._recv = torch.zeros(shape, dtype=dtype, device=device)

    def all_gather_kv(self, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
        """Every rank's new K and V (``k``, ``v``: ``[n, num_kv_heads, head_dim]``, ``n <= rows``),
        each padded to ``rows`` rows, rank after rank: a view ``[world_size * rows, 2, num_kv_heads,
        head_dim]`` of the receive buffer, valid until the next call. Rows past a rank's ``n`` hold
        stale (finite) values."""
        assert self._send is not None and self._recv is not None, "reserve() the buffers first"
        n = k.shape[0]
        assert n <= rows <= self.max_rows, f"{n} rows of {rows} (buffers hold {self.max_rows})"
        out = self._recv[: self.world_size * rows]  # [world_size * rows, 2, num_kv_heads, head_dim]
        if self._symm is not None:
            # Barrier 1: every peer is done reading its buffer (the previous layer's gather), so it
            # may be overwritten; then this rank's rows go into its slot of every peer's buffer;
            # barrier 2: every rank's rows have landed everywhere.
            self._symm.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)
            for peer in self._peers:
                slot = peer[self.rank * rows : self.rank * rows + n]  # [n, 2, kv_heads, head_dim]
                slot[:, 0].copy_(k)
                slot[:, 1].copy_(v)
            self._symm.barrier(channel=1, timeout_ms=BARRIER_TIMEOUT_MS)
            return out
        send = self._send[:rows]  # [rows, 2, num_kv_heads, head_dim]
        send[:n, 0].copy_(k)
        send[:n, 1].copy_(v)
        _all_gather_single(out, send, group=self.group)
        return out

    def broadcast_tokens(self, tokens: torch.Tensor) -> None:
        """Overwrite ``tokens`` (a contiguous int64 tensor) on every rank with rank 0's."""
        if self.world_size > 1:
            group = self.group if self.group is not None else dist.group.WORLD
            assert group is not None, "the default process group exists"
            dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=self.group)

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` over the ranks (every rank calls it)."""
        return TPGroup(self.rank, self.world_size, self.group).min_int(value, device)


class ContextParallelAttention(AttentionBackend):
    """Wraps the configured backend: on a split step (``batch.cp``) it first gathers every rank's
    new K/V into the pool, then lets the backend attend the local queries; other steps pass through
    untouched (decode graphs included)."""

    def __init__(self, inner: AttentionBackend, group: CPGroup) -> None:
        self.inner, self.group = inner, group
        self.supports_graphs = inner.supports_graphs

    def prepare(self, batch: ForwardBatch) -> None:
        self.inner.prepare(batch)

    def prepare_graph(self, batch: ForwardBatch, max_seq_len: int) -> None:
        self.inner.prepare_graph(batch, max_seq_len)

    def warm_up(
        self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, max_tokens: int,
        device: torch.device,
    ) -> int:  # fmt: skip
        return self.inner.warm_up(num_heads, num_kv_heads, head_dim, dtype, max_tokens, device)

    def forward(
        self, layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        # q [local_tokens, num_heads, head_dim]; k, v [local_tokens, num_kv_heads, head_dim]
        exchange = batch.cp
        if exchange is not None:
            kv = self.group.all_gather_kv(k, v, exchange.rows_per_rank)  # [cp * rows, 2, kv_heads, head_dim]
            k_cache, v_cache = batch.kv_pool.slot_views(layer.layer_id)
            k_cache.index_copy_(0, exchange.gather_slots, kv[:, 0])
            v_cache.index_copy_(0, exchange.gather_slots, kv[:, 1])
        return self.inner.forward(layer, q, k, v, batch)


def split_forward_batch(fb: ForwardBatch, plan: ZigzagPlan, rank: int) -> ForwardBatch:
    """This rank's share of the whole step ``fb`` (module docstring); index tensors go to the device
    without a sync, and nothing is read back."""
    assert fb.mode is ForwardMode.EXTEND, "only EXTEND steps split"
    device = fb.input_ids.device
    rows = _to(list(plan.rank_rows[rank]), device)  # [local_tokens] step rows
    chunks = plan.rank_chunks[rank]
    gather_rows = _to(plan.gather_rows(), device)  # [cp * rows_per_rank] step row, -1: padding
    gather_slots = torch.where(gather_rows >= 0, fb.out_cache_loc[gather_rows.clamp(min=0)], 0)
    seq_lens = [c.end for c in chunks]
    return ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=fb.input_ids[rows],
        positions=fb.positions[rows],
        out_cache_loc=fb.out_cache_loc[rows],
        page_table=fb.page_table[_to([c.seq for c in chunks], device)],  # [num_chunks, max_pages]
        seq_lens=_to(seq_lens, device),
        logits_indices=_to(plan.local_last_rows(rank), device),
        seq_lens_cpu=seq_lens,
        extend_lens_cpu=[c.num_tokens for c in chunks],
        kv_pool=fb.kv_pool,
        attn_backend=fb.attn_backend,
        cp=CPExchange(plan.rows_per_rank, gather_slots),
    )


def _to(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
