"""Reference-counted page allocator for the paged KV cache (torch-free).

A page is an integer id into the KV page pool; the pool tensors live elsewhere and are indexed by
these ids. Several owners may hold the same page: a running request, the radix prefix cache, and
other requests that matched the same cached prefix. Each owner holds one reference; the page returns
to the free list when the last reference is dropped.

Ids ``[0, num_reserved)`` are never handed out. Page 0 is the dummy page that padded batch rows
(CUDA-graph padding) write their KV into, so it must never hold live data.

Every operation costs O(1) per page. Allocation is deterministic: on a fresh allocator ids come out
in ascending order, and the most recently freed pages are reused first (LIFO), which keeps the
working set of pages small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class PageAllocator:
    """Hands out page ids and tracks how many owners hold each one.

    Contract:
    - ``alloc(n)`` is all-or-nothing: it returns ``n`` distinct pages with refcount 1, or ``None``
      (and changes nothing) when fewer than ``n`` pages are free.
    - ``incref`` only applies to allocated pages; ``free`` drops one reference and releases the page
      when none remain. Misuse (incref of a free page, double free, a reserved or out-of-range id)
      is a bug in the caller and raises ``AssertionError``.
    """

    def __init__(self, num_pages: int, num_reserved: int = 1) -> None:
        assert num_reserved >= 0, f"num_reserved must be >= 0, got {num_reserved}"
        assert num_pages >= num_reserved, f"num_pages ({num_pages}) < num_reserved ({num_reserved})"
        self.num_pages = num_pages
        self.num_reserved = num_reserved
        self._refcounts = [0] * num_pages
        # A stack with the lowest id on top, so a fresh allocator hands out ascending ids.
        self._free = list(range(num_pages - 1, num_reserved - 1, -1))
        # Watched pages report when they become shared (a 2nd owner) or sole again (see ``watch``).
        self._watched = bytearray(num_pages)
        self._on_share_change: Callable[[int, bool], None] | None = None

    @property
    def num_total(self) -> int:
        """Allocatable pages (reserved pages excluded)."""
        return self.num_pages - self.num_reserved

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """Take ``n`` free pages (refcount 1 each), or ``None`` if fewer than ``n`` are free."""
        assert n >= 0, f"cannot allocate a negative number of pages ({n})"
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()
        for page in pages:
            self._refcounts[page] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Add one reference to each page; every page must currently be allocated."""
        for page in pages:
            self._check_id(page)
            count = self._refcounts[page]
            assert count > 0, f"incref of page {page}, which is not allocated"
            self._refcounts[page] = count + 1
            if count == 1 and self._watched[page]:
                self._on_share_change(page, True)  # type: ignore[misc]

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference from each page; a page whose count reaches 0 becomes free."""
        for page in pages:
            self._check_id(page)
            count = self._refcounts[page]
            assert count > 0, f"double free of page {page}"
            self._refcounts[page] = count - 1
            if count == 1:
                assert not self._watched[page], f"page {page} freed while watched"
                self._free.append(page)
            elif count == 2 and self._watched[page]:
                self._on_share_change(page, False)  # type: ignore[misc]

    def set_share_observer(self, on_change: Callable[[int, bool], None]) -> None:
        """``on_change(page, shared)`` runs whenever a watched page gains a second owner (True) or
        drops back to one (False): how the prefix cache keeps its evictable count without scanning.
        One observer per allocator."""
        assert self._on_share_change is None, "the allocator already has a share observer"
        self._on_share_change = on_change

    def watch(self, pages: Iterable[int], watched: bool = True) -> None:
        """Start (or stop) reporting ``pages``' share changes to the observer."""
        assert self._on_share_change is not None, "watch needs set_share_observer first"
        for page in pages:
            self._watched[page] = watched

    def refcount(self, page: int) -> int:
        """Current number of owners of ``page`` (always 0 for reserved pages)."""
        assert 0 <= page < self.num_pages, f"page {page} is outside [0, {self.num_pages})"
        return self._refcounts[page]

    def _check_id(self, page: int) -> None:
        # Without this, a negative id would silently index the refcount list from the end.
        assert self.num_reserved <= page < self.num_pages, (
            f"page {page} is outside the allocatable range [{self.num_reserved}, {self.num_pages})"
        )
