"""PrefixCache's heap-ordered eviction against the full-scan eviction it replaced (kept here as the reference):
the same pages evicted in the same order, and the same tree and pool, over long random sequences of engine-like
operations."""

from __future__ import annotations

import gc
import itertools
import random
import weakref
from collections.abc import Sequence

import pytest

from lmlab.inference import PagePool, PrefixCache


class _RefNode:
    __slots__ = ("children", "key", "last_used", "page", "parent")

    def __init__(self, parent, key, page):
        self.parent, self.key, self.page = parent, key, page
        self.children = {}
        self.last_used = 0


class ScanPrefixCache:
    """The prefix cache before eviction kept a heap (commit b36aab1): ``evict`` walks and sorts the whole tree."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.root = _RefNode(None, (), -1)
        self._clock = itertools.count(1)
        self.n_pages = 0
        self.hits = 0
        self.evicted = 0

    def _chunks(self, tokens, n_pages):
        ps = self.page_size
        for i in range(n_pages):
            yield tuple(tokens[i * ps:(i + 1) * ps])

    def match(self, tokens: Sequence[int], max_tokens: int | None = None):
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
        node = self.root
        now = next(self._clock)
        for key, page in zip(self._chunks(tokens, len(tokens) // self.page_size), pages):
            child = node.children.get(key)
            if child is None:
                child = _RefNode(node, key, page)
                node.children[key] = child
                self.pool.incref([page])
                self.n_pages += 1
            child.last_used = now
            node = child

    def evict(self, n_pages: int) -> int:
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


def tree(node) -> list:
    return sorted((k, c.page, c.last_used, tree(c)) for k, c in node.children.items())


def check_heap_covers_evictable_leaves(cache: PrefixCache) -> None:
    """Every evictable node (childless, only the cache holds its page) has a live heap entry; the page map holds
    exactly the tree's nodes (evicted nodes do not linger in it)."""
    assert {p: id(nd) for p, nd in cache._by_page.items()} == {nd.page: id(nd) for nd in cache._nodes()}
    live = {id(nd) for stamp, _, nd in cache._heap if nd.parent is not None and stamp == nd.last_used}
    for nd in cache._nodes():
        if not nd.children and cache.pool.refcount[nd.page] == 1:
            assert id(nd) in live, f"evictable page {nd.page} has no heap entry"


class Twin:
    """The same operations on a reference cache and on PrefixCache, each over its own pool, compared after each."""

    def __init__(self, n_pages: int, page_size: int) -> None:
        self.pools = [PagePool(1, n_pages, page_size, 1, 1) for _ in range(2)]
        self.ref, self.new = ScanPrefixCache(self.pools[0]), PrefixCache(self.pools[1])
        self.caches = (self.ref, self.new)
        self.held: list[tuple[list[int], list[int], int]] = []  # (tokens, pages, cached tokens), same on both
        self.evictions: list[list[int]] = []

    def both(self, method: str, *args):
        """``cache.method(*args)`` on both caches (``pool.method`` for a name starting ``pool.``); equal results."""
        def call(c):
            obj, name = (c.pool, method[5:]) if method.startswith("pool.") else (c, method)
            return getattr(obj, name)(*args)
        a, b = call(self.ref), call(self.new)
        assert a == b
        return a

    def evict(self, n: int) -> int:
        before = [len(p._free) for p in self.pools]
        freed = self.both("evict", n)
        order = [p._free[m:] for p, m in zip(self.pools, before)]  # pages freed, in eviction order
        assert order[0] == order[1] and len(order[0]) == freed
        self.evictions.append(order[0])
        return freed

    def admit(self, tokens: list[int], max_tokens: int | None) -> None:
        pages, n = self.both("match", tokens, max_tokens)
        pool = self.pools[0]
        need = -(-len(tokens) // pool.page_size) - len(pages)
        if need > pool.n_free:
            self.evict(need - pool.n_free)
        if need > pool.n_free:
            self.both("pool.decref", pages)
            return
        pages = pages + self.both("pool.alloc", need)
        self.held.append((tokens, pages, n))

    def check(self) -> None:
        assert tree(self.ref.root) == tree(self.new.root)
        assert self.pools[0].refcount == self.pools[1].refcount and self.pools[0]._free == self.pools[1]._free
        assert (self.ref.n_pages, self.ref.evicted, self.ref.hits) == (self.new.n_pages, self.new.evicted,
                                                                         self.new.hits)
        check_heap_covers_evictable_leaves(self.new)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_heap_eviction_equals_the_full_scan_over_random_operations(seed):
    rng = random.Random(seed)
    ps = rng.choice([1, 2, 3])
    twin = Twin(n_pages=rng.choice([24, 48, 96]), page_size=ps)
    prompts: list[list[int]] = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.35:  # a new request: a fresh prompt or a variation on an earlier one (shared prefixes)
            if prompts and rng.random() < 0.7:
                base = rng.choice(prompts)
                tokens = base[:rng.randint(0, len(base))] + [rng.randrange(3) for _ in range(rng.randint(1, 8))]
            else:
                tokens = [rng.randrange(3) for _ in range(rng.randint(1, 16))]
            prompts = (prompts + [tokens])[-40:]
            twin.admit(tokens, len(tokens) - 1 if rng.random() < 0.5 else None)
        elif op < 0.6 and twin.held:  # a sequence ends: its full pages go to the cache, it lets go
            tokens, pages, n = twin.held.pop(rng.randrange(len(twin.held)))
            k = rng.randint(n, len(tokens))
            twin.both("insert", tokens[:k], pages)
            twin.both("pool.decref", pages)
        elif op < 0.7 and twin.held:  # a prefill step inserts what it computed; the sequence keeps running
            i = rng.randrange(len(twin.held))
            tokens, pages, n = twin.held[i]
            k = rng.randint(n, len(tokens))
            twin.both("insert", tokens[:k], pages)
            twin.held[i] = (tokens, pages, k)
        elif op < 0.8 and prompts:  # a lookup whose pages are let go at once (a rematch that gains nothing)
            tokens = rng.choice(prompts)
            limit = rng.choice([None, len(tokens) - 1, 0])
            pages, _ = twin.both("match", tokens, limit)
            twin.both("pool.decref", pages)
        elif op < 0.998:
            twin.evict(rng.randint(1, 6))
        else:
            twin.both("clear")
        twin.check()
    for _, pages, _ in twin.held:
        twin.both("pool.decref", pages)
    twin.evict(10**6)
    twin.check()
    assert twin.new.n_pages == 0 and twin.pools[1].n_free == twin.pools[1].n_pages
    # the sequence exercised eviction: many calls, some freeing several pages, some emptying a chain of parents
    assert sum(map(len, twin.evictions)) > 200 and max(map(len, twin.evictions)) >= 3


def test_rounds_free_the_leaves_of_a_round_before_their_exposed_parents():
    """As the full scan did: a parent whose last child goes is evictable only after the leaves that were evictable
    when the round began, even when it was used less recently than they were."""
    twin = Twin(n_pages=8, page_size=1)
    for tokens in ([1, 2, 3], [4], [5]):  # chain 1-2-3 is the oldest; 4 and 5 are single, newer leaves
        pages = twin.both("pool.alloc", len(tokens))
        twin.both("insert", tokens, pages)
        twin.both("pool.decref", pages)
    assert twin.evict(3) == 3
    twin.check()
    assert twin.evictions[-1] == [2, 3, 4]  # 3, then the round's other leaves 4 and 5 (pages 3, 4), not 2


def test_evict_does_not_walk_the_tree(monkeypatch):
    pool = PagePool(1, 600, 1, 1, 1)
    cache = PrefixCache(pool)
    for i in range(500):
        pages = pool.alloc(1)
        cache.insert([i], pages)
        pool.decref(pages)
    monkeypatch.setattr(cache, "_nodes", lambda: pytest.fail("evict walked the tree"))
    assert cache.evict(3) == 3 and cache.n_pages == 497
    assert cache.match([0]) == ([], 0) and cache.match([3])[1] == 1  # the three oldest went


def test_the_pool_does_not_keep_the_cache_alive():
    """The pool's hook holds no reference to the cache: dropping the cache and the pool frees them at once, without
    waiting for the cycle collector (an engine's pool memory goes when the engine goes)."""
    pool = PagePool(1, 8, 2, 1, 1)
    cache = PrefixCache(pool)
    pages = pool.alloc(2)
    cache.insert([1, 2, 3, 4], pages)
    pool.decref(pages)
    refs = weakref.ref(pool), weakref.ref(cache)
    gc.disable()
    try:
        del pool, cache
        assert refs[0]() is None and refs[1]() is None
    finally:
        gc.enable()
