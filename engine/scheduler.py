"""Continuous-batching scheduler (torch-free): which sequences run in the next step.

Policy, in order (prefill first, the default):
1. EXTEND if any sequence has prompt work: first the chunks of sequences already prefilling, then
   newly admitted ones (FIFO), under a per-step token budget (``max_num_batched_tokens``, which is
   also the chunked-prefill chunk size). Admission reuses the longest cached prefix and needs enough
   free (or evictable) pages for the whole remaining prompt, so admitted prompts rarely stall.
2. Otherwise DECODE every running sequence, one token each. A sequence that needs a new page and
   finds none preempts the most recently admitted running sequence (its computed pages go to the
   prefix cache, so recomputing it later is mostly a cache hit).

``mixed=True`` (vLLM's chunked-prefill scheduling): every step first takes one token of every
decoding sequence, then fills the rest of the budget with prompt chunks as in 1. Running requests
keep producing tokens while prompts arrive (prefill first stalls them for whole prefills: the
TPOT spikes of a colocated server), at the price of running decode rows through the extend path
whenever prompts are being prefilled; a step with no prompt work is a plain DECODE step.
Pages are allocated for exactly the tokens a step computes; ``release`` gives them back (to the
prefix cache first) when a sequence finishes or is aborted. ``commit`` records a launched step
before its sampled tokens are known (overlap scheduling, see ``engine.sequence``), so a sequence
whose in-flight token is its last (``max_tokens``, context) is not scheduled again.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from engine.kvcache.allocator import PageAllocator
from engine.kvcache.radix_cache import RadixCache
from engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledBatch:
    """One step's work: ``extend_lens[i]`` new tokens of ``seqs[i]``; ``is_decode`` if all are 1."""

    seqs: list[Sequence]
    extend_lens: list[int]
    is_decode: bool

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        page_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefix_cache: RadixCache | None,
        mixed: bool = False,
    ) -> None:
        self.allocator = allocator
        self.mixed = mixed
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []

    # -- queue -----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Adopt a sequence whose prompt KV is already in its pages (filled by a prefill instance):
        it joins the decode batch directly. Its pages must come from this scheduler's allocator."""
        assert seq.status is SeqStatus.WAITING and seq.num_pending == 1, "expects prompt KV + one new token"
        assert len(seq.pages) == self._pages_for(seq.num_computed), "pages must cover the computed KV"
        seq.status = SeqStatus.DECODING
        seq.admitted_ns = seq.admitted_ns or time.time_ns()
        self.decoding.append(seq)

    @property
    def num_running(self) -> int:
        return self._num_admitted()

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.decoding)

    def has_work(self) -> bool:
        return self.num_unfinished > 0

    def capacity_tokens(self) -> int:
        """The most tokens one sequence can ever hold: the whole pool."""
        return self.allocator.num_total * self.page_size

    # -- the step ----------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        if self.mixed:
            return self._schedule_mixed()
        batch = self._schedule_extend(self.max_num_batched_tokens)
        if batch is None:
            batch = self._schedule_decode()
        return batch

    def _schedule_mixed(self) -> ScheduledBatch | None:
        decode = self._schedule_decode()
        used = 0 if decode is None else decode.num_tokens
        extend = (
            self._schedule_extend(self.max_num_batched_tokens - used)
            if used < self.max_num_batched_tokens
            else None
        )
        if extend is None:
            return decode
        if decode is None:
            return extend
        return ScheduledBatch(
            decode.seqs + extend.seqs, decode.extend_lens + extend.extend_lens, is_decode=False
        )

    def _schedule_extend(self, budget: int) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        lens: list[int] = []
        blocked = False
        for seq in self.prefilling:
            if budget == 0:
                break
            n = min(seq.num_pending, budget)
            if not self._grow(seq, seq.num_computed + n):
                blocked = True  # admitting newer requests now would take the pages it waits for
                break
            seqs.append(seq)
            lens.append(n)
            budget -= n
        # A decode step runs every admitted sequence, so admission also keeps that within the budget.
        max_admitted = min(self.max_num_seqs, self.max_num_batched_tokens)
        while self.waiting and not blocked and budget > 0 and self._num_admitted() < max_admitted:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            n = min(seq.num_pending, budget)
            ok = self._grow(seq, seq.num_computed + n)
            assert ok, "admission checked that the pages exist"
            seqs.append(seq)
            lens.append(n)
            budget -= n
        if not seqs:
            if self.prefilling and not self.decoding:
                # Prefilling sequences hold every page and none can grow: preempt the newest so
                # the older ones can finish.
                self._preempt(self.prefilling[-1])
            return None
        return ScheduledBatch(seqs, lens, is_decode=False)

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled: list[Sequence] = []
        for seq in list(self.decoding):
            if seq.status is not SeqStatus.DECODING:
                continue  # preempted below while making room
            if seq.num_tokens + seq.num_inflight >= seq.max_len:
                continue  # the token on its way is its last (overlap scheduling): it ends on arrival
            while not self._grow(seq, seq.num_computed + 1):
                victim = self.decoding[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.DECODING:
                scheduled.append(seq)
        if not scheduled:
            return None
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_decode=True)

    def commit(self, batch: ScheduledBatch) -> list[tuple[int, Sequence]]:
        """Account for a launched forward of ``batch`` (before its tokens are read back): advance
        ``num_computed``, move finished prompts to decoding. Returns ``(row, seq)`` for each sequence
        whose next token this step samples; its value arrives later (``Sequence.num_inflight``)."""
        sampling = []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.extend_lens, strict=True)):
            seq.num_computed += n
            if seq.num_pending > 0:
                continue  # an intermediate prefill chunk: its logits are not a prediction
            seq.num_inflight += 1
            seq.inflight_row = row
            sampling.append((row, seq))
            if seq.status is SeqStatus.PREFILLING:
                self.prefilling.remove(seq)
                self.decoding.append(seq)
                seq.status = SeqStatus.DECODING
                self._cache_computed(seq)
        return sampling

    def release(self, seq: Sequence, reason: str) -> None:
        """Finish ``seq`` (stop, length, abort): its pages go to the prefix cache or the free list."""
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.PREFILLING:
            self.prefilling.remove(seq)
        elif seq.status is SeqStatus.DECODING:
            self.decoding.remove(seq)
        self._drop_pages(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    # -- pages -------------------------------------------------------------------------------------
    def _num_admitted(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def _admit(self, seq: Sequence) -> bool:
        if seq.num_inflight:
            return False  # preempted with its token in flight: admitted once the token is back
        if self.prefix_cache is not None:
            # Leave at least one token to compute: its logits predict the next token.
            match = self.prefix_cache.match_prefix(seq.token_ids[:-1])
            seq.pages, seq.num_computed = list(match.pages), match.num_tokens
        need = self._pages_for(seq.num_tokens) - len(seq.pages)
        if need > self.allocator.num_free + self._num_evictable():
            self._drop_pages(seq)
            return False
        if not seq.preempted:
            # Usage reports the hit of the first admission, not that of a recompute after preemption.
            seq.num_cached_prompt = min(seq.num_computed, seq.num_prompt)
            seq.admitted_ns = time.time_ns()
        seq.status = SeqStatus.PREFILLING
        self.prefilling.append(seq)
        return True

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = self._pages_for(num_tokens) - len(seq.pages)
        if need <= 0:
            return True
        pages = self.take_pages(need)
        if pages is None:
            return False
        seq.pages.extend(pages)
        return True

    def take_pages(self, num_pages: int) -> list[int] | None:
        """``num_pages`` free pages, evicting cached prefixes if needed; None if there are not enough."""
        if self.allocator.num_free < num_pages and self.prefix_cache is not None:
            self.prefix_cache.evict(num_pages - self.allocator.num_free)
        return self.allocator.alloc(num_pages)

    def _preempt(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.PREFILLING:
            self.prefilling.remove(seq)
        else:
            self.decoding.remove(seq)
        self._drop_pages(seq)
        seq.status = SeqStatus.WAITING
        seq.preempted = True
        self.waiting.appendleft(seq)

    def _drop_pages(self, seq: Sequence) -> None:
        self._cache_computed(seq)
        self.allocator.free(seq.pages)
        seq.pages, seq.num_computed = [], 0

    def _cache_computed(self, seq: Sequence) -> None:
        if self.prefix_cache is None:
            return
        num_full = seq.num_computed // self.page_size
        if num_full:
            self.prefix_cache.insert(seq.token_ids[: num_full * self.page_size], seq.pages[:num_full])

    def _num_evictable(self) -> int:
        return self.prefix_cache.num_evictable_pages() if self.prefix_cache is not None else 0

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)
