"""The zigzag split of context-parallel prefill, exactly, against a brute-force reference.

The reference assigns every new token on its own: token ``t`` of ``n`` lies in chunk ``j`` when
``j·n // 2cp <= t < (j+1)·n // 2cp``, and chunk ``j`` belongs to rank ``min(j, 2cp-1-j)``. The plan
must give each rank exactly those tokens, once, in its local order (sequence after sequence, early
chunk first); the gathered rows must un-permute to the step's order; every last token must be on
rank 0; the shares must be balanced; the chunks must cover the local rows with absolute positions.
"""

from __future__ import annotations

import itertools
import random

import pytest

from engine.distributed.zigzag import ZigzagPlan, rank_token_counts, should_split


def reference_owner(t: int, n: int, cp: int) -> tuple[int, int]:
    """(rank, chunk) of new token ``t`` of ``n``, one token at a time."""
    chunk = max(j for j in range(2 * cp) if j * n // (2 * cp) <= t)
    return min(chunk, 2 * cp - 1 - chunk), chunk


def reference_rank_rows(extend_lens: list[int], cp: int) -> list[list[int]]:
    offsets = list(itertools.accumulate(extend_lens, initial=0))
    rows: list[list[tuple[int, int, int]]] = [[] for _ in range(cp)]  # (seq, chunk, row) per rank
    for i, n in enumerate(extend_lens):
        for t in range(n):
            rank, chunk = reference_owner(t, n, cp)
            rows[rank].append((i, chunk, offsets[i] + t))
    return [[row for _, _, row in sorted(r)] for r in rows]


CASES = [
    ([0], [8], 2),  # one fresh prompt, even
    ([0], [13], 2),  # uneven
    ([0], [3], 2),  # shorter than 2cp: empty chunks
    ([0], [1], 4),  # one token: only the last chunk is non-empty
    ([40, 0, 7], [17, 5, 1], 2),  # chunks over cached prefixes, a 1-token row
    ([0, 12], [100, 33], 3),
    ([5], [64], 4),
    ([0, 0], [9, 10], 1),  # cp = 1: everything on rank 0, in order
]


@pytest.mark.parametrize(("starts", "lens", "cp"), CASES)
def test_plan_matches_the_reference(starts: list[int], lens: list[int], cp: int) -> None:
    plan = ZigzagPlan.build(starts, lens, cp)
    assert [list(r) for r in plan.rank_rows] == reference_rank_rows(lens, cp)
    num_tokens = sum(lens)
    assert sorted(itertools.chain(*plan.rank_rows)) == list(range(num_tokens)), "each row exactly once"
    assert [len(r) for r in plan.rank_rows] == rank_token_counts(lens, cp)
    # balance: chunk sizes differ by at most one, so shares differ by at most 2 per sequence
    shares = [len(r) for r in plan.rank_rows]
    assert max(shares) - min(shares) <= 2 * len(lens)
    # every sequence's last token is on rank 0, at the local rows it reports
    last = [o - 1 for o in itertools.accumulate(lens)]
    assert [plan.rank_rows[0][i] for i in plan.local_last_rows(0)] == last
    assert all(plan.local_last_rows(r) == [] for r in range(1, cp))
    # chunks: absolute positions, covering the local rows in order
    offsets = list(itertools.accumulate(lens, initial=0))
    for rank in range(cp):
        rows = [
            offsets[c.seq] + (p - starts[c.seq])
            for c in plan.rank_chunks[rank]
            for p in range(c.start, c.end)
        ]
        assert rows == list(plan.rank_rows[rank])
        assert all(c.num_tokens > 0 for c in plan.rank_chunks[rank])


@pytest.mark.parametrize(("starts", "lens", "cp"), CASES)
def test_gathered_rows_unpermute_to_step_order(starts: list[int], lens: list[int], cp: int) -> None:
    plan = ZigzagPlan.build(starts, lens, cp)
    width = plan.rows_per_rank
    # What the all-gather delivers: each rank's step rows (labels), padded to ``width`` with junk.
    gathered = [row for rows in plan.rank_rows for row in [*rows, *["pad"] * (width - len(rows))]]
    index = plan.gather_rows()
    assert len(index) == len(gathered) == cp * width
    step = [None] * sum(lens)
    for j, row in enumerate(index):  # the store: gathered row j goes to step row index[j]
        if row >= 0:
            assert step[row] is None, "a row written twice"
            step[row] = gathered[j]
        else:
            assert gathered[j] == "pad"
    assert step == list(range(sum(lens)))


def test_random_round_trips() -> None:
    rng = random.Random(0)
    for _ in range(200):
        cp = rng.randint(1, 4)
        lens = [rng.randint(1, 70) for _ in range(rng.randint(1, 5))]
        starts = [rng.randint(0, 50) for _ in lens]
        plan = ZigzagPlan.build(starts, lens, cp)
        assert [list(r) for r in plan.rank_rows] == reference_rank_rows(lens, cp)
        assert plan.rows_per_rank <= sum(lens) // cp + 2 * len(lens)  # the runner's buffer bound
        gathered = [r for rows in plan.rank_rows for r in [*rows, *[-1] * (plan.rows_per_rank - len(rows))]]
        assert gathered == plan.gather_rows()


def test_split_rule() -> None:
    assert should_split([64], is_decode=False, cp=2, min_tokens=32)
    assert not should_split([63], is_decode=False, cp=2, min_tokens=32)  # 15+16 | 16+16: rank 0 short
    assert not should_split([1] * 64, is_decode=True, cp=2, min_tokens=1)  # decode never splits
    assert not should_split([1] * 64, is_decode=False, cp=2, min_tokens=1)  # every last token on rank 0
    assert not should_split([500], is_decode=False, cp=1, min_tokens=1)
    assert should_split([40, 30], is_decode=False, cp=2, min_tokens=30)
