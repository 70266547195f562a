"""RadixCache: page-granular prefix matching, splitting, duplicate inserts, LRU eviction, no leaks."""

import random

import pytest

from engine.kvcache.allocator import PageAllocator
from engine.kvcache.radix_cache import PrefixMatch, RadixCache

PS = 4


def make(num_pages: int = 64, page_size: int = PS) -> tuple[PageAllocator, RadixCache]:
    alloc = PageAllocator(num_pages)
    return alloc, RadixCache(alloc, page_size)


def cache_sequence(alloc: PageAllocator, cache: RadixCache, tokens: list[int]) -> list[int]:
    """Allocate pages for `tokens`, insert them and drop the caller's refs, like a finished request."""
    pages = alloc.alloc(len(tokens) // cache.page_size)
    assert pages is not None
    cache.insert(tokens, pages)
    alloc.free(pages)
    return pages


def match_and_release(alloc: PageAllocator, cache: RadixCache, tokens: list[int]) -> PrefixMatch:
    m = cache.match_prefix(tokens)
    alloc.free(m.pages)
    return m


def test_empty_cache_matches_nothing():
    _, cache = make()
    assert cache.match_prefix(list(range(12))) == PrefixMatch(pages=[], num_tokens=0)


def test_match_after_insert_returns_inserted_pages_rounded_down():
    alloc, cache = make()
    tokens = list(range(12))
    pages = cache_sequence(alloc, cache, tokens)
    assert cache.num_cached_pages == 3
    assert match_and_release(alloc, cache, tokens).pages == pages
    assert match_and_release(alloc, cache, [*tokens, 99, 98]).pages == pages
    assert match_and_release(alloc, cache, tokens[:11]) == PrefixMatch(pages[:2], 8)
    assert match_and_release(alloc, cache, tokens[:3]) == PrefixMatch([], 0)
    # A mismatch inside the second page loses that whole page.
    assert match_and_release(alloc, cache, [0, 1, 2, 3, 4, 5, 99, 7]) == PrefixMatch(pages[:1], 4)


def test_match_gives_the_caller_one_reference_per_page():
    alloc, cache = make()
    pages = cache_sequence(alloc, cache, list(range(8)))
    m = cache.match_prefix(list(range(8)))
    assert [alloc.refcount(p) for p in m.pages] == [2, 2]
    alloc.free(m.pages)
    assert [alloc.refcount(p) for p in pages] == [1, 1]


def test_insert_diverging_mid_edge_splits_and_both_branches_match():
    alloc, cache = make()
    a = list(range(16))
    b = [*a[:8], 8, 9, 77, 11, 12, 13, 14, 15]  # diverges inside the third page
    pages_a = cache_sequence(alloc, cache, a)
    pages_b = alloc.alloc(4)
    assert pages_b is not None
    assert cache.insert(b, pages_b) == 8
    # The shared two pages stay the cached ones; b's duplicates are not taken.
    assert [alloc.refcount(p) for p in pages_b] == [1, 1, 2, 2]
    alloc.free(pages_b)
    assert cache.num_cached_pages == 6
    assert match_and_release(alloc, cache, a).pages == pages_a
    assert match_and_release(alloc, cache, b).pages == pages_a[:2] + pages_b[2:]
    assert match_and_release(alloc, cache, a[:8] + [0] * 8).pages == pages_a[:2]


def test_match_diverging_mid_edge_splits_so_the_tail_evicts_alone():
    alloc, cache = make()
    a = list(range(16))
    pages_a = cache_sequence(alloc, cache, a)
    assert match_and_release(alloc, cache, [*a[:9], 99]).pages == pages_a[:2]
    assert cache.evict(1) == 2  # only the unmatched tail node, not the whole 4-page edge
    assert match_and_release(alloc, cache, a).pages == pages_a[:2]
    assert alloc.num_free == alloc.num_total - 2


def test_insert_of_cached_prefix_returns_cached_count_and_takes_no_pages():
    alloc, cache = make()
    a = list(range(12))
    cache_sequence(alloc, cache, a)
    dup = alloc.alloc(2)
    assert dup is not None
    assert cache.insert(a[:8], dup) == 8
    assert [alloc.refcount(p) for p in dup] == [1, 1]
    alloc.free(dup)
    dup = alloc.alloc(3)
    assert dup is not None
    assert cache.insert(a, dup) == 12
    alloc.free(dup)
    assert cache.num_cached_pages == 3
    assert alloc.num_free == alloc.num_total - 3


def test_insert_requires_whole_pages():
    alloc, cache = make()
    pages = alloc.alloc(2)
    assert pages is not None
    with pytest.raises(AssertionError):
        cache.insert(list(range(7)), pages)


def test_eviction_order_is_least_recently_used():
    alloc, cache = make()
    x, y, z = [0] * 4, [1] * 4, [2] * 4
    px, py, pz = (cache_sequence(alloc, cache, s) for s in (x, y, z))
    match_and_release(alloc, cache, x)  # x is now the most recently used
    order = []
    for _ in range(3):
        assert cache.evict(1) == 1
        order.append(next(p for p in (px, py, pz) if alloc.refcount(p[0]) == 0 and p not in order))
    assert order == [py, pz, px]
    assert cache.num_cached_pages == 0


def test_pages_held_by_a_live_match_are_never_evicted():
    alloc, cache = make()
    a, b = list(range(8)), list(range(100, 108))
    pages_a = cache_sequence(alloc, cache, a)
    cache_sequence(alloc, cache, b)
    held = cache.match_prefix(a)
    assert cache.num_evictable_pages() == 2
    assert cache.evict(100) == 2
    assert cache.num_evictable_pages() == 0
    assert cache.evict(100) == 0
    assert match_and_release(alloc, cache, a).pages == pages_a
    alloc.free(held.pages)
    assert cache.num_evictable_pages() == 2
    assert cache.evict(100) == 2
    assert alloc.num_free == alloc.num_total


def test_parent_is_evictable_only_after_its_children():
    alloc, cache = make()
    stem = list(range(8))
    cache_sequence(alloc, cache, [*stem, 1, 1, 1, 1])
    live = alloc.alloc(3)
    assert live is not None
    cache.insert([*stem, 2, 2, 2, 2], live)  # this request still holds its pages
    # The live request still holds the [2, 2, 2, 2] leaf, so the stem above it cannot go either.
    assert cache.num_evictable_pages() == 1
    assert cache.evict(10) == 1
    alloc.free(live)
    assert cache.num_evictable_pages() == 3
    assert cache.evict(10) == 3  # the stem becomes a leaf once its last child is evicted
    assert alloc.num_free == alloc.num_total


def test_reset_drops_only_the_tree_references():
    alloc, cache = make()
    cache_sequence(alloc, cache, list(range(8)))
    held = cache.match_prefix(list(range(8)))
    cache.reset()
    assert cache.num_cached_pages == 0
    assert cache.match_prefix(list(range(8))).pages == []
    assert [alloc.refcount(p) for p in held.pages] == [1, 1]
    alloc.free(held.pages)
    assert alloc.num_free == alloc.num_total


class Oracle:
    """Brute-force model: every cached full-page prefix -> the page holding its last page of tokens."""

    def __init__(self, page_size: int) -> None:
        self.ps = page_size
        self.cached: dict[tuple[int, ...], int] = {}

    def match(self, tokens: list[int]) -> list[int]:
        pages = []
        while (k := (len(pages) + 1) * self.ps) <= len(tokens) and tuple(tokens[:k]) in self.cached:
            pages.append(self.cached[tuple(tokens[:k])])
        return pages

    def evictable(self, alloc: PageAllocator) -> int:
        sole = {key for key, page in self.cached.items() if alloc.refcount(page) == 1}
        return sum(all(k in sole for k in self.cached if k[: len(key)] == key) for key in sole)


@pytest.mark.parametrize("page_size", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_random_ops_agree_with_oracle_and_leak_nothing(page_size, seed):
    rng = random.Random(seed)
    max_len = 24 + 12
    # Room for about four concurrent requests, so eviction under pressure happens often.
    alloc, cache = make(num_pages=1 + 4 * -(-max_len // page_size), page_size=page_size)
    oracle = Oracle(page_size)
    history: list[list[int]] = [[]]
    live: list[tuple[list[int], list[int], int]] = []  # (tokens, pages held, matched pages)

    def finish(tokens: list[int], pages: list[int], num_matched: int, store: bool) -> None:
        if store:
            full = len(tokens) // page_size
            expected = len(oracle.match(tokens[: full * page_size]))
            assert expected >= num_matched, "a prefix held by a request was evicted"
            before = [alloc.refcount(p) for p in pages]
            assert cache.insert(tokens[: full * page_size], pages[:full]) == expected * page_size
            taken = [int(expected <= j < full) for j in range(len(pages))]
            assert [alloc.refcount(p) for p in pages] == [b + t for b, t in zip(before, taken, strict=True)]
            for j in range(expected, full):
                oracle.cached[tuple(tokens[: (j + 1) * page_size])] = pages[j]
        alloc.free(pages)

    def evict(n: int) -> None:
        assert cache.num_evictable_pages() == oracle.evictable(alloc)
        sole_before = {p for p in oracle.cached.values() if alloc.refcount(p) == 1}
        freed = cache.evict(n)
        gone = {k for k, p in oracle.cached.items() if alloc.refcount(p) == 0}
        assert {oracle.cached[k] for k in gone} <= sole_before, "evicted a page someone else holds"
        assert freed == len(gone)
        assert freed >= n or cache.num_evictable_pages() == 0
        for k in gone:
            del oracle.cached[k]
        assert all(k[:i] in oracle.cached for k in oracle.cached for i in range(page_size, len(k), page_size))

    for _ in range(400):
        op = rng.random()
        if op < 0.45 or not live:
            base = rng.choice(history)
            keep = rng.randint(0, min(len(base), max_len - 12))
            tokens = base[:keep] + [rng.randrange(3) for _ in range(rng.randint(1, 12))]
            history.append(tokens)
            m = cache.match_prefix(tokens[:-1])
            assert m.pages == oracle.match(tokens[:-1])
            assert m.num_tokens == len(m.pages) * page_size
            need = -(-len(tokens) // page_size) - len(m.pages)
            new = alloc.alloc(need)
            if new is None:
                evict(need - alloc.num_free)
                new = alloc.alloc(need)
            if new is None:
                alloc.free(m.pages)
                continue
            live.append((tokens, m.pages + new, len(m.pages)))
        elif op < 0.85:
            finish(*live.pop(rng.randrange(len(live))), store=rng.random() < 0.9)
        else:
            evict(rng.randint(1, 6))
        assert cache.num_cached_pages == len(oracle.cached)
        # The running evictable total (kept from the allocator's share reports) after every op.
        assert cache.num_evictable_pages() == oracle.evictable(alloc)

    while live:
        finish(*live.pop(), store=True)
    assert cache.num_evictable_pages() == cache.num_cached_pages
    evict(alloc.num_total)
    assert cache.num_cached_pages == 0 and not oracle.cached
    assert alloc.num_free == alloc.num_total
