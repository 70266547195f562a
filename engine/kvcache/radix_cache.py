"""Radix-tree prefix cache over KV pages (torch-free).

Maps token-id prefixes to the KV pages that already hold their keys/values, so a request whose
prompt shares a prefix with earlier ones can skip recomputing it. Granularity is one page of
``page_size`` tokens: only full pages are cached, and matches are rounded down to whole pages.

Ownership is expressed through :class:`PageAllocator` refcounts rather than per-node locks:
- the tree owns one reference on every page it caches;
- ``match_prefix`` gives the caller one extra reference on each matched page;
- a node is evictable only when the tree is the sole owner of all its pages (refcount == 1), so a
  page in use by a live request can never be evicted out from under it.

Tree shape: every edge holds a run of tokens whose length is a multiple of ``page_size`` plus the
pages for those tokens. Children are keyed by their edge's first page of tokens, so siblings always
differ within their first page. Edges are split at page boundaries when a match or an insert
diverges mid-edge; splitting on match keeps eviction granular (the matched part and the unmatched
tail become separate nodes with separate LRU times).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from engine.kvcache.allocator import PageAllocator


@dataclass(frozen=True)
class PrefixMatch:
    """Cached pages covering the longest cached prefix; the caller owns one ref on each page."""

    pages: list[int]
    num_tokens: int  # == len(pages) * page_size


class _Node:
    __slots__ = ("children", "key", "last_access", "node_id", "pages", "parent")

    def __init__(self, node_id: int, key: tuple[int, ...], pages: list[int], parent: _Node | None) -> None:
        self.node_id = node_id  # creation order; breaks LRU ties deterministically
        self.key = key  # edge tokens, len(key) == len(pages) * page_size
        self.pages = pages
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.last_access = 0


class RadixCache:
    """Page-granular prefix cache; see the module docstring for the ownership contract."""

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        assert page_size >= 1, f"page_size must be >= 1, got {page_size}"
        self.allocator = allocator
        self.page_size = page_size
        # A monotonic counter instead of wall-clock time keeps eviction order deterministic.
        self._clock = itertools.count(1)
        self._ids = itertools.count()
        self._root = _Node(next(self._ids), (), [], None)
        self._num_cached_pages = 0

    @property
    def num_cached_pages(self) -> int:
        return self._num_cached_pages

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """Longest cached prefix of ``token_ids``, rounded down to whole pages.

        The caller receives one reference on each returned page and must ``allocator.free`` them
        when done. Callers that need at least one token left to compute pass ``token_ids[:-1]``.
        """
        tokens = self._full_pages(token_ids)
        now = next(self._clock)
        node, pos, pages = self._root, 0, []
        while pos < len(tokens):
            child = node.children.get(tokens[pos : pos + self.page_size])
            if child is None:
                break
            common = self._common_len(child.key, tokens, pos)
            split = common < len(child.key)
            if split:
                child = self._split(child, common)
            child.last_access = now
            pages.extend(child.pages)
            pos += len(child.key)
            node = child
            if split:
                break
        self.allocator.incref(pages)
        return PrefixMatch(pages=pages, num_tokens=pos)

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> int:
        """Cache ``token_ids`` (exactly ``len(pages)`` full pages) and return how many were cached already.

        The tree takes one reference on each page it newly stores. For the already-cached part the
        existing pages are kept and the given duplicates are not taken. The caller keeps its own
        references either way and frees them when it is done.
        """
        assert len(token_ids) == len(pages) * self.page_size, (
            f"insert needs whole pages: {len(token_ids)} tokens for {len(pages)} pages "
            f"of size {self.page_size}"
        )
        tokens = tuple(token_ids)
        now = next(self._clock)
        node, pos = self._root, 0
        while pos < len(tokens):
            first_page = tokens[pos : pos + self.page_size]
            child = node.children.get(first_page)
            if child is None:
                new_pages = list(pages[pos // self.page_size :])
                self.allocator.incref(new_pages)
                child = _Node(next(self._ids), tokens[pos:], new_pages, node)
                node.children[first_page] = child
                self._num_cached_pages += len(new_pages)
                child.last_access = now
                return pos
            common = self._common_len(child.key, tokens, pos)
            if common < len(child.key):
                child = self._split(child, common)
            child.last_access = now
            pos += len(child.key)
            node = child
        return pos

    def evict(self, num_pages: int) -> int:
        """Free LRU leaves owned only by the cache until ``num_pages`` pages are freed or none are left.

        A parent whose last child is evicted becomes a leaf and a candidate in turn. Returns the
        number of pages freed, which can exceed ``num_pages`` (nodes are freed whole) or fall short.
        """
        heap = [(n.last_access, n.node_id, n) for n in self._nodes() if self._is_evictable_leaf(n)]
        heapq.heapify(heap)
        num_freed = 0
        while num_freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None, "the root is never evicted"
            del parent.children[node.key[: self.page_size]]
            self.allocator.free(node.pages)
            num_freed += len(node.pages)
            self._num_cached_pages -= len(node.pages)
            if self._is_evictable_leaf(parent):
                heapq.heappush(heap, (parent.last_access, parent.node_id, parent))
        return num_freed

    def num_evictable_pages(self) -> int:
        """Pages ``evict`` could free right now: nodes solely owned by the cache whose whole subtree is too.

        Costs O(cached nodes); the allocator's refcounts change without the tree seeing it, so
        there is no running total to keep.
        """
        evictable: dict[int, bool] = {}
        total = 0
        # Reversed pre-order visits every child before its parent.
        for node in reversed(list(self._nodes())):
            ok = self._solely_cached(node) and all(evictable[c.node_id] for c in node.children.values())
            evictable[node.node_id] = ok
            if ok:
                total += len(node.pages)
        return total

    def reset(self) -> None:
        """Drop the tree's reference on every cached page and empty the tree.

        Pages still referenced by callers (live matches, unfinished requests) stay allocated until
        those callers free them.
        """
        for node in self._nodes():
            self.allocator.free(node.pages)
        self._root = _Node(next(self._ids), (), [], None)
        self._num_cached_pages = 0

    def _full_pages(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        return tuple(token_ids[: len(token_ids) - len(token_ids) % self.page_size])

    def _common_len(self, key: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
        """Length of the common prefix of ``key`` and ``tokens[start:]``, rounded down to whole pages."""
        limit = min(len(key), len(tokens) - start)
        i = 0
        while i < limit and key[i] == tokens[start + i]:
            i += 1
        return i - i % self.page_size

    def _split(self, node: _Node, num_tokens: int) -> _Node:
        """Cut ``node``'s edge after ``num_tokens`` tokens; returns the new upper node."""
        assert 0 < num_tokens < len(node.key) and num_tokens % self.page_size == 0, (
            f"split at {num_tokens} is not an inner page boundary of a {len(node.key)}-token edge"
        )
        parent = node.parent
        assert parent is not None, "the root has no edge to split"
        num_split_pages = num_tokens // self.page_size
        upper = _Node(next(self._ids), node.key[:num_tokens], node.pages[:num_split_pages], parent)
        upper.last_access = node.last_access
        parent.children[upper.key[: self.page_size]] = upper
        node.key = node.key[num_tokens:]
        node.pages = node.pages[num_split_pages:]
        node.parent = upper
        upper.children[node.key[: self.page_size]] = node
        return upper

    def _nodes(self) -> Iterator[_Node]:
        """Every non-root node in pre-order (parents before children); iterative, so deep trees are fine."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _solely_cached(self, node: _Node) -> bool:
        return all(self.allocator.refcount(p) == 1 for p in node.pages)

    def _is_evictable_leaf(self, node: _Node) -> bool:
        return node is not self._root and not node.children and self._solely_cached(node)
