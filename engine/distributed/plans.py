"""Step plans for the worker ranks, sent as deltas against a mirror each worker keeps (torch-free).

Rank 0 owns the scheduler; a worker rank only has to rebuild, every step, the sequences the step
reads (``ModelRunner.prepare`` / ``sample_async``: lengths, ``num_computed``, the window's host-known
tokens, pages, in-flight counts, params, seed). Sending all of that whole each step costs rank 0
~17 ms and each worker ~19 ms at 256 sequences × 64 pages (pickling every page list and
rebuilding every token list), more than a TP decode step. So each worker keeps a mirror of the
sequences it has seen, and rank 0's ``PlanEncoder`` keeps what it sent:

- a sequence the worker does not mirror — new (or a new request reusing a finished one's id),
  dropped from the mirror, or re-admitted after preemption with other pages (its mirrored pages are
  no longer a prefix of its pages) — travels whole once (``NewSeq``: prompt length, params, seed, every page);
- every sequence in the step then travels as a ``SeqStep``: its counts, the window's known tokens
  and only the pages appended since the last plan;
- a mirrored sequence left out of ``idle_steps`` consecutive plans is dropped on both sides (named
  in ``StepPlan.drop``): finished requests leave the mirrors without rank 0 telling the plan
  encoder about them.

Plans are applied in order on every worker (one pipe each), so encoder and mirrors stay in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

IDLE_STEPS = 256  # a mirror entry unused this many plans in a row is dropped


class NewSeq(NamedTuple):
    request_id: str
    num_prompt: int
    params: SamplingParams
    seed: int
    pages: list[int]


class SeqStep(NamedTuple):
    """One sequence in one step; ``known_ids`` = ``token_ids[num_computed : num_computed + n]`` as
    far as the host knows them (an in-flight last token is missing)."""

    request_id: str
    num_tokens: int
    num_computed: int
    known_ids: list[int]
    new_pages: list[int]
    num_inflight: int
    inflight_row: int


@dataclass(frozen=True)
class StepPlan:
    """One launched step as a worker needs it: new mirror entries, then the rows in batch order."""

    new: list[NewSeq]
    rows: list[SeqStep]
    extend_lens: list[int]
    is_decode: bool
    drop: list[str] = field(default_factory=list)


@dataclass
class _Sent:
    seq: Sequence  # the object mirrored: a new request reusing a finished one's id is another
    pages: list[int]  # the pages the worker's mirror holds for the sequence
    last_plan: int


class PlanEncoder:
    """Rank 0's side: ``encode(batch)`` → the ``StepPlan`` every worker applies."""

    def __init__(self, idle_steps: int = IDLE_STEPS) -> None:
        self.idle_steps = idle_steps
        self._sent: dict[str, _Sent] = {}
        self._num_plans = 0

    def encode(self, batch: ScheduledBatch) -> StepPlan:
        self._num_plans += 1
        now = self._num_plans
        new: list[NewSeq] = []
        rows: list[SeqStep] = []
        for seq, n in zip(batch.seqs, batch.extend_lens, strict=True):
            sent = self._sent.get(seq.request_id)
            if sent is None or sent.seq is not seq or seq.pages[: len(sent.pages)] != sent.pages:
                new.append(NewSeq(seq.request_id, seq.num_prompt, seq.params, seq.seed, list(seq.pages)))
                sent = self._sent[seq.request_id] = _Sent(seq, list(seq.pages), now)
                new_pages: list[int] = []
            else:
                new_pages = seq.pages[len(sent.pages) :]
                sent.pages.extend(new_pages)
                sent.last_plan = now
            start = seq.num_computed
            rows.append(SeqStep(seq.request_id, seq.num_tokens, start, seq.token_ids[start : start + n],
                                new_pages, seq.num_inflight, seq.inflight_row))  # fmt: skip
        drop = [rid for rid, s in self._sent.items() if now - s.last_plan >= self.idle_steps]
        for rid in drop:
            del self._sent[rid]
        return StepPlan(new, rows, list(batch.extend_lens), batch.is_decode, drop)

    @property
    def num_mirrored(self) -> int:
        return len(self._sent)


class PlanDecoder:
    """A worker's side: ``decode(plan)`` → the step's batch, built on the mirror."""

    def __init__(self) -> None:
        self.mirror: dict[str, Sequence] = {}

    def decode(self, plan: StepPlan) -> ScheduledBatch:
        for rid, num_prompt, params, seed, pages in plan.new:
            seq = Sequence(rid, [0] * num_prompt, params, seed, max_len=0)
            seq.pages = list(pages)
            self.mirror[rid] = seq
        seqs = []
        for rid, num_tokens, start, known, new_pages, num_inflight, inflight_row in plan.rows:
            seq = self.mirror[rid]
            seq.pages.extend(new_pages)
            tokens = seq.token_ids
            if len(tokens) < num_tokens:
                tokens.extend([0] * (num_tokens - len(tokens)))
            assert len(tokens) == num_tokens, f"{rid}: the mirror holds more tokens than rank 0"
            tokens[start : start + len(known)] = known
            seq.num_computed, seq.num_inflight, seq.inflight_row = start, num_inflight, inflight_row
            seqs.append(seq)
        for rid in plan.drop:
            del self.mirror[rid]
        return ScheduledBatch(seqs, plan.extend_lens, plan.is_decode)
