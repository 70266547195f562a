"""The varlen extend path's host-built metadata (slots, cumulative lengths, groups) against plain
Python, and its packing against torch_native's extend with a reference varlen kernel (CPU)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from engine.attention import varlen_extend
from engine.attention.base import ForwardBatch, ForwardMode
from engine.attention.torch_native import TorchNativeBackend
from engine.attention.varlen_extend import (
    build_extend_metadata,
    key_slots,
    paged_extend_attention,
    split_groups,
)
from engine.kvcache.page_pool import KVPagePool


def random_table(rng: random.Random, seq_lens: list[int], page_size: int) -> list[list[int]]:
    """Distinct shuffled pages per sequence (page 0 never used), rows padded with page 0."""
    counts = [-(-n // page_size) for n in seq_lens]
    pages = list(range(1, sum(counts) + 1))
    rng.shuffle(pages)
    rows, i = [], 0
    for c in counts:
        rows.append(pages[i : i + c])
        i += c
    width = max(counts) + rng.randint(0, 2)
    return [r + [0] * (width - len(r)) for r in rows]


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("seed", range(5))
def test_key_slots_match_python(page_size, seed):
    rng = random.Random(seed)
    seq_lens = [rng.randint(1, 70) for _ in range(rng.randint(1, 9))]
    table = random_table(rng, seq_lens, page_size)
    want = [
        table[i][p // page_size] * page_size + p % page_size for i, n in enumerate(seq_lens) for p in range(n)
    ]
    got = key_slots(torch.tensor(table), seq_lens, page_size)
    assert got.dtype == torch.int64
    assert got.tolist() == want


@pytest.mark.parametrize("seed", range(20))
def test_split_groups_cover_in_order_within_budget(seed):
    rng = random.Random(seed)
    seq_lens = [rng.randint(1, 300) for _ in range(rng.randint(1, 20))]
    budget = rng.randint(1, 600)
    bounds = split_groups(seq_lens, budget)
    assert [lo for lo, _ in bounds] == [0] + [hi for _, hi in bounds[:-1]]
    assert bounds[-1][1] == len(seq_lens)
    for lo, hi in bounds:
        assert hi > lo
        assert hi - lo == 1 or sum(seq_lens[lo:hi]) <= budget
    for lo, hi in bounds[:-1]:
        assert sum(seq_lens[lo : hi + 1]) > budget, "greedy: the next sequence did not fit"


def test_fresh_prompts_are_one_group_without_gather():
    meta = build_extend_metadata([5, 1, 9], [5, 1, 9], torch.zeros(3, 2, dtype=torch.int64), 16, 4)
    (g,) = meta.groups
    assert (g.q_start, g.q_end, g.max_q, g.max_k) == (0, 15, 9, 9)
    assert g.cu_seq_q.dtype == torch.int32 and g.cu_seq_q.tolist() == [0, 5, 6, 15]
    assert g.cu_seq_k is g.cu_seq_q
    assert g.key_slots is None


def test_prefix_batch_groups_and_cumulative_lengths():
    seq_lens, extend_lens, ps = [40, 7, 30, 100, 3], [10, 7, 1, 100, 3], 4
    table = random_table(random.Random(0), seq_lens, ps)
    meta = build_extend_metadata(seq_lens, extend_lens, torch.tensor(table), ps, max_gather_tokens=80)
    assert [(g.q_start, g.q_end) for g in meta.groups] == [(0, 18), (18, 118), (118, 121)]
    first, long, last = meta.groups
    assert first.cu_seq_q.tolist() == [0, 10, 17, 18] and first.cu_seq_k.tolist() == [0, 40, 47, 77]
    assert (first.max_q, first.max_k) == (10, 40)
    assert first.key_slots is not None
    assert first.key_slots.tolist() == key_slots(torch.tensor(table[:3]), seq_lens[:3], ps).tolist()
    # groups of fresh prompts inside a prefix batch take their keys as they come
    assert long.key_slots is None and long.cu_seq_k is long.cu_seq_q and long.max_k == 100
    assert last.key_slots is None and last.cu_seq_q.tolist() == [0, 3]


def reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale):
    """Per sequence: causal attention with the mask aligned bottom-right (query t of a sequence
    with P more keys than queries sees keys 0..P+t), float64. Fewer KV heads are shared by groups
    of query heads, as FA2 does."""
    outs = []
    cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
    for q0, q1, k0, k1 in zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True):
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        qi, ki, vi = (t.transpose(0, 1).double() for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        offset = (k1 - k0) - (q1 - q0)
        mask = torch.arange(k1 - k0)[None, :] <= torch.arange(q1 - q0)[:, None] + offset
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o.transpose(0, 1).to(q.dtype))
    return torch.cat(outs)


@pytest.mark.parametrize("budget", [10_000, 64])
@pytest.mark.parametrize("page_size", [1, 16])
def test_packing_matches_torch_native_extend(monkeypatch, budget, page_size):
    """Gather, grouping and output placement, with FA2 replaced by ``reference_varlen``; the real
    kernel is checked the same way on the GPU (tests/gpu/test_varlen_extend.py)."""
    monkeypatch.setattr(varlen_extend, "_flash_varlen", reference_varlen)
    monkeypatch.setattr(varlen_extend, "_HAS_FLASH", True)
    g = torch.Generator().manual_seed(page_size + budget)
    rng = random.Random(page_size)
    num_heads, num_kv_heads, head_dim = 8, 2, 16
    prefix = [0, 37, 0, 16, 90, 0, 5]
    ext = [12, 1, 30, 20, 3, 7, 40]
    seq_lens = [p + e for p, e in zip(prefix, ext, strict=True)]
    table = random_table(rng, seq_lens, page_size)
    num_pages = max(max(r) for r in table) + 1
    pool = KVPagePool(1, num_pages, page_size, num_kv_heads, head_dim, torch.float64, "cpu")
    pool.kv_gpu.normal_(generator=g)
    slots = key_slots(torch.tensor(table), seq_lens, page_size).tolist()
    starts = [sum(seq_lens[:i]) for i in range(len(seq_lens))]
    new_slots = [s for st, p, n in zip(starts, prefix, seq_lens, strict=True) for s in slots[st + p : st + n]]
    num_tokens = sum(ext)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g, dtype=torch.float64)
    native = TorchNativeBackend(max_gather_tokens=budget)
    batch = ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=torch.zeros(num_tokens, dtype=torch.int64),
        positions=torch.zeros(num_tokens, dtype=torch.int64),
        out_cache_loc=torch.tensor(new_slots),
        page_table=torch.tensor(table),
        seq_lens=torch.tensor(seq_lens),
        logits_indices=torch.zeros(len(seq_lens), dtype=torch.int64),
        seq_lens_cpu=seq_lens,
        extend_lens_cpu=ext,
        kv_pool=pool,
        attn_backend=native,
    )
    layer = SimpleNamespace(layer_id=0, scaling=0.3)
    pool.store(0, batch.out_cache_loc, k, v)  # what the layer does before attention
    want = native.forward(layer, q, k, v, batch).view(num_tokens, num_heads, head_dim)
    meta = build_extend_metadata(seq_lens, ext, batch.page_table, page_size, budget)
    assert (len(meta.groups) > 1) == (budget < sum(seq_lens))
    got = paged_extend_attention(q, k, v, pool.k_pages(0), pool.v_pages(0), meta, 0.3)
    torch.testing.assert_close(got, want)
    out = torch.full_like(q, float("nan"))
    paged_extend_attention(q, k, v, pool.k_pages(0), pool.v_pages(0), meta, 0.3, out=out)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("length", [63, 64, 100, 127])
def test_lone_long_prompt_splits_dense_and_tail(monkeypatch, length):
    """A lone fresh prompt from ``SDPA_MIN_TOKENS`` on: its first ``DENSE_LENGTH_STEP`` multiple of
    queries through SDPA's dense causal path (a length whose plan startup built), the rest through
    FA2 over every key; together equal to causal attention over the whole prompt (float64)."""
    monkeypatch.setattr(varlen_extend, "_flash_varlen", reference_varlen)
    monkeypatch.setattr(varlen_extend, "_HAS_FLASH", True)
    monkeypatch.setattr(varlen_extend, "SDPA_MIN_TOKENS", 64)
    monkeypatch.setattr(varlen_extend, "DENSE_LENGTH_STEP", 32)
    g = torch.Generator().manual_seed(length)
    q = torch.randn(length, 8, 16, generator=g, dtype=torch.float64)
    k = torch.randn(length, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(length, 2, 16, generator=g, dtype=torch.float64)
    meta = build_extend_metadata([length], [length], torch.zeros(1, 1, dtype=torch.int64), 16, 10_000)
    (group,) = meta.groups
    assert group.dense_tokens == {63: 0, 64: 64, 100: 96, 127: 96}[length]
    assert (group.cu_tail is None) == (group.dense_tokens in (0, length))
    pool = KVPagePool(1, 2, 16, 2, 16, torch.float64, "cpu")  # unread: the keys are the new tokens
    got = paged_extend_attention(q, k, v, pool.k_pages(0), pool.v_pages(0), meta, 0.25)
    cu = torch.tensor([0, length], dtype=torch.int32)
    torch.testing.assert_close(got, reference_varlen(q, k, v, cu, cu, length, length, 0.25))
    # two of the four rows need the dense path's plans: lengths 64 and 96 of steps up to 127 tokens
    assert varlen_extend.warm_dense_plans(8, 2, 16, torch.float64, 127, 0.25, torch.device("cpu")) == 2
