"""PageAllocator: all-or-nothing allocation, reserved pages, refcount sharing, misuse detection."""

import pytest

from engine.kvcache.allocator import PageAllocator


def test_counts_exclude_reserved_pages():
    alloc = PageAllocator(num_pages=10, num_reserved=2)
    assert alloc.num_total == 8
    assert alloc.num_free == 8


def test_reserved_pages_are_never_handed_out():
    alloc = PageAllocator(num_pages=8)
    pages = alloc.alloc(7)
    assert pages is not None
    assert sorted(pages) == list(range(1, 8))
    assert alloc.alloc(1) is None
    assert alloc.refcount(0) == 0
    alloc.free(pages)
    again = alloc.alloc(7)
    assert again is not None and 0 not in again


def test_fresh_allocator_hands_out_distinct_ascending_ids():
    alloc = PageAllocator(num_pages=6)
    assert alloc.alloc(3) == [1, 2, 3]
    assert alloc.alloc(2) == [4, 5]


def test_alloc_is_all_or_nothing():
    alloc = PageAllocator(num_pages=5)
    first = alloc.alloc(3)
    assert first is not None
    assert alloc.alloc(2) is None
    assert alloc.num_free == 1
    assert alloc.alloc(1) is not None
    assert alloc.num_free == 0


def test_alloc_zero_returns_empty_list():
    alloc = PageAllocator(num_pages=1)
    assert alloc.alloc(0) == []


def test_new_pages_have_refcount_one():
    alloc = PageAllocator(num_pages=4)
    pages = alloc.alloc(3)
    assert pages is not None
    assert [alloc.refcount(p) for p in pages] == [1, 1, 1]


def test_shared_page_is_freed_only_by_the_last_owner():
    alloc = PageAllocator(num_pages=4)
    pages = alloc.alloc(2)
    assert pages is not None
    alloc.incref(pages)
    assert alloc.refcount(pages[0]) == 2
    alloc.free(pages)
    assert alloc.num_free == 1
    assert alloc.refcount(pages[0]) == 1
    alloc.free(pages)
    assert alloc.num_free == 3
    assert alloc.refcount(pages[0]) == 0


def test_freed_pages_are_reused():
    alloc = PageAllocator(num_pages=3)
    pages = alloc.alloc(2)
    assert pages is not None
    alloc.free(pages)
    assert sorted(alloc.alloc(2) or []) == sorted(pages)


def test_double_free_asserts():
    alloc = PageAllocator(num_pages=4)
    pages = alloc.alloc(1)
    assert pages is not None
    alloc.free(pages)
    with pytest.raises(AssertionError, match="double free"):
        alloc.free(pages)


def test_incref_of_free_page_asserts():
    alloc = PageAllocator(num_pages=4)
    with pytest.raises(AssertionError):
        alloc.incref([2])


@pytest.mark.parametrize("page", [0, -1, 4])
def test_reserved_or_out_of_range_ids_assert(page):
    alloc = PageAllocator(num_pages=4)
    with pytest.raises(AssertionError):
        alloc.free([page])
    with pytest.raises(AssertionError):
        alloc.incref([page])
