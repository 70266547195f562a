"""The zigzag split of an EXTEND step over context-parallel ranks (torch-free, so it is tested exactly).

Each sequence's new tokens (positions ``start .. start + n``) are cut into ``2·cp`` chunks at the
bounds ``floor(j · n / 2cp)``, so chunk sizes differ by at most one; rank r takes chunks ``r`` and
``2cp-1-r``. A token's attention work grows with its position, so pairing an early chunk with a late
one gives every rank about the same work. The last chunk is never empty (its lower bound is below
``n`` for any ``n >= 1``) and belongs to rank 0: every sequence's last token, the one whose logits
are sampled, is on rank 0.

Uneven lengths are not padded here: chunks are as even as integer bounds allow, and a sequence
shorter than ``2·cp`` tokens just leaves some chunks empty. Only the all-gather pads, each rank's
rows up to ``rows_per_rank`` (``ZigzagPlan``); the padded rows go to the pool's dummy slot.

Rows: the step's new tokens packed sequence after sequence (the order ``ModelRunner.prepare`` builds
and ``cp == 1`` computes). A rank's *local* rows are its tokens in its own order: sequence after
sequence, and within one its chunk ``r`` before its chunk ``2cp-1-r``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


def chunk_bounds(n: int, cp: int) -> list[int]:
    """The ``2·cp + 1`` offsets (from 0 to ``n``) cutting ``n`` new tokens into ``2·cp`` chunks."""
    return [j * n // (2 * cp) for j in range(2 * cp + 1)]


def rank_chunk_ids(rank: int, cp: int) -> tuple[int, int]:
    """The two chunks rank ``rank`` computes (for ``cp == 1``: both, 0 then 1)."""
    assert 0 <= rank < cp, f"rank {rank} of {cp}"
    return rank, 2 * cp - 1 - rank


def rank_token_counts(extend_lens: list[int], cp: int) -> list[int]:
    """How many new tokens each rank computes; O(sequences · cp), for the split decision."""
    counts = [0] * cp
    for n in extend_lens:
        bounds = chunk_bounds(n, cp)
        for rank in range(cp):
            counts[rank] += sum(bounds[c + 1] - bounds[c] for c in rank_chunk_ids(rank, cp))
    return counts


def should_split(extend_lens: list[int], is_decode: bool, cp: int, min_tokens: int) -> bool:
    """The split rule: an EXTEND step is split when every rank gets at least ``min_tokens`` tokens
    (``EngineConfig.cp_min_tokens``). Below that a rank's share is too small for the saved compute
    to pay for one K/V all-gather per layer; decode steps (one token a sequence) never split."""
    return cp > 1 and not is_decode and min(rank_token_counts(extend_lens, cp)) >= min_tokens


@dataclass(frozen=True)
class Chunk:
    """A non-empty chunk of one sequence's new tokens: absolute positions ``start .. end``."""

    seq: int  # the sequence's index in the batch
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ZigzagPlan:
    """Who computes what in one split step (module docstring for rows and order)."""

    cp: int
    rank_rows: tuple[tuple[int, ...], ...]  # per rank: the step rows it computes, in local order
    rank_chunks: tuple[tuple[Chunk, ...], ...]  # per rank: its non-empty chunks, in local order
    last_rows: tuple[int, ...]  # the step row of each sequence's last new token

    @classmethod
    def build(cls, starts: list[int], extend_lens: list[int], cp: int) -> ZigzagPlan:
        """``starts[i]``: the absolute position of sequence i's first new token (its cached prefix
        length); ``extend_lens[i] >= 1``: its new tokens this step."""
        assert cp >= 1 and len(starts) == len(extend_lens), "one start per sequence"
        assert min(extend_lens) >= 1, "every sequence of a step brings a token"
        offsets = list(itertools.accumulate(extend_lens, initial=0))
        rank_rows, rank_chunks = [], []
        for rank in range(cp):
            rows: list[int] = []
            chunks: list[Chunk] = []
            for i, (start, n) in enumerate(zip(starts, extend_lens, strict=True)):
                bounds = chunk_bounds(n, cp)
                for c in rank_chunk_ids(rank, cp):
                    lo, hi = bounds[c], bounds[c + 1]
                    if hi > lo:
                        rows += range(offsets[i] + lo, offsets[i] + hi)
                        chunks.append(Chunk(i, start + lo, start + hi))
            rank_rows.append(tuple(rows))
            rank_chunks.append(tuple(chunks))
        return cls(cp, tuple(rank_rows), tuple(rank_chunks), tuple(o - 1 for o in offsets[1:]))

    @property
    def rows_per_rank(self) -> int:
        """Rows each rank sends in the all-gather: the largest share (the others pad up to it)."""
        return max(len(rows) for rows in self.rank_rows)

    def gather_rows(self) -> list[int]:
        """The step row each row of the all-gathered buffer holds (``cp * rows_per_rank`` entries,
        rank after rank; -1 for padding): the un-permutation of the gathered K/V."""
        width = self.rows_per_rank
        return [r for rows in self.rank_rows for r in [*rows, *[-1] * (width - len(rows))]]

    def local_last_rows(self, rank: int) -> list[int]:
        """The local row of each sequence's last token on ``rank``: all of them on rank 0, none
        elsewhere (the last chunk is rank 0's)."""
        if rank != 0:
            return []
        where = {row: i for i, row in enumerate(self.rank_rows[0])}
        return [where[row] for row in self.last_rows]
