"""A radix tree over token ids whose edges are full KV pages: the engine's prefix cache.

Each node below the root stands for one page of ``page_size`` tokens following its parent's tokens, and
holds one reference to that page in the :class:`~lmlab.inference.pool.PagePool`. A new request walks
the tree with its prompt and reuses the pages of the longest cached prefix (taking a reference to each,
so they cannot be freed while it runs); it then prefills only the rest. When the pool runs out of pages,
:meth:`PrefixCache.evict` frees least recently used leaves that no running sequence holds. The cache keeps
its evictable leaves in a heap ordered by last use (the pool tells it when a page's count drops to 1), so an
eviction costs O(log n) per page, not a walk of the whole tree.

Usage::

    cache = PrefixCache(pool)
    pages, n = cache.match(prompt)         # n cached tokens (a multiple of page_size), pages increfed
    cache.insert(tokens[:n_cached], seq_pages)
    cache.evict(4)                         # free up to 4 pages
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

from lmlab.inference.pool import PagePool

__all__ = ["PrefixCache"]


class _Node:
    __slots__ = ("children", "key", "last_used", "page", "parent")

    def __init__(self, parent: _Node | None, key: tuple[int, ...], page: int) -> None:
        self.parent, self.key, self.page = parent, key, page
        self.children: dict[tuple[int, ...], _Node] = {}
        self.last_used = 0


class PrefixCache:
    """Cached pages of token prefixes, with LRU eviction of pages no sequence is using.

    A node is *evictable* when it has no children and the cache is its page's only holder. Every evictable node
    has an entry ``(last_used, seq, node)`` in ``_heap``, pushed when it became evictable or was last touched
    while evictable; entries whose node was touched, evicted, gained a child or got a second holder since are
    stale and dropped when popped (lazy deletion). The pool calls its hook when a page's count drops
    to 1 (``last_holder``), which is how a node whose sequence lets go becomes evictable.
    """

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.root = _Node(None, (), -1)
        self._clock = itertools.count(1)
        self._seq = itertools.count()
        self._heap: list[tuple[int, int, _Node]] = []
        self._by_page: dict[int, _Node] = {}
        self.n_pages = 0
        self.hits = 0  # tokens served from the cache, for statistics
        self.evicted = 0  # pages evicted, for statistics
        by_page, heap, seq = self._by_page, self._heap, self._seq

        def last_holder(page: int) -> None:  # the pool's hook: only the cache may hold ``page`` now
            nd = by_page.get(page)
            if nd is not None and not nd.children:
                heapq.heappush(heap, (nd.last_used, next(seq), nd))

        # a closure over the cache's containers, not a bound method: the pool does not keep the cache alive (no
        # reference cycle pool -> cache -> pool, so an engine's pool is freed as soon as the engine is dropped)
        pool.on_last_holder = last_holder

    def _chunks(self, tokens: Sequence[int], n_pages: int):
        ps = self.page_size
        for i in range(n_pages):
            yield tuple(tokens[i * ps:(i + 1) * ps])

    def _evictable(self, nd: _Node) -> bool:
        return not nd.children and self.pool.refcount[nd.page] == 1

    def _push(self, nd: _Node) -> None:
        heapq.heappush(self._heap, (nd.last_used, next(self._seq), nd))

    def _compact(self) -> None:
        """Drop stale heap entries once they outnumber the tree's nodes (called on insert and evict, so that the
        heap stays O(nodes) for O(1) amortized work per entry)."""
        heap = self._heap
        if len(heap) > 2 * self.n_pages + 64:
            live = {id(e[2]): e for e in heap
                    if e[2].parent is not None and e[0] == e[2].last_used and self._evictable(e[2])}
            heap[:] = live.values()
            heapq.heapify(heap)

    def match(self, tokens: Sequence[int], max_tokens: int | None = None) -> tuple[list[int], int]:
        """Pages of the longest cached prefix of ``tokens`` (at most ``max_tokens`` tokens), increfed for
        the caller, and the number of tokens they hold."""
        limit = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
        node, pages = self.root, []
        now = next(self._clock)
        for key in self._chunks(tokens, limit // self.page_size):
            child = node.children.get(key)
            if child is None:
                break
            child.last_used = now
            pages.append(child.page)
            node = child
        self.pool.incref(pages)  # the touched nodes are held now: none is evictable until its holder lets go
        self.hits += len(pages) * self.page_size
        return pages, len(pages) * self.page_size

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> None:
        """Record the full pages of ``tokens`` (whose keys/values sit in ``pages``); pages already cached
        for the same prefix are kept, the caller's duplicates are not taken."""
        self._compact()
        node = self.root
        now = next(self._clock)
        for key, page in zip(self._chunks(tokens, len(tokens) // self.page_size), pages):
            child = node.children.get(key)
            if child is None:
                child = _Node(node, key, page)
                node.children[key] = child
                self._by_page[page] = child
                self.pool.incref([page])
                self.n_pages += 1
            child.last_used = now
            node = child
        if node is not self.root and self._evictable(node):  # touched while evictable: its entry moves
            self._push(node)

    def evict(self, n_pages: int) -> int:
        """Free up to ``n_pages`` pages, least recently used leaves first, skipping pages still held by a
        sequence; returns how many pages went back to the pool.

        Rounds, as a scan of the tree would go: each round frees the leaves evictable when it began, least
        recently used first; a parent whose last child goes becomes evictable in the next round."""
        self._compact()
        heap, freed, exposed = self._heap, 0, []
        while freed < n_pages:
            while heap and freed < n_pages:
                stamp, _, nd = heapq.heappop(heap)
                if nd.parent is None or stamp != nd.last_used or not self._evictable(nd):
                    continue  # stale: touched, evicted, grown or held since it was pushed
                parent = nd.parent
                del parent.children[nd.key]
                del self._by_page[nd.page]
                nd.parent = None
                self.pool.decref([nd.page])
                self.n_pages -= 1
                self.evicted += 1
                freed += 1
                if parent is not self.root and self._evictable(parent):
                    exposed.append(parent)
            if not exposed:
                break
            for nd in exposed:
                self._push(nd)
            exposed = []
        for nd in exposed:
            self._push(nd)
        return freed

    def clear(self) -> None:
        """Drop every cached page (pages held by sequences stay allocated until they let go)."""
        nodes = list(self._nodes())
        self.root.children.clear()
        self._by_page.clear()
        self._heap.clear()
        self.n_pages = 0
        for nd in nodes:
            nd.parent = None
            self.pool.decref([nd.page])

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            nd = stack.pop()
            yield nd
            stack.extend(nd.children.values())
