"""Two-batch overlap (TBO) for tensor-parallel decode: hide one micro-batch's all-reduces under the
other's compute.

Under TP every layer all-reduces twice (after ``o_proj`` and after ``down_proj``, the partial sums
of row-parallel layers); at large decode batches those collectives are a large share of the step
(docs/BENCHMARKS.md). TBO splits the batch's rows into two micro-batches, A and B, and runs each
one's layer stages (``engine.layers.stages``: compute, then a partial sum to reduce) on its own
stream, ordered so that compute alternates and communication overlaps it::

    stream A:  C0 ─ M0 ─────── C1 ─ M1 ─────── C2 ...
    stream B:        C0 ─ M0 ─────── C1 ─ M1 ─── ...      (Bk waits for Ak's compute, A(k+1) for Bk's)

Each micro-batch reduces through its own symmetric-memory channel (``TPGroup.all_reduce``), so the
two collectives in flight never share a buffer; with NCCL both go through the group's one
communicator, which serializes them in issue order (the same on every rank). Costs: every weight
is read twice per step (once per micro-batch) and each GEMM sees half the rows, so TBO pays only
where the hidden communication outweighs that; ``EngineConfig.tbo_min_batch`` is the threshold
below which it is off (off by default until ``bench/tp_check.py`` measures it on two GPUs).

The split is a function of the padded (captured) batch size only (``tbo_split``), so a graph's
capture and every replay of it cut the rows at the same place; the embedding before the split and
the LM head after it run on the whole batch. On the CPU (tests, gloo) there are no streams: the
same driver runs the stages in the same interleaved order, which is what makes the collectives'
order identical on every rank and the result checkable against a plain forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from engine.attention.base import ForwardBatch
from engine.layers.stages import Stages


def tbo_split(batch_size: int) -> int:
    """Rows ``[0, split)`` form micro-batch A, the rest B: an even cut (captured sizes are even
    beyond 1; an odd size gives A the smaller half)."""
    assert batch_size >= 2, "two micro-batches need two rows"
    return batch_size // 2


def split_batch(batch: ForwardBatch, split: int) -> tuple[ForwardBatch, ForwardBatch]:
    """Rows ``[0, split)`` and ``[split, n)`` of a DECODE batch (one token per row) as two batches
    over the same pool; their attention metadata is left for the backend to prepare."""
    assert batch.num_tokens == batch.batch_size, "only decode batches (one token per row) are split"

    def rows(lo: int, hi: int) -> ForwardBatch:
        return dataclasses.replace(
            batch,
            input_ids=batch.input_ids[lo:hi],
            positions=batch.positions[lo:hi],
            out_cache_loc=batch.out_cache_loc[lo:hi],
            page_table=batch.page_table[lo:hi],
            seq_lens=batch.seq_lens[lo:hi],
            logits_indices=batch.logits_indices[: hi - lo],  # [0, hi - lo): row i is token i
            seq_lens_cpu=batch.seq_lens_cpu[lo:hi],
            extend_lens_cpu=batch.extend_lens_cpu[lo:hi],
            attn_metadata=None,
        )

    return rows(0, split), rows(split, batch.batch_size)


def run_overlapped(
    stages: tuple[Stages[torch.Tensor], Stages[torch.Tensor]],
    reduce: Callable[[torch.Tensor, int], torch.Tensor],
    side_stream: torch.cuda.Stream | None,
) -> list[torch.Tensor]:
    """Drive two micro-batches' stages interleaved (module docstring); ``reduce(x, channel)`` sums
    micro-batch ``channel``'s partials. A runs on the current stream, B on ``side_stream`` (None: no
    streams, CPU). Both must have the same number of stages. Returns both results, A's first."""
    streams = (torch.cuda.current_stream(), side_stream) if side_stream is not None else None
    pending: list[torch.Tensor | None] = [None, None]
    results: list[torch.Tensor | None] = [None, None]
    computed: list[torch.cuda.Event | None] = [None, None]  # after each one's latest compute stage

    def on(i: int) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(streams[i]) if streams is not None else contextlib.nullcontext()

    def advance(i: int, value: torch.Tensor | None) -> None:
        with on(i):
            try:
                pending[i] = stages[i].send(value)  # type: ignore[arg-type]
            except StopIteration as done:
                pending[i], results[i] = None, done.value
            if streams is not None:
                computed[i] = torch.cuda.Event()
                computed[i].record()  # type: ignore[union-attr]

    def after_other(i: int) -> None:
        if streams is not None:
            streams[i].wait_event(computed[1 - i])  # type: ignore[arg-type]

    if streams is not None:
        streams[1].wait_stream(streams[0])  # fork: B's inputs come from the current stream
    advance(0, None)
    after_other(1)
    advance(1, None)
    while pending[0] is not None or pending[1] is not None:
        for i in (0, 1):
            partial = pending[i]
            if partial is None:
                continue
            with on(i):
                summed = reduce(partial, i)  # overlaps the other micro-batch's compute
            after_other(i)
            advance(i, summed)
    if streams is not None:
        streams[0].wait_stream(streams[1])  # join
    assert results[0] is not None and results[1] is not None, "a micro-batch did not finish"
    return [results[0], results[1]]
