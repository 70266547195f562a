"""Penalties, logit biases and ``min_tokens`` as batched tensor ops over a step's rows.

``LogitAdjustments.build`` runs only for a step where some row asked for one of them (the sampler's
fast path does not change otherwise). It scatters what the host knows — each row's output tokens
so far, and for repetition_penalty its prompt — into dense ``[batch, vocab]`` tensors on the
device with ``scatter_add_``; a token the host does not have yet (overlap scheduling: the previous
step's sample, still on the device) is read from ``last_tokens`` by its row, on the device. Nothing
is read back, so the step stays free of host syncs. The cost is one scatter of the rows' history
per step: O(tokens so far) host work for the rows that asked, none for the others.

``apply`` follows ``SamplingParams``'s order: repetition (HF's ``RepetitionPenaltyLogitsProcessor``
over prompt and output), frequency and presence (OpenAI, over the output), then the additive bias
(``logit_bias``, and ``-inf`` on EOS / ``stop_token_ids`` while under ``min_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence as Seq


@dataclass(frozen=True)
class RowHistory:
    """What one row's adjustments read: its tokens on the host and the one still on the device.

    ``output_ids``: generated tokens the host knows; ``num_generated``: those plus the ones in
    flight; ``inflight_row``: the row of ``last_tokens`` holding the newest generated token when
    the host does not have it yet (-1 when it has every token)."""

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    num_generated: int
    inflight_row: int = -1


@dataclass
class LogitAdjustments:
    """The step's adjustments on the logits' device; a tensor is None when no row needs it."""

    seen: Tensor | None  # [batch, vocab] bool, in the prompt or output (repetition rows only)
    repetition: Tensor | None  # [batch] float32, 1.0 where off
    counts: Tensor | None  # [batch, vocab] float32, occurrences in the output so far
    frequency: Tensor | None  # [batch] float32
    presence: Tensor | None  # [batch] float32
    bias: Tensor | None  # [batch, vocab] float32, added last

    @staticmethod
    def needed(params: Sequence[SamplingParams]) -> bool:
        return any(p.has_penalties or p.has_bias for p in params)

    @classmethod
    def of_batch(
        cls,
        seqs: Sequence[Seq],
        eos_token_ids: frozenset[int],
        vocab_size: int,
        device: torch.device | str,
        last_tokens: Tensor,
    ) -> LogitAdjustments:
        """A scheduled step's adjustments (``ModelRunner.sample_async``, before the step's samples
        overwrite ``last_tokens``): a sequence's newest token may still be in ``last_tokens``,
        sampled by the previous step and not read back; with one step in flight, at most one."""
        assert all(seq.num_inflight <= 1 for seq in seqs), "one step in flight at most"
        rows = [
            RowHistory(seq.prompt_ids, seq.output_ids, seq.num_output + seq.num_inflight,
                       seq.inflight_row if seq.num_inflight else -1)
            for seq in seqs
        ]  # fmt: skip
        return cls.build([seq.params for seq in seqs], rows, eos_token_ids, vocab_size, device, last_tokens)

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        rows: Sequence[RowHistory],
        eos_token_ids: frozenset[int],
        vocab_size: int,
        device: torch.device | str,
        last_tokens: Tensor | None = None,
    ) -> LogitAdjustments:
        """``last_tokens`` [>= max inflight_row + 1] int64 on ``device``: the previous step's samples,
        needed when some row has ``inflight_row`` >= 0."""
        assert len(params) == len(rows), "one history per row"
        device, batch = torch.device(device), len(params)
        any_rep = any(p.repetition_penalty != 1.0 for p in params)
        any_counts = any(p.has_penalties for p in params)
        counts = seen = repetition = frequency = presence = bias = None
        if any_counts:
            penalized = [i for i, p in enumerate(params) if p.has_penalties]
            counts = _count(batch, vocab_size, device, penalized, [rows[i].output_ids for i in penalized])
            inflight = [i for i in penalized if rows[i].inflight_row >= 0]
            if inflight:
                assert last_tokens is not None, "a row's newest token is on the device"
                rows_and_src = np.array([(i, rows[i].inflight_row) for i in inflight], dtype=np.int64).T
                idx = _upload(rows_and_src.copy(), device)  # [2, n]: row, its row in last_tokens
                flat = idx[0] * vocab_size + last_tokens.index_select(0, idx[1])  # [n]
                counts.view(-1).scatter_add_(0, flat, torch.ones(len(inflight), device=device))
            scalars = torch.tensor(
                [[p.frequency_penalty for p in params], [p.presence_penalty for p in params],
                 [p.repetition_penalty for p in params]], dtype=torch.float32,
            )  # fmt: skip  # [3, batch]
            frequency, presence, repetition = _upload(scalars, device)
            if any_rep:
                rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
                in_prompt = _count(
                    batch, vocab_size, device, rep_rows, [rows[i].prompt_ids for i in rep_rows]
                )
                seen = (in_prompt > 0) | (counts > 0)
            else:
                repetition = None
        if any(p.has_bias for p in params):
            bias = _bias(params, rows, eos_token_ids, vocab_size, device)
        return cls(seen, repetition, counts, frequency, presence, bias)

    def apply(self, logits: Tensor) -> Tensor:
        """The adjusted logits [batch, vocab] float32 (a new tensor; ``logits`` is not written)."""
        if self.seen is not None and self.repetition is not None:
            rep = self.repetition[:, None]  # [batch, 1]
            logits = torch.where(self.seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        if self.counts is not None and self.frequency is not None and self.presence is not None:
            logits = logits - self.frequency[:, None] * self.counts
            logits = logits - self.presence[:, None] * (self.counts > 0).float()
        if self.bias is not None:
            logits = logits + self.bias
        return logits


def _count(
    batch: int, vocab_size: int, device: torch.device, rows: list[int], tokens: list[Sequence[int]]
) -> Tensor:
    """[batch, vocab] float32: how often each token occurs in ``tokens[k]``, in row ``rows[k]``."""
    counts = torch.zeros(batch, vocab_size, dtype=torch.float32, device=device)
    lengths = [len(t) for t in tokens]
    if sum(lengths):
        row_ids = np.repeat(np.array(rows, dtype=np.int64), lengths)
        token_ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in tokens])
        flat = _upload(row_ids * vocab_size + token_ids, device)  # [total]
        counts.view(-1).scatter_add_(0, flat, torch.ones(flat.shape[0], device=device))
    return counts


def _bias(
    params: Sequence[SamplingParams],
    rows: Sequence[RowHistory],
    eos_token_ids: frozenset[int],
    vocab_size: int,
    device: torch.device,
) -> Tensor:
    """[batch, vocab] float32: logit_bias, and -inf on the tokens that would end a row under min_tokens."""
    entries: list[tuple[int, int, float]] = []
    for i, (p, row) in enumerate(zip(params, rows, strict=True)):
        entries += [(i, t, b) for t, b in p.logit_bias]
        if row.num_generated < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_token_ids)
            entries += [(i, t, float("-inf")) for t in stops if t < vocab_size]
    bias = torch.zeros(len(params), vocab_size, dtype=torch.float32, device=device)
    if entries:
        assert all(t < vocab_size for _, t, _ in entries), "logit_bias ids are checked against the vocab"
        flat = _upload(np.array([i * vocab_size + t for i, t, _ in entries], dtype=np.int64), device)
        values = _upload(np.array([b for _, _, b in entries], dtype=np.float32), device)
        bias.view(-1).scatter_add_(0, flat, values)
    return bias


def _upload(data: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """Host → ``device`` without waiting (from pinned memory on CUDA)."""
    cpu = torch.from_numpy(data) if isinstance(data, np.ndarray) else data
    if device.type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)
