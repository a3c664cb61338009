"""A radix tree over token ids whose edges are full KV pages: the engine's prefix cache.

Each node below the root stands for one page of ``page_size`` tokens following its parent's tokens, and
holds one reference to that page in the :class:`~lmlab.inference.pool.PagePool`. A new request walks
the tree with its prompt and reuses the pages of the longest cached prefix (taking a reference to each,
so they cannot be freed while it runs); it then prefills only the rest. When the pool runs out of pages,
:meth:`PrefixCache.evict` frees least recently used leaves that no running sequence holds.

Usage::

    cache = PrefixCache(pool)
    pages, n = cache.match(prompt)         # n cached tokens (a multiple of page_size), pages increfed
    cache.insert(tokens[:n_cached], seq_pages)
    cache.evict(4)                         # free up to 4 pages
"""

from __future__ import annotations

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
    """Cached pages of token prefixes, with LRU eviction of pages no sequence is using."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.root = _Node(None, (), -1)
        self._clock = itertools.count(1)
        self.n_pages = 0
        self.hits = 0  # tokens served from the cache, for statistics
        self.evicted = 0  # pages evicted, for statistics

    def _chunks(self, tokens: Sequence[int], n_pages: int):
        ps = self.page_size
        for i in range(n_pages):
            yield tuple(tokens[i * ps:(i + 1) * ps])

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
        self.pool.incref(pages)
        self.hits += len(pages) * self.page_size
        return pages, len(pages) * self.page_size

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> None:
        """Record the full pages of ``tokens`` (whose keys/values sit in ``pages``); pages already cached
        for the same prefix are kept, the caller's duplicates are not taken."""
        node = self.root
        now = next(self._clock)
        for key, page in zip(self._chunks(tokens, len(tokens) // self.page_size), pages):
            child = node.children.get(key)
            if child is None:
                child = _Node(node, key, page)
                node.children[key] = child
                self.pool.incref([page])
                self.n_pages += 1
            child.last_used = now
            node = child

    def evict(self, n_pages: int) -> int:
        """Free up to ``n_pages`` pages, least recently used leaves first, skipping pages still held by a
        sequence; returns how many pages went back to the pool."""
        freed = 0
        while freed < n_pages:
            leaves = [nd for nd in self._nodes() if not nd.children and self.pool.refcount[nd.page] == 1]
            if not leaves:
                break
            leaves.sort(key=lambda nd: nd.last_used)
            for nd in leaves:
                if freed >= n_pages:
                    break
                del nd.parent.children[nd.key]
                self.pool.decref([nd.page])
                self.n_pages -= 1
                self.evicted += 1
                freed += 1
        return freed

    def clear(self) -> None:
        """Drop every cached page (pages held by sequences stay allocated until they let go)."""
        for nd in list(self._nodes()):
            self.pool.decref([nd.page])
        self.root.children.clear()
        self.n_pages = 0

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            nd = stack.pop()
            yield nd
            stack.extend(nd.children.values())
