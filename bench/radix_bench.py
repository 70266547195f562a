"""Prefix-cache bookkeeping cost at scale (CPU): what admission and eviction pay per call.

    python -m bench.radix_bench --sequences 10000

Fills a ``RadixCache`` the way a busy server does — ``--sequences`` requests, each a shared
2-page system prompt (100 variants) plus 4 unique pages, inserted and released — then times
``num_evictable_pages`` (every admission that needs pages asks it), ``evict(1)`` and a 6-page
``match_prefix`` + release.
"""

from __future__ import annotations

import argparse
import random
import time

from engine.kvcache.allocator import PageAllocator
from engine.kvcache.radix_cache import RadixCache


def per_call_ms(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--sequences", type=int, default=10000)
    p.add_argument("--page-size", type=int, default=16)
    args = p.parse_args()
    ps, rng = args.page_size, random.Random(0)
    alloc = PageAllocator(args.sequences * 6 + 10)
    cache = RadixCache(alloc, ps)

    def prompt(i: int) -> list[int]:
        return [1000 + i % 100] * (2 * ps) + [rng.randrange(1000) for _ in range(4 * ps)]

    for i in range(args.sequences):
        tokens = prompt(i)
        match = cache.match_prefix(tokens)
        new = alloc.alloc(6 - len(match.pages))
        assert new is not None, "pool sized for every sequence"
        pages = match.pages + new
        cache.insert(tokens, pages)
        alloc.free(pages)
    probe = prompt(5)

    def match_and_release() -> None:
        alloc.free(cache.match_prefix(probe).pages)

    print(f"cached pages: {cache.num_cached_pages}")
    print(f"num_evictable_pages: {per_call_ms(cache.num_evictable_pages, 20):.4f} ms")
    print(f"match_prefix + release (6 pages): {per_call_ms(match_and_release, 1000):.4f} ms")
    print(f"evict(1): {per_call_ms(lambda: cache.evict(1), 20):.4f} ms")


if __name__ == "__main__":
    main()
