"""Packing a scheduled batch into a step's index arrays (``engine.packing``) against the per-token
definition: row r of sequence s holds token ``num_computed + i``, at that position, in slot
``pages[p // page_size] * page_size + p % page_size``; in-flight tokens come from ``last_tokens``."""

from __future__ import annotations

import numpy as np
import pytest

from engine.packing import pack
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

PAGE = 4


def _seq(name: str, num_tokens: int, computed: int, pages: list[int], inflight_row: int = -1) -> Sequence:
    seq = Sequence(name, list(range(100, 100 + num_tokens)), SamplingParams(), 0, num_tokens + 8)
    seq.pages, seq.num_computed, seq.inflight_row = pages, computed, inflight_row
    return seq


def _by_token(seqs: list[Sequence], lens: list[int]) -> dict[str, list]:
    ids, rows, positions, slots = [], [], [], []
    for seq, n in zip(seqs, lens, strict=True):
        for p in range(seq.num_computed, seq.num_computed + n):
            in_flight = p >= len(seq.token_ids)
            ids.append(0 if in_flight else seq.token_ids[p])
            rows.append(seq.inflight_row if in_flight else -1)
            positions.append(p)
            slots.append(seq.pages[p // PAGE] * PAGE + p % PAGE)
    return dict(ids=ids, rows=rows, positions=positions, slots=slots)


@pytest.mark.parametrize("in_flight", [False, True])
def test_pack_equals_the_per_token_definition(in_flight):
    # a fresh prompt over 3 pages; a chunk over a cached prefix, crossing a page; a decode token
    # (in flight on the device when ``in_flight``: the host has not read it back yet)
    decode = _seq("c", 9 if in_flight else 10, 9, [2, 8, 4], inflight_row=5 if in_flight else -1)
    seqs = [_seq("a", 11, 0, [7, 3, 9]), _seq("b", 20, 6, [1, 5, 6, 11, 12]), decode]
    lens = [11, 7, 1]
    got = pack(seqs, lens, PAGE)
    want = _by_token(seqs, lens)
    assert got.input_ids.tolist() == want["ids"]
    assert got.positions.tolist() == want["positions"]
    assert got.slots.tolist() == want["slots"]
    if in_flight:
        assert got.input_rows is not None and got.input_rows.tolist() == want["rows"]
        assert got.input_rows.tolist()[-1] == 5
    else:
        assert got.input_rows is None, "every token known: no device lookup"
    assert got.seq_lens.tolist() == [11, 13, 10]
    assert got.last_rows.tolist() == [10, 17, 18]
    assert got.page_table.tolist() == [[7, 3, 9, 0, 0], [1, 5, 6, 11, 12], [2, 8, 4, 0, 0]]
    assert all(a.dtype == np.int64 for a in (got.input_ids, got.positions, got.slots, got.page_table))


def test_pack_refuses_tokens_past_a_sequences_pages():
    """A page-allocation slip must fail loudly, not write KV into the page-table padding (page 0)."""
    seqs = [_seq("short", 6, 0, [3]), _seq("long", 12, 0, [4, 5, 6])]
    with pytest.raises(AssertionError, match="past its pages"):
        pack(seqs, [6, 12], PAGE)


def test_upload_buffer_keeps_every_part_16_byte_aligned():
    """``engine.device.pack_aligned``, the host side of a CUDA step's single upload: each
    array comes back intact from its slice, and every slice starts on a 16-byte boundary (Triton
    compiles a kernel per pointer alignment), whatever the lengths before it."""
    from engine.device import pack_aligned

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 1000, size, dtype=np.int64) for size in (3, 5, 0, 8, 1)]
    arrays.append(rng.integers(0, 1000, (3, 7), dtype=np.int64))  # a page table
    host, parts = pack_aligned(arrays, pin=False)
    for part, a in zip(parts, arrays, strict=True):
        assert np.array_equal(host[part].numpy().reshape(a.shape), a)
        assert (host.data_ptr() + part.start * 8) % 16 == 0
    assert parts[-1].stop <= host.numel() <= parts[-1].stop + 1
